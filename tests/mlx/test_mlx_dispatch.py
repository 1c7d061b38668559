"""The MLX power-retention dispatcher: ops path, the (empty) Metal kernel slot, fallbacks.

Decision: impl="kernel" without a usable Metal kernel warns once (RuntimeWarning) and runs the
ops path, so a script written for a Mac still runs on a Linux CPU box.
"""
import importlib
import logging
import warnings

import mlx.core as mx
import numpy as np
import pytest

import retention
from retention.reference import power_retention as reference

# The package re-exports the function power_retention, which shadows the submodule's name.
pr = importlib.import_module("retention.backends.mlx.power_retention")


@pytest.fixture(autouse=True)
def fresh_resolution():
    pr._resolved.clear()
    yield
    pr._resolved.clear()


def small_inputs():
    r = np.random.default_rng(0)
    arrays = (r.standard_normal((2, 9, 2, 4)), r.standard_normal((2, 9, 1, 4)),
              r.standard_normal((2, 9, 1, 4)), -r.uniform(0.01, 0.3, (2, 9, 1)))
    return arrays, [mx.array(a, dtype=mx.float32) for a in arrays]


def test_get_backend_returns_the_mlx_module():
    be = retention.get_backend("mlx")
    assert be.name == "mlx"
    for attr in ("build_model", "save_model", "load_model", "from_numpy", "to_numpy",
                 "power_retention", "power_retention_step", "RetentionLLM"):
        assert callable(getattr(be, attr)), attr


def test_no_metal_kernel_yet():
    assert pr.metal_power_retention is None
    assert not pr.kernel_available()


def test_auto_resolves_to_ops_here_and_logs_once(caplog):
    with caplog.at_level(logging.INFO, logger="retention"):
        assert pr.resolve_impl("auto") == "ops"
        assert pr.resolve_impl("auto", mx.zeros(3)) == "ops"
    assert len([r for r in caplog.records if "ops" in r.getMessage()]) == 1


def test_ops_path_matches_reference():
    arrays, (q, k, v, log_g) = small_inputs()
    for impl in ("ops", "auto"):
        y = pr.power_retention(q, k, v, log_g, chunk_size=4, impl=impl)
        assert np.abs(np.array(y) - reference(*arrays)).max() < 1e-5


def test_kernel_falls_back_with_one_warning():
    arrays, (q, k, v, log_g) = small_inputs()
    with pytest.warns(RuntimeWarning, match="falling back"):
        y = pr.power_retention(q, k, v, log_g, chunk_size=4, impl="kernel")
    assert np.abs(np.array(y) - reference(*arrays)).max() < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pr.power_retention(q, k, v, log_g, chunk_size=4, impl="kernel")
        pr.power_retention_step(q[:, 0], k[:, 0], v[:, 0], log_g[:, 0], impl="kernel")


def test_filled_slot_is_used_when_metal_is_present(monkeypatch):
    calls = []

    def fake_kernel(*args, **kwargs):
        calls.append(kwargs)
        return pr.power_retention_ops(*args, **kwargs)
    monkeypatch.setattr(pr, "metal_power_retention", fake_kernel)
    monkeypatch.setattr(pr.mx.metal, "is_available", lambda: True)
    _, (q, k, v, log_g) = small_inputs()
    gpu = mx.Device(mx.DeviceType.gpu)
    assert pr.resolve_impl("auto", gpu) == "kernel"
    with pytest.warns(RuntimeWarning, match="not the GPU"):
        assert pr.resolve_impl("kernel", mx.Device(mx.DeviceType.cpu)) == "ops"
    with mx.stream(mx.cpu):  # the fake kernel still computes on the CPU
        monkeypatch.setattr(pr, "_device_of", lambda _: gpu)
        pr._resolved.clear()
        pr.power_retention(q, k, v, log_g, chunk_size=4)
    assert calls and calls[0]["chunk_size"] == 4


def test_unknown_impl_raises():
    _, (q, k, v, log_g) = small_inputs()
    with pytest.raises(ValueError, match="impl must be one of"):
        pr.power_retention(q, k, v, log_g, impl="triton")
