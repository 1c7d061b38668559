"""Training edge cases: fully masked batches, token budgets, resume from moved or half-written
runs, out-of-memory advice, failed checkpoint writes, MFU device names (each a past bug)."""
import json
import shutil

import numpy as np
import pytest

from retention.config import ModelConfig, TrainConfig
from retention.train import TrainingError, latest_checkpoint, train
from retention.train_data import SyntheticBatches

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                   mlp_hidden=64, chunk_size=8)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def tiny_config(out, **kw):
    args = dict(model=TINY, data="synthetic", seq_len=16, batch_size=2, steps=4, lr=3e-3,
                min_lr=3e-4, warmup_steps=1, eval_every=0, save_every=0, keep_last=2,
                log_interval=100, out_dir=str(out), progress=False, tensorboard=False)
    args.update(kw)
    return TrainConfig(**args)


def test_fully_masked_micro_batch_matches_across_backends():
    """A micro-batch whose labels are all -100 (a chat prompt longer than the window) adds
    nothing to the loss on both backends; torch used to return NaN and skip the whole step."""
    from retention.backends.mlx.trainer import Trainer as MlxTrainer
    from retention.backends.torch.trainer import Trainer as TorchTrainer
    config = TrainConfig(model=TINY, device="cpu")
    good = SyntheticBatches(64, 16, 2, seed=0).next_batch()
    masked = (good[0], np.full_like(good[1], -100))
    t, m = TorchTrainer(TINY, config), MlxTrainer(TINY, config)
    m.load_parameters_numpy(t.parameters_numpy())
    for micro in ([masked], [good, masked]):
        rt, rm = t.train_step(micro, 1e-3), m.train_step(micro, 1e-3)
        assert not rt["skipped"] and not rm["skipped"]
        assert rt["loss"] == pytest.approx(rm["loss"], rel=1e-5, abs=1e-7)
        assert rt["grad_norm"] == pytest.approx(rm["grad_norm"], rel=1e-4, abs=1e-7)
    assert t.eval_loss([masked]) == m.eval_loss([masked]) == 0.0


def test_max_nonfinite_zero_does_not_stop_a_healthy_run(tmp_path):
    """max_nonfinite=0 (no tolerance) used to stop after the first, finite, step."""
    result = train(tiny_config(tmp_path, max_nonfinite=0), "torch")
    assert result.step == 4


def test_max_nonfinite_zero_stops_at_the_first_non_finite_step(tmp_path, monkeypatch):
    from retention.backends.torch import trainer as torch_trainer
    original = torch_trainer.Trainer.forward_backward
    calls = {"n": 0}

    def flaky(self, micro):
        calls["n"] += 1
        loss, norm = original(self, micro)
        return (float("nan"), norm) if calls["n"] == 2 else (loss, norm)

    monkeypatch.setattr(torch_trainer.Trainer, "forward_backward", flaky)
    with pytest.raises(TrainingError, match="1 non-finite steps in a row at step 2"):
        train(tiny_config(tmp_path, max_nonfinite=0), "torch")


def test_mlx_on_the_cpu_of_a_mac_is_not_measured_against_the_gpu_peak():
    """MLX names its CPU device after the chip ("cpu (Apple M2 Max)"); MFU must use the CPU
    estimate, not the chip's GPU figure."""
    from retention.metrics import CPU_FLOPS_PER_CORE, peak_flops
    import os
    assert peak_flops("cpu (Apple M2 Max)") == CPU_FLOPS_PER_CORE * (os.cpu_count() or 1)
    assert peak_flops("Apple M2 Max") == 13.6e12


@pytest.mark.parametrize("batch, accum, suggested", [(1, 1, None), (3, 2, (1, 6)),
                                                     (6, 1, (3, 2)), (2, 1, (1, 2))])
def test_out_of_memory_advice_keeps_the_tokens_per_step(batch, accum, suggested):
    from retention.train import _oom_message
    text = _oom_message(tiny_config("unused", batch_size=batch, grad_accum=accum),
                        RuntimeError("out of memory"))
    if suggested is None:  # nothing to split: only a shorter window helps
        assert "--batch-size" not in text and "--seq-len 8" in text
    else:
        b, a = suggested
        assert f"--batch-size {b} --grad-accum {a} keeps {batch * accum * 16} tokens" in text
        assert b * a == batch * accum


def test_resume_a_moved_run_from_the_cli_continues_in_that_directory(tmp_path, capsys):
    """`retention train --resume RUN_DIR` (no --out) continues in RUN_DIR, not in the out_dir
    recorded when the run started (gone after a copy to another machine or folder)."""
    from retention.cli import main
    first, moved = tmp_path / "first", tmp_path / "moved"
    TINY.save(tmp_path / "model.json")
    assert main(["train", "--backend", "torch", "--model", str(tmp_path / "model.json"),
                 "--data", "synthetic", "--steps", "2", "--seq-len", "16", "--batch-size", "2",
                 "--out", str(first), "--no-progress", "--no-tensorboard"]) == 0
    shutil.move(first, moved)
    assert main(["train", "--backend", "torch", "--resume", str(moved), "--steps", "3"]) == 0
    capsys.readouterr()
    assert not first.exists()
    assert latest_checkpoint(moved).name == "step_00000003"
    steps = [json.loads(l)["step"] for l in (moved / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_resume_accepts_the_latest_pointer_file(tmp_path):
    from retention.train_checkpoint import resolve_resume
    train(tiny_config(tmp_path, steps=2), "torch")
    pointer = tmp_path / "checkpoints" / "latest"
    assert resolve_resume(str(pointer), "unused") == latest_checkpoint(tmp_path)


def test_token_budget_resumed_with_another_batch_size_trains_the_remaining_tokens(tmp_path):
    """--tokens counts tokens: resumed at another global batch (more ranks, another
    --batch-size), the run stops when the budget is spent, not at the new batch's step count."""
    budget = 8 * 2 * 16
    train(tiny_config(tmp_path, steps=None, tokens=budget, save_every=4), "torch")
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000008")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000004\n")
    result = train(tiny_config(tmp_path, steps=None, tokens=budget, batch_size=4,
                               resume="latest"), "torch")
    assert result.tokens_seen == budget and result.step == 6
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["schedule"]["total_steps"] == 6


def test_disk_full_inside_safetensors_keeps_training(tmp_path, monkeypatch, capsys):
    """safetensors reports a failed write (disk full) as SafetensorError, not OSError: the
    documented "a line says so, and training goes on" must hold for it too."""
    import safetensors.numpy
    from safetensors import SafetensorError
    real = safetensors.numpy.save_file
    calls = {"n": 0}

    def disk_full(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:  # the model file of the second checkpoint
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  "(os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    result = train(tiny_config(tmp_path, steps=6, save_every=2, keep_last=0), "torch")
    out = capsys.readouterr().out
    assert "checkpoint at step 4 failed" in out and "No space left" in out
    assert result.step == 6 and result.checkpoint.name == "step_00000006"
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000002", "step_00000006"]


def test_mlx_rank0_checkpoint_failure_of_any_kind_reaches_every_rank(tmp_path, monkeypatch):
    """Rank 0 writes the MLX data-parallel checkpoint; if it fails with anything but OSError
    (a tokenizer error, a SafetensorError) it must still join the vote, or the other ranks
    wait for it forever. As the FSDP trainer, every failure becomes the loop's OSError."""
    import retention.train_checkpoint as tc
    from retention.backends.mlx.distributed import DistributedTrainer
    from retention.distributed import Ranks

    class Comm:
        group, votes = None, []

        def any(self, flag):
            self.votes.append(flag)
            return flag

    def broken(*args, **kwargs):
        raise ValueError("tokenizer could not be saved")

    comm = Comm()
    trainer = DistributedTrainer(TINY, tiny_config(tmp_path), Ranks(0, 2, 0, comm))
    monkeypatch.setattr(tc, "save_training_checkpoint", broken)
    with pytest.raises(OSError, match="tokenizer could not be saved"):
        trainer.save_training_checkpoint(tmp_path, TINY, {"step": 1}, None, 0)
    assert comm.votes == [True]


def test_resume_with_another_tokenizer_names_the_tokenizer_not_the_model(tmp_path):
    """With a preset the vocabulary follows the tokenizer, so a different tokenizer also
    changes vocab_size; the error must say to pass the checkpoint's tokenizer (the cause), not
    'the same --model' (which the user did pass)."""
    from retention.data.tokenizer import train_bpe
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(f"document {i} says hello to the quick brown fox {i * 7}"
                                for i in range(100)))
    for name, size in (("a", 300), ("b", 320)):
        train_bpe([text.read_text()], vocab_size=size, name=name).save(tmp_path / f"tok_{name}")
    small = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_hidden=64,
                 chunk_size=8)
    cfg = tiny_config(tmp_path / "run", model="tiny", model_overrides=small, data=str(text),
                      steps=1, tokenizer=str(tmp_path / "tok_a"))
    train(cfg, "torch")
    with pytest.raises(ValueError, match="different tokenizer.*--tokenizer"):
        train(cfg.replace(tokenizer=str(tmp_path / "tok_b"), steps=2, resume="latest"), "torch")


def test_resumed_tensorboard_log_drops_the_steps_that_are_redone(tmp_path, monkeypatch):
    """metrics.jsonl is cut back to the checkpoint's step on resume; the TensorBoard writer
    must drop those steps too (purge_step), or the redone steps are drawn twice."""
    import retention.metrics as metrics
    opened = []

    def fake_writer(path, purge_step=None):
        opened.append(purge_step)
        return None

    monkeypatch.setattr(metrics, "_tensorboard_writer", fake_writer)
    metrics.TrainingLogger(tmp_path, tensorboard=True).close()
    metrics.TrainingLogger(tmp_path, tensorboard=True, start_step=40).close()
    assert opened == [None, 41]


def test_a_token_budget_alone_decides_the_length(tmp_path):
    """`tokens = ...` in a run.toml (or TrainConfig(tokens=...)) without `steps` used to be
    ignored: steps keeps its default of 1000, and steps won."""
    path = tmp_path / "run.toml"
    path.write_text("tokens = 8192\nbatch_size = 2\nseq_len = 16\n")
    assert TrainConfig.load(path).total_steps == 256
    assert TrainConfig(tokens=8192, batch_size=2, seq_len=16).total_steps == 256


def test_steps_flag_overrides_a_token_budget_of_the_file(tmp_path):
    import argparse
    from retention.commands.train import add_commands, config_from_args
    path = tmp_path / "run.toml"
    path.write_text("tokens = 8192\nbatch_size = 2\nseq_len = 16\n")
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--config", str(path), "--steps", "7"])
    assert config_from_args(args).total_steps == 7
    args = parser.parse_args(["train", "--config", str(path), "--tokens", "320"])
    assert config_from_args(args).total_steps == 10


def test_torch_cpu_allocation_failure_counts_as_out_of_memory():
    """torch's CPU allocator says "can't allocate memory", not "out of memory": the run must
    stop with the smaller-batch advice, as on CUDA and on MLX."""
    import torch
    from retention.backends.torch.trainer import Trainer
    try:
        torch.empty(2 ** 50, dtype=torch.uint8)
    except RuntimeError as e:
        error = e
    else:  # pragma: no cover - a machine with a petabyte of memory
        pytest.skip("the allocation succeeded")
    assert Trainer.is_out_of_memory(error)
    assert not Trainer.is_out_of_memory(RuntimeError("shape mismatch"))


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    """`latest` naming a checkpoint that is gone (deleted by hand to roll back, or a kill
    between the first checkpoint's rename and the pointer write) must not make the run
    directory look empty: --resume latest said "no checkpoint", and a new run overwrote it."""
    train(tiny_config(tmp_path, steps=2, save_every=1, keep_last=0), "torch")
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000002")
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    with pytest.raises(ValueError, match="already holds a training run"):
        train(tiny_config(tmp_path, steps=2), "torch")
    (tmp_path / "checkpoints" / "latest").unlink()
    result = train(tiny_config(tmp_path, steps=3, resume="latest"), "torch")
    assert result.step == 3
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_peak_flops_tells_the_l40_from_the_l4():
    from retention.metrics import peak_flops
    assert peak_flops("NVIDIA L40", "bfloat16") == 181e12
    assert peak_flops("NVIDIA L40S", "bfloat16") == 362e12
    assert peak_flops("NVIDIA L4", "bfloat16") == 121e12


def test_zero_eval_batches_is_refused_with_the_way_to_turn_validation_off():
    from retention.config import TrainConfig
    with pytest.raises(ValueError, match="eval_every = 0"):
        TrainConfig(eval_batches=0)
