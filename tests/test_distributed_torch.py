"""Two torch ranks on the CPU (gloo, FSDP2) against one process with the same global batch:
the same losses, a sharded (DCP) checkpoint that resumes on one rank and exports to the
canonical layout, and a canonical checkpoint that resumes on two ranks.

The ranks are started the way torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK) but meet
through a rendezvous file (RETENTION_DIST_INIT) and gloo on the loopback interface, so nothing
listens beyond 127.0.0.1."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from retention.config import ModelConfig, TrainConfig
from retention.distributed import QuietLogger, RankShard, init_ranks
from retention.train import train

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                   mlp_hidden=64, chunk_size=8)
STEPS, EVERY = 6, 3
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def config(out, batch_size, **kw):
    args = dict(model=TINY, data="synthetic", seq_len=16, batch_size=batch_size, grad_accum=2,
                steps=STEPS, lr=3e-3, min_lr=3e-4, warmup_steps=2, weight_decay=0.1,
                clip_norm=1.0, eval_every=EVERY, eval_batches=1, save_every=EVERY, keep_last=0,
                log_interval=100, out_dir=str(out), progress=False, tensorboard=False)
    args.update(kw)
    return TrainConfig(**args)


def records(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def column(out, key):
    return [r[key] for r in records(out) if key in r]


@pytest.fixture
def launch(tmp_path, run_ranks, train_cli_flags):
    """launch(out, batch_size, *extra): `python -m retention train` on two ranks, as torchrun
    would start them, with the flags of config(out, batch_size)."""
    TINY.save(tmp_path / "model.json")

    def start(out, batch_size, *extra, world=2):
        cmd = [sys.executable, "-m", "retention", "train", "--backend", "torch",
               *train_cli_flags(config(out, batch_size), tmp_path / "model.json"), *extra]
        return run_ranks(cmd, tmp_path / f"rendezvous-{Path(out).name}", world)
    return start


def assert_close(a, b, tol=1e-5):
    assert len(a) == len(b)
    worst = max(abs(x - y) for x, y in zip(a, b))
    assert worst <= tol, (worst, a, b)


def test_two_ranks_match_one_process_and_the_sharded_checkpoint_resumes_on_one(tmp_path, launch):
    single = tmp_path / "single"
    train(config(single, batch_size=4), "torch")
    dist_out = tmp_path / "dist"
    (out0, _), (out1, _) = launch(dist_out, 2)
    # Rank 0 logs; rank 1 prints nothing of the run.
    assert "FSDP2 over 2 ranks (gloo)" in out0 and "done: step 6" in out0
    assert "done:" not in out1 and "backend:" not in out1
    assert [r["step"] for r in records(dist_out)] == list(range(1, STEPS + 1))
    assert_close(column(dist_out, "loss"), column(single, "loss"))
    assert_close(column(dist_out, "val_loss"), column(single, "val_loss"))
    assert_close(column(dist_out, "grad_norm"), column(single, "grad_norm"))
    assert column(dist_out, "tokens")[-1] == STEPS * 4 * 2 * 16   # global tokens

    ckpt = dist_out / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in (ckpt / "dcp").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "model.safetensors").exists()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["train_config"]["batch_size"] == 2
    assert not list((dist_out / "checkpoints").glob(".*"))          # no temporary leftovers

    # 2 -> 1: the sharded checkpoint of step 3 resumes in one process (global batch 4).
    part = tmp_path / "part"
    shutil.copytree(dist_out, part)
    shutil.rmtree(part / "checkpoints" / "step_00000006")
    (part / "checkpoints" / "latest").write_text("step_00000003\n")
    result = train(config(part, batch_size=4, resume="latest"), "torch")
    assert result.step == STEPS
    assert_close(column(part, "loss"), column(single, "loss"))

    # Export: the canonical files appear beside dcp/ and load on either backend.
    import retention
    from retention.cli import main
    with pytest.raises(FileNotFoundError, match="retention export"):
        retention.load_model(dist_out / "checkpoints" / "step_00000006", backend="torch")
    assert main(["export", str(dist_out)]) == 0
    assert main(["export", str(ckpt), "--out", str(tmp_path / "exported")]) == 0
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"]
    final = dist_out / "checkpoints" / "step_00000006"
    assert (final / "model.safetensors").exists() and (final / "optimizer.safetensors").exists()
    from retention.train_checkpoint import load_training_checkpoint
    _, p_dist, m_dist, _ = load_training_checkpoint(final)
    _, p_one, m_one, _ = load_training_checkpoint(single / "checkpoints" / "step_00000006")
    assert set(p_dist) == set(p_one) and set(m_dist) == set(m_one)
    for name in p_one:
        np.testing.assert_allclose(p_dist[name], p_one[name], rtol=1e-4, atol=1e-5)
    assert retention.load_model(final, backend="mlx").config == TINY


def test_a_canonical_checkpoint_resumes_on_two_ranks(tmp_path, launch):
    single = tmp_path / "single"
    train(config(single, batch_size=4), "torch")
    part = tmp_path / "part"
    shutil.copytree(single, part)
    shutil.rmtree(part / "checkpoints" / "step_00000006")
    (part / "checkpoints" / "latest").write_text("step_00000003\n")
    (out0, _), _ = launch(part, 2, "--resume", "latest")
    assert "resumed from" in out0
    assert_close(column(part, "loss"), column(single, "loss"))
    assert (part / "checkpoints" / "step_00000006" / "dcp" / ".metadata").exists()


def test_rank_shards_split_the_global_batch():
    class Stream:
        def __init__(self):
            self.index = 0

        def next_batch(self):
            self.index += 1
            rows = np.arange(8 * 3).reshape(8, 3) + 100 * self.index
            return rows, rows + 1

        def state_dict(self):
            return {"index": self.index}

        def load_state_dict(self, s):
            self.index = s["index"]
    shards = [RankShard(Stream(), r, 4) for r in range(4)]
    parts = [s.next_batch() for s in shards]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in parts]), Stream().next_batch()[0])
    assert [s.state_dict() for s in shards] == [{"index": 1}] * 4
    quiet = QuietLogger()
    quiet.log(1, {"loss": 2.0})
    quiet.log(2, {"loss": 1.0})
    assert quiet.get_summary() == {"steps": 2, "avg_loss": 1.5, "min_loss": 1.0,
                                   "last_loss": 1.0}


def test_launcher_and_backend_must_agree(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="mlx.launch"):
        init_ranks("mlx")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("MLX_RANK", "0")
    with pytest.raises(ValueError, match="torchrun"):
        init_ranks("torch")
    monkeypatch.delenv("MLX_RANK")
    assert init_ranks("torch").world == 1 and init_ranks("mlx").main


def test_sigterm_stops_all_ranks_at_one_step_with_a_checkpoint(tmp_path, start_ranks):
    """Ranks that get the signal at different steps agree on where to stop, save together
    and exit with 130."""
    import signal
    import time
    TINY.save(tmp_path / "model.json")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "retention", "train", "--backend", "torch", "--model",
           str(tmp_path / "model.json"), "--data", "synthetic", "--seq-len", "16",
           "--batch-size", "2", "--steps", "100000", "--save-every", "0", "--eval-every", "0",
           "--out", str(out), "--no-progress", "--no-tensorboard"]
    procs = start_ranks(cmd, tmp_path / "rendezvous")
    metrics = out / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert all(p.poll() is None for p in procs), procs[0].communicate()
        assert time.time() - t0 < 90, "no progress"
        time.sleep(0.05)
    for p in reversed(procs):  # as torchrun forwards a signal: to every rank, one by one
        p.send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [130, 130], (outs[0][1][-2000:], outs[1][1][-3000:])
    assert "continue with --resume latest" in outs[0][0]
    last = [json.loads(l) for l in metrics.read_text().splitlines()][-1]["step"]
    from retention.train import latest_checkpoint
    ckpt = latest_checkpoint(out)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == last
    assert (ckpt / "dcp" / ".metadata").exists()
