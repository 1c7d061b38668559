"""TrainingLogger (metrics.jsonl, summary), the FLOPs model, the peak table and `retention plot`."""
import json
import math
import sys

import pytest

from retention.config import create_model_config
from retention.metrics import (TrainingLogger, flops_per_token, matmul_parameters, peak_flops,
                               retention_flops_per_token)
from retention.params import count_parameters


def test_logger_writes_jsonl_and_summary(tmp_path, capsys):
    with TrainingLogger(tmp_path, log_interval=2, tensorboard=False) as logger:
        for step, loss in enumerate([4.0, 3.0, 3.5], start=1):
            logger.log(step, {"loss": loss, "lr": 1e-3})
        summary = logger.get_summary()
    assert summary == {"steps": 3, "avg_loss": 3.5, "min_loss": 3.0, "last_loss": 3.5}
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["perplexity"] == pytest.approx(math.exp(3.0))
    out = capsys.readouterr().out
    assert "step 2" in out and "step 1 " not in out  # printed every log_interval steps


def test_logger_accepts_array_scalars_and_truncates(tmp_path):
    import numpy as np
    logger = TrainingLogger(tmp_path, 10, tensorboard=False)
    for step in range(1, 6):
        logger.log(step, {"loss": np.float32(1.0 / step)})
    logger.close()
    TrainingLogger.truncate(tmp_path, 3)
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_flops_model_counts_matmuls_and_retention():
    c = create_model_config("small")
    # Every parameter but the embedding lookup and norms takes part in a matmul (tied head).
    n_norm = c.n_layers * (2 * c.d_model + 2 * c.head_dim) + c.d_model
    assert matmul_parameters(c) == count_parameters(c) - n_norm
    D = 2080  # C(64 + 1, 2)
    # Long sequences: the chunked form (causal within a chunk of 128, then the state).
    expected = 2 * 64 * 129 * 12 + (1 - 128 / 16384) * 2 * D * 65 * (12 + 12)
    assert retention_flops_per_token(c, 16384) == pytest.approx(expected)
    assert flops_per_token(c, 16384) == pytest.approx(6 * matmul_parameters(c) + 3 * 12 * expected)
    # Short ones: the attention form, 4 d per causal (query, key) pair, is cheaper.
    assert retention_flops_per_token(c, 2048) == 2 * 64 * 2049 * 12
    # A window of one chunk only attends within itself: no state, both forms agree.
    assert retention_flops_per_token(c, 64) == 2 * 64 * 65 * 12


def test_peak_table_and_override():
    assert peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12  # longest name wins
    assert peak_flops("NVIDIA A100-SXM4-80GB", "float32") == 19.5e12
    assert peak_flops("Apple M2 Max") == 13.6e12
    assert peak_flops("cpu (2 threads)") > 0
    assert peak_flops("Mystery Accelerator") is None
    assert peak_flops("NVIDIA H200", override=1e12) == 1e12


def test_plot_writes_png(tmp_path):
    from retention.plot import plot_run
    with TrainingLogger(tmp_path, 100, tensorboard=False) as logger:
        for step in range(1, 21):
            m = {"loss": 5.0 / step, "lr": 1e-3 * step / 20, "tokens_per_sec": 1000.0 + step}
            if step % 10 == 0:
                m["val_loss"] = 6.0 / step
            logger.log(step, m)
    png = plot_run(tmp_path)
    assert png == tmp_path / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_cli_and_missing_run(tmp_path, capsys):
    from retention.cli import main
    assert main(["plot", str(tmp_path)]) == 2  # FileNotFoundError -> clear message
    assert "metrics.jsonl" in capsys.readouterr().err
    with TrainingLogger(tmp_path, 100, tensorboard=False) as logger:
        logger.log(1, {"loss": 1.0})
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").exists()


def _fake_module(monkeypatch, name, **attrs):
    import importlib.machinery
    import sys
    import types
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, v in attrs.items():
        setattr(module, k, v)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_tensorboard_and_wandb_receive_every_scalar(tmp_path, monkeypatch):
    """The optional integrations are wired through (fake modules stand in for the packages)."""
    seen = {"tb": [], "wandb": [], "closed": []}

    class Writer:
        def __init__(self, logdir, purge_step=None):
            seen["logdir"] = logdir

        def add_scalar(self, key, value, step):
            seen["tb"].append((key, value, step))

        def close(self):
            seen["closed"].append("tb")

    class Run:
        def log(self, data, step):
            seen["wandb"].append((data, step))

        def finish(self):
            seen["closed"].append("wandb")

    _fake_module(monkeypatch, "tensorboardX", SummaryWriter=Writer)
    _fake_module(monkeypatch, "wandb", init=lambda project, config: Run())
    with TrainingLogger(tmp_path, 10, wandb_project="p", run_config={"lr": 1}) as logger:
        logger.log(1, {"loss": 2.0, "lr": 1e-3})
    assert seen["logdir"] == str(tmp_path / "tensorboard")
    assert ("loss", 2.0, 1) in seen["tb"] and ("lr", 1e-3, 1) in seen["tb"]
    assert seen["wandb"][0][1] == 1 and seen["wandb"][0][0]["loss"] == 2.0
    assert sorted(seen["closed"]) == ["tb", "wandb"]


def test_no_tensorboard_installed_is_fine(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)     # import fails as if absent
    with TrainingLogger(tmp_path, 10) as logger:
        logger.log(1, {"loss": 1.0})
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path):
    logger = TrainingLogger(tmp_path, tensorboard=True)
    logger.log(1, {"loss": 2.5, "lr": 1e-3})
    logger.close()
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    data = events.read_bytes()
    assert b"loss" in data and b"lr" in data
