"""The torch power-retention dispatcher: resolves once, says what it chose, warns on fallback.

Choice documented here: impl="kernel" where the Triton kernel cannot run (CPU tensors, no CUDA,
kernel package missing) warns once and runs the ops path instead of raising.
"""
import importlib
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

# The module, not the function of the same name that the package re-exports.
pr = importlib.import_module("retention.backends.torch.power_retention")
from retention.reference import power_retention as reference

torch.set_float32_matmul_precision("highest")


@pytest.fixture(autouse=True)
def fresh_dispatcher():
    pr._resolved.clear()
    pr._warned.clear()
    yield
    pr._resolved.clear()
    pr._warned.clear()


def inputs(device="cpu"):
    r = np.random.default_rng(0)
    arrays = (r.normal(size=(2, 20, 4, 8)), r.normal(size=(2, 20, 2, 8)),
              r.normal(size=(2, 20, 2, 8)), np.log(r.uniform(0.8, 1.0, size=(2, 20, 2))))
    return arrays, [torch.tensor(a, dtype=torch.float32, device=device) for a in arrays]


def test_auto_resolves_to_ops_on_cpu(caplog):
    arrays, (q, k, v, g) = inputs()
    with caplog.at_level(logging.INFO, logger="retention"):
        assert pr.resolve_impl("auto", q) == "ops"
        y1 = pr.power_retention(q, k, v, g, chunk_size=8)
        y2 = pr.power_retention(q, k, v, g, chunk_size=8)
    assert torch.equal(y1, y2)
    assert torch.equal(y1, pr.power_retention_ops(q, k, v, g, chunk_size=8))
    records = [r for r in caplog.records if "power retention" in r.getMessage()]
    assert len(records) == 1 and "ops path" in records[0].getMessage()  # said once


def test_ops_runs_the_ops_path():
    arrays, (q, k, v, g) = inputs()
    y = pr.power_retention(q, k, v, g, chunk_size=8, impl="ops")
    want = reference(*arrays)
    assert np.abs(y.double().numpy() - want).max() <= 1e-5 * np.abs(want).max()


def test_kernel_on_cpu_falls_back_with_one_warning():
    arrays, (q, k, v, g) = inputs()
    with pytest.warns(RuntimeWarning, match="impl='kernel'.*CUDA.*falling back"):
        y = pr.power_retention(q, k, v, g, chunk_size=8, impl="kernel")
    assert torch.equal(y, pr.power_retention_ops(q, k, v, g, chunk_size=8))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the second call must not warn again
        pr.power_retention(q, k, v, g, chunk_size=8, impl="kernel")
        pr.power_retention_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], None, impl="kernel")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer")
def test_kernel_for_a_cuda_device_without_cuda_warns():
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert pr.resolve_impl("kernel", "cuda") == "ops"
    assert pr.resolve_impl("auto", torch.device("cuda")) == "ops"


def test_step_dispatches_too():
    arrays, (q, k, v, g) = inputs()
    y, state = pr.power_retention_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0])
    want = reference(*(a[:, :1] for a in arrays), form="recurrent")[:, 0]
    assert np.abs(y.double().numpy() - want).max() <= 1e-5 * np.abs(want).max()
    assert state[0].shape == (2, 2, 36, 8)


def test_unknown_impl():
    _, (q, k, v, g) = inputs()
    with pytest.raises(ValueError, match="impl must be one of"):
        pr.power_retention(q, k, v, g, impl="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_ops_path_and_auto_choice():
    arrays, (q, k, v, g) = inputs("cuda")
    y = pr.power_retention(q, k, v, g, chunk_size=8, impl="ops")
    want = reference(*arrays)
    assert np.abs(y.double().cpu().numpy() - want).max() <= 1e-5 * np.abs(want).max()
    kernel, _ = pr._kernel_module()
    assert pr.resolve_impl("auto", q) == ("kernel" if kernel is not None else "ops")


INTERPRETED = """
import importlib, torch
pr = importlib.import_module("retention.backends.torch.power_retention")
torch.manual_seed(0)
q, k, v = torch.randn(2, 40, 4, 16), torch.randn(2, 40, 2, 16), torch.randn(2, 40, 2, 16)
g = torch.rand(2, 40, 2) * -0.1
assert pr.resolve_impl("kernel", q) == "kernel"
assert pr.resolve_impl("auto", q) == "ops"      # never the slow interpreter unasked
y, st = pr.power_retention(q, k, v, g, chunk_size=16, return_state=True, impl="kernel")
y0, st0 = pr.power_retention_ops(q, k, v, g, chunk_size=16, return_state=True)
assert (y - y0).abs().max() <= 1e-5 * y0.abs().max(), (y - y0).abs().max()
_, (S, z) = pr.power_retention_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], st, impl="kernel")
_, (S0, z0) = pr.power_retention_step_ops(q[:, 0], k[:, 0], v[:, 0], g[:, 0], st0)
assert (S - S0).abs().max() <= 1e-5 * S0.abs().max() and (z - z0).abs().max() <= 1e-5 * z0.abs().max()
print("kernel-ok")
"""


def test_kernel_path_through_the_triton_interpreter():
    # impl="kernel" with TRITON_INTERPRET=1 reaches retention.kernels.triton on CPU tensors;
    # a fresh process, because Triton reads the variable when kernels are defined.
    pytest.importorskip("triton", reason="triton ships for Linux x86-64 only")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "kernel-ok" in out.stdout, out.stderr[-3000:]


def test_kernel_path_chooses_its_own_chunk(monkeypatch):
    """chunk_size is the ops path's (the model config's); the kernel gets None and picks its
    own, while a fallback for inputs the kernel rejects keeps the caller's chunk."""
    kernels = pytest.importorskip("retention.kernels.triton", reason="triton: Linux x86-64 only")
    _, (q, k, v, g) = inputs()
    seen = {}

    def kernel(*args, **kwargs):
        seen.update(kwargs)
        if kwargs.get("return_state"):
            raise NotImplementedError("pretend these inputs are not covered")
        return "from the kernel"

    def ops(*args, **kwargs):
        seen["ops_chunk"] = kwargs["chunk_size"]
        return "from ops"

    monkeypatch.setattr(pr, "resolve_impl", lambda impl, x=None: "kernel")
    monkeypatch.setattr(kernels, "power_retention", kernel)
    monkeypatch.setattr(pr, "power_retention_ops", ops)
    assert pr.power_retention(q, k, v, g, chunk_size=32) == "from the kernel"
    assert seen["chunk_size"] is None
    with pytest.warns(RuntimeWarning, match="does not cover"):
        assert pr.power_retention(q, k, v, g, chunk_size=32, return_state=True) == "from ops"
    assert seen["ops_chunk"] == 32
