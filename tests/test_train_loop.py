"""The training loop on the torch CPU backend with a tiny model and synthetic data: checkpoints,
exact resume (also after SIGKILL), SIGINT, failed writes, non-finite steps, metrics, errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from retention.config import ModelConfig, TrainConfig
from retention.train import TrainingError, latest_checkpoint, train

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                   mlp_hidden=64, chunk_size=8)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny_config(out, **kw):
    args = dict(model=TINY, data="synthetic", seq_len=16, batch_size=2, steps=8, lr=3e-3,
                min_lr=3e-4, warmup_steps=2, eval_every=4, eval_batches=1, save_every=3,
                keep_last=2, log_interval=100, out_dir=str(out), progress=False,
                tensorboard=False)
    args.update(kw)
    return TrainConfig(**args)


def records(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return [r["loss"] for r in records(out)]


def test_checkpoint_layout_metrics_and_keep_last(tmp_path):
    result = train(tiny_config(tmp_path, grad_accum=2), "torch")
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000006", "step_00000008"]          # keep_last=2
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    assert result.checkpoint == latest_checkpoint(tmp_path)
    files = sorted(p.name for p in result.checkpoint.iterdir())
    assert files == ["config.json", "model.safetensors", "optimizer.safetensors",
                     "trainer_state.json"]                         # no tokenizer: synthetic
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["optimizer_step"] == 8
    assert state["tokens_seen"] == 8 * 2 * 2 * 16
    assert state["data_position"] == {"kind": "synthetic", "index": 16}  # 2 micro-batches a step
    assert state["schedule"]["total_steps"] == 8 and state["backend"] == "torch"
    assert state["train_config"]["grad_accum"] == 2 and "package_version" in state
    from safetensors.numpy import load_file
    moments = load_file(str(result.checkpoint / "optimizer.safetensors"))
    assert "exp_avg.model.embed_tokens.weight" in moments
    assert "exp_avg_sq.model.layers.1.mlp.down_proj.weight" in moments
    # The model part loads with the ordinary loader of either backend.
    import retention
    model = retention.load_model(result.checkpoint, backend="torch")
    assert model.config == TINY
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 9))
    for key in ("loss", "perplexity", "lr", "grad_norm", "tokens_per_sec", "mfu",
                "peak_memory_gb", "tokens"):
        assert all(isinstance(r[key], (int, float)) for r in recs), key
    assert [r["step"] for r in recs if "val_loss" in r] == [4, 8]
    assert recs[0]["lr"] == pytest.approx(1.5e-3) and recs[-1]["lr"] == pytest.approx(3e-4)
    assert np.isfinite(result.summary["min_loss"])


def test_resume_is_bitwise_in_process(tmp_path):
    full = train(tiny_config(tmp_path / "full"), "torch")
    part = tmp_path / "part"
    train(tiny_config(part, steps=8, save_every=3, keep_last=0), "torch")
    # Throw away everything after step 3, then resume from it.
    import shutil
    for p in (part / "checkpoints").glob("step_*"):
        if p.name != "step_00000003":
            shutil.rmtree(p)
    (part / "checkpoints" / "latest").write_text("step_00000003\n")
    result = train(tiny_config(part, resume="latest"), "torch")
    assert result.step == 8
    assert losses(part) == losses(tmp_path / "full")     # bitwise: same floats
    assert full.summary["last_loss"] == result.summary["last_loss"]


def test_existing_run_needs_resume_and_mismatches_fail(tmp_path):
    train(tiny_config(tmp_path, steps=2, save_every=0, eval_every=0), "torch")
    with pytest.raises(ValueError, match="--resume latest"):
        train(tiny_config(tmp_path, steps=4), "torch")
    other = TINY.replace(d_model=48)
    with pytest.raises(ValueError, match="d_model: checkpoint 32 vs run 48"):
        train(tiny_config(tmp_path, model=other, steps=4, resume="latest"), "torch")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny_config(tmp_path / "empty", resume="latest"), "torch")


def test_mismatched_tokenizer_fails(tmp_path):
    from retention.data.tokenizer import train_bpe
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(f"document {i} says hello to the quick brown fox {i * 7}"
                                for i in range(200)))
    for name, seed_words in (("a", "alpha beta gamma"), ("b", "delta epsilon zeta")):
        tok = train_bpe([text.read_text(), seed_words * 50], vocab_size=300, name=name)
        tok.save(tmp_path / f"tok_{name}")
    model = TINY.replace(vocab_size=300)
    cfg = tiny_config(tmp_path / "run", model=model, data=str(text), steps=2, save_every=0,
                      eval_every=0, tokenizer=str(tmp_path / "tok_a"))
    result = train(cfg, "torch")
    assert (result.checkpoint / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="different tokenizer"):
        train(cfg.replace(tokenizer=str(tmp_path / "tok_b"), steps=4, resume="latest"), "torch")
    # The same tokenizer resumes and continues where the data left off.
    assert train(cfg.replace(steps=3, resume="latest"), "torch").step == 3


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    from retention.backends.torch import trainer as torch_trainer
    original = torch_trainer.Trainer.forward_backward
    calls = {"n": 0, "bad": {3, 4}}

    def flaky(self, micro):
        calls["n"] += 1
        loss, norm = original(self, micro)
        return (float("nan"), norm) if calls["n"] in calls["bad"] else (loss, norm)

    monkeypatch.setattr(torch_trainer.Trainer, "forward_backward", flaky)
    result = train(tiny_config(tmp_path / "a", steps=6, save_every=0), "torch")
    recs = records(tmp_path / "a")
    assert [r["step"] for r in recs if r.get("skipped")] == [3, 4]
    assert recs[2]["skip_reason"] == "non-finite loss"
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["optimizer_step"] == 4 and state["step"] == 6

    calls.update(n=0, bad=set(range(3, 100)))
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        train(tiny_config(tmp_path / "b", steps=20, save_every=0, max_nonfinite=3), "torch")
    state = json.loads((latest_checkpoint(tmp_path / "b") / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["optimizer_step"] == 2


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    import retention.checkpoint as ckpt
    real = ckpt._fsync_tree
    calls = {"n": 0}

    def disk_full(path):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(28, "No space left on device")
        real(path)

    monkeypatch.setattr(ckpt, "_fsync_tree", disk_full)
    result = train(tiny_config(tmp_path, steps=6, save_every=2, keep_last=0), "torch")
    out = capsys.readouterr().out
    assert "checkpoint at step 4 failed" in out and "No space left" in out
    assert "step_00000002 is still valid" in out
    assert result.checkpoint.name == "step_00000002"
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert sorted(leftovers) == ["latest", "step_00000002"]   # no half-written directories
    monkeypatch.setattr(ckpt, "_fsync_tree", real)
    resumed = train(tiny_config(tmp_path, steps=6, save_every=2, resume="latest"), "torch")
    assert resumed.step == 6


def _train_script(out, steps, save_every):
    return ("import sys\n"
            "from retention.config import ModelConfig, TrainConfig\n"
            "from retention.train import train\n"
            f"m = ModelConfig.from_dict({TINY.to_dict()!r})\n"
            f"c = TrainConfig(model=m, data='synthetic', seq_len=16, batch_size=2, "
            f"steps={steps}, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=4, "
            f"eval_batches=1, save_every={save_every}, keep_last=2, log_interval=100, "
            f"out_dir={str(out)!r}, progress=False, tensorboard=False, "
            f"resume=sys.argv[1] if len(sys.argv) > 1 else None)\n"
            "r = train(c, 'torch')\nprint('interrupted' if r.interrupted else 'done', r.step)\n")


def _wait_for(predicate, proc, timeout=90):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.communicate()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the child")
        time.sleep(0.05)


def _latest_step(out):
    path = latest_checkpoint(out)
    return int(path.name.split("_")[1]) if path else 0


def test_sigkill_mid_run_then_resume_gives_the_same_losses(tmp_path):
    import random
    steps, every = 60, 5
    train(tiny_config(tmp_path / "ref", steps=steps, save_every=every), "torch")
    out = tmp_path / "killed"
    script = tmp_path / "run.py"
    script.write_text(_train_script(out, steps, every))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
    _wait_for(lambda: _latest_step(out) >= 2 * every, proc)
    time.sleep(random.uniform(0.0, 0.05))  # an arbitrary moment: a step or a checkpoint write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _latest_step(out)
    assert 2 * every <= killed_at < steps, killed_at
    done = subprocess.run([sys.executable, str(script), "latest"], capture_output=True,
                          text=True, timeout=120, env=CHILD_ENV)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout and f"done {steps}" in done.stdout
    assert [r["step"] for r in records(out)] == list(range(1, steps + 1))
    assert losses(out) == losses(tmp_path / "ref")       # bitwise, step for step
    assert not list((out / "checkpoints").glob(".*"))   # no temporary leftovers


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, sig):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "retention", "train", "--backend", "torch", "--model",
           str(tmp_path / "model.json"), "--data", "synthetic", "--steps", "100000",
           "--seq-len", "16", "--batch-size", "2", "--out", str(out), "--save-every", "0",
           "--no-progress", "--no-tensorboard"]
    TINY.save(tmp_path / "model.json")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=CHILD_ENV)
    metrics = out / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert f"{sig.name} received" in stdout and "Traceback" not in stderr
    assert "continue with --resume latest" in stdout
    last = records(out)[-1]["step"]
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["step"] == last


def test_out_of_memory_suggests_smaller_batches(tmp_path, monkeypatch, capsys):
    import torch
    from retention.backends.torch import trainer as torch_trainer

    def oom(self, micro):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch_trainer.Trainer, "forward_backward", oom)
    with pytest.raises(TrainingError, match=r"--batch-size 1 --grad-accum 2 keeps 32 tokens"):
        train(tiny_config(tmp_path / "a"), "torch")
    from retention.cli import main
    TINY.save(tmp_path / "model.json")
    code = main(["train", "--backend", "torch", "--model", str(tmp_path / "model.json"),
                 "--data", "synthetic", "--steps", "2", "--seq-len", "16", "--batch-size", "2",
                 "--out", str(tmp_path / "b"), "--no-progress", "--no-tensorboard"])
    assert code == 1 and "shorter --seq-len 8" in capsys.readouterr().err


def test_prepared_shards_train_and_resume_exactly(tmp_path):
    """`retention data prepare` output: random windows, its own tokenizer, exact resume."""
    from retention.data.prepare import prepare_shards
    from retention.data.tokenizer import train_bpe
    text = tmp_path / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": f"record {i}: the quick brown fox jumps over "
                                                f"the lazy dog {i * 13} times, then rests."})
                            + "\n" for i in range(300)))
    train_bpe([text.read_text()], vocab_size=300, name="t").save(tmp_path / "tok")
    prepare_shards(str(text), tmp_path / "shards", tokenizer=str(tmp_path / "tok"),
                   val_fraction=0.2, filters=None, progress=False)
    model = TINY.replace(vocab_size=300)
    cfg = tiny_config(tmp_path / "full", model=model, data=str(tmp_path / "shards"), steps=6,
                      save_every=3, keep_last=0)
    full = train(cfg, "torch")
    assert (full.checkpoint / "tokenizer.json").exists()
    assert [r["step"] for r in records(tmp_path / "full") if "val_loss" in r] == [4, 6]
    part = tmp_path / "part"
    import shutil
    shutil.copytree(tmp_path / "full", part)
    for p in (part / "checkpoints").glob("step_*"):
        if p.name != "step_00000003":
            shutil.rmtree(p)
    (part / "checkpoints" / "latest").write_text("step_00000003\n")
    train(cfg.replace(out_dir=str(part), resume="latest"), "torch")
    assert losses(part) == losses(tmp_path / "full")


def test_resume_from_the_cli_restores_the_run_settings(tmp_path, capsys):
    """`retention train --resume latest --out DIR` needs no other flag: the run's own settings
    come back from the checkpoint, and flags given now (--steps) override them."""
    from retention.cli import main
    out = tmp_path / "run"
    TINY.save(tmp_path / "model.json")
    assert main(["train", "--backend", "torch", "--model", str(tmp_path / "model.json"),
                 "--data", "synthetic", "--steps", "2", "--seq-len", "16", "--batch-size", "2",
                 "--out", str(out), "--no-progress", "--no-tensorboard"]) == 0
    capsys.readouterr()
    assert main(["train", "--backend", "torch", "--resume", "latest", "--out", str(out),
                 "--steps", "4"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "reading the data from its start" not in printed
    recs = records(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["tokens_seen"] == 4 * 16 * 2


def test_cli_resume_on_the_other_backend_leaves_the_device_to_this_machine(tmp_path, capsys):
    """A run started with --device cpu:0 (torch's name) resumes on MLX with no --device flag: the
    device is the machine's, not the run's."""
    from retention.cli import main
    out = tmp_path / "run"
    TINY.save(tmp_path / "model.json")
    assert main(["train", "--backend", "torch", "--device", "cpu:0", "--model",
                 str(tmp_path / "model.json"), "--data", "synthetic", "--steps", "1",
                 "--seq-len", "16", "--batch-size", "2", "--out", str(out), "--no-progress",
                 "--no-tensorboard"]) == 0
    assert main(["train", "--backend", "mlx", "--resume", "latest", "--out", str(out),
                 "--steps", "2"]) == 0
    assert "written by the torch backend" in capsys.readouterr().out
    assert [r["step"] for r in records(out)] == [1, 2]
