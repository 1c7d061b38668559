"""Two MLX ranks (`mlx.launch -n 2 --backend ring` over 127.0.0.1) against one process with
the same global batch: the same losses, one checkpoint written by rank 0, which resumes on one
rank."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from retention.config import ModelConfig, TrainConfig
from retention.train import train

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                   mlp_hidden=64, chunk_size=8)
STEPS, EVERY = 4, 2


def config(out, batch_size, **kw):
    args = dict(model=TINY, data="synthetic", seq_len=16, batch_size=batch_size, grad_accum=2,
                steps=STEPS, lr=3e-3, min_lr=3e-4, warmup_steps=2, weight_decay=0.1,
                clip_norm=1.0, eval_every=EVERY, eval_batches=1, save_every=EVERY, keep_last=0,
                log_interval=100, out_dir=str(out), progress=False, tensorboard=False)
    args.update(kw)
    return TrainConfig(**args)


def column(out, key):
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r[key] for r in map(json.loads, lines) if key in r]


def free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (the ring listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def assert_close(a, b, tol=1e-5):
    assert len(a) == len(b)
    worst = max(abs(x - y) for x, y in zip(a, b))
    assert worst <= tol, (worst, a, b)


def test_two_mlx_ranks_match_one_process_and_resume_on_one(tmp_path, train_cli_flags):
    single = tmp_path / "single"
    train(config(single, batch_size=4), "mlx")
    TINY.save(tmp_path / "model.json")
    out = tmp_path / "dist"
    launcher = Path(sys.executable).with_name("mlx.launch")
    cmd = [str(launcher), "-n", "2", "--backend", "ring", "--hosts", "127.0.0.1",
           "--starting-port", str(free_port_pair()), "--", sys.executable, "-m", "retention",
           "train", "--backend", "mlx",
           *train_cli_flags(config(out, batch_size=2), tmp_path / "model.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=150,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data parallel over 2 ranks" in done.stdout
    assert done.stdout.count("done: step 4") == 1                # rank 0 only
    assert_close(column(out, "loss"), column(single, "loss"))
    assert_close(column(out, "val_loss"), column(single, "val_loss"))
    assert column(out, "tokens")[-1] == STEPS * 4 * 2 * 16

    ckpt = out / "checkpoints" / "step_00000002"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "optimizer.safetensors").exists()
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    (out / "checkpoints" / "latest").write_text("step_00000002\n")
    train(config(out, batch_size=4, resume="latest"), "mlx")
    assert_close(column(out, "loss"), column(single, "loss"))
