"""Golden losses: the first 20 losses of a fixed tiny run per backend (tests/golden/). A change
that is not meant to change the computation must keep them within 1e-4 (CPUs differ in the
last bits). After an intended change, regenerate with:

    RETENTION_UPDATE_GOLDEN=1 pytest tests/test_train_golden.py
"""
import json
import os
from pathlib import Path

import pytest

from retention.config import ModelConfig, TrainConfig
from retention.train import train

GOLDEN = Path(__file__).parent / "golden"
MODEL = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                    head_dim=16, mlp_hidden=64, chunk_size=8)


def golden_config(out):
    return TrainConfig(model=MODEL, data="synthetic", seq_len=24, batch_size=2, grad_accum=2,
                       steps=20, lr=3e-3, min_lr=3e-4, warmup_steps=4, weight_decay=0.1,
                       clip_norm=1.0, eval_every=0, save_every=0, seed=1234,
                       log_interval=100, out_dir=str(out), progress=False, tensorboard=False)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_golden_losses(tmp_path, backend):
    config = golden_config(tmp_path)
    train(config, backend)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    path = GOLDEN / f"losses_{backend}.json"
    if os.environ.get("RETENTION_UPDATE_GOLDEN"):
        path.write_text(json.dumps({"backend": backend, "config": config.to_dict() | {
            "out_dir": None}, "losses": losses}, indent=1) + "\n")
    golden = json.loads(path.read_text())["losses"]
    assert len(losses) == len(golden) == 20
    worst = max(abs(a - b) for a, b in zip(losses, golden))
    assert worst <= 1e-4, f"losses moved by {worst:.2e} from {path.name}: {losses}"
    assert losses[-1] < losses[0] - 0.05  # the run learns something
