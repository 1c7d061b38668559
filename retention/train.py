"""`retention.train(config, backend=None)`: the backend-neutral training loop.

The loop owns the schedule, gradient accumulation (the backend's step takes a list of
micro-batches), validation, logging, checkpoints and resume, signals and non-finite steps;
a backend's Trainer (retention/backends/<name>/trainer.py) owns the model, the gradients and
AdamW. Checkpoints hold NumPy copies under canonical names, so either backend resumes them.
"""
from __future__ import annotations

import importlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from retention.config import TrainConfig
from retention.distributed import (QuietLogger, Ranks, distributed_trainer_class, init_ranks,
                                  shard_data)
from retention.metrics import TrainingLogger, flops_per_token, peak_flops
from retention.schedule import learning_rate, schedule_for
from retention.train_checkpoint import (remove_leftovers, tokenizer_json_of,
                                        check_resume_compatible, latest_checkpoint,
                                        load_checkpoint_tensors, read_training_state,
                                        resolve_resume, save_training_checkpoint)
from retention.train_data import SYNTHETIC, SYNTHETIC_VOCAB, Data, build_data, source_names

STATE_FORMAT_VERSION = 1


class TrainingError(RuntimeError):
    """The run stopped for a reason the user can act on (divergence, out of memory)."""


@dataclass
class TrainResult:
    out_dir: Path
    backend: str
    step: int
    tokens_seen: int
    checkpoint: Path | None
    summary: dict
    interrupted: bool = False
    losses: list = field(default_factory=list)
    rank: int = 0                   # of a multi-process run (only rank 0 logs and prints)


# --- signals -------------------------------------------------------------------------------

class StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second SIGINT aborts."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --- the loop ------------------------------------------------------------------------------

def trainer_class(backend: str, ranks: Ranks | None = None):
    from retention.backends import get_backend
    get_backend(backend)  # clear error when the framework is missing
    if ranks is not None and ranks.distributed:
        return distributed_trainer_class(backend)
    return importlib.import_module(f"retention.backends.{backend}.trainer").Trainer


def _oom_message(config: TrainConfig, error: BaseException) -> str:
    b, a, t = config.batch_size, config.grad_accum, config.seq_len
    # The largest proper divisor of b keeps b * a rows per step exactly (none when b is 1).
    smaller = max((d for d in range(1, b) if b % d == 0), default=None)
    split = (f"a smaller batch with gradient accumulation (--batch-size {smaller} --grad-accum "
             f"{a * (b // smaller)} keeps {b * a * t} tokens per step), or "
             if smaller else "")
    return (f"out of memory at batch_size={b}, seq_len={t} ({error}). Try {split}"
            f"a shorter --seq-len {max(1, t // 2)}")


def train(config: TrainConfig, backend: str | None = None) -> TrainResult:
    """Train (or resume) the run that `config` describes on `backend` (default: mlx on Apple
    Silicon, torch elsewhere). Returns when the last step is done or a signal stopped it."""
    from retention import __version__
    from retention.backends import default_backend

    backend = backend or default_backend()
    out_dir = Path(config.out_dir)
    resume_path = resolve_resume(config.resume, out_dir) if config.resume else None
    if resume_path is None and latest_checkpoint(out_dir) is not None:
        raise ValueError(f"{out_dir} already holds a training run; pass --resume latest to "
                         "continue it, or choose another --out directory")

    # Under torchrun/accelerate/mlx.launch: each rank reads its slice of the global batch
    # (batch_size x ranks rows), so steps, tokens and the schedule count global tokens.
    ranks = init_ranks(backend, config.device)
    run = config.replace(batch_size=config.batch_size * ranks.world) if ranks.distributed \
        else config
    say = print if ranks.main else (lambda *a, **k: None)
    ckpt = read_training_state(resume_path) if resume_path else None
    if source_names(config) == [SYNTHETIC]:
        model_config = config.model_config(SYNTHETIC_VOCAB)
        data = build_data(run, model_config.vocab_size)
    else:
        data = build_data(run)
        model_config = config.model_config(data.vocab_size)
        if model_config.vocab_size < data.vocab_size:
            raise ValueError(f"the model's vocab_size {model_config.vocab_size} is smaller than "
                             f"the tokenizer's {data.vocab_size}; raise it or drop the override")
    tokenizer_json = tokenizer_json_of(data.tokenizer)
    if ckpt is not None:
        check_resume_compatible(resume_path, ckpt[0], model_config, tokenizer_json)
    data = shard_data(data, ranks)

    cls = trainer_class(backend, ranks)
    trainer = cls(model_config, config, ranks) if ranks.distributed else cls(model_config, config)
    say(f"backend: {backend}; device: {trainer.describe()}", flush=True)
    total_steps = run.total_steps
    step, tokens_seen, streak = 0, 0, 0
    if ckpt is not None:
        _, state = ckpt
        load_checkpoint_tensors(trainer, resume_path, state["optimizer_step"])
        trainer.set_rng_state(state.get("rng", {}))
        step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
        streak = int(state.get("nonfinite_streak", 0))
        position = state.get("data_position")
        saved = state.get("train_config", {})
        same_data = (saved.get("data") == config.data and saved.get("seq_len") == config.seq_len
                     and saved.get("batch_size", 0) * state.get("world_size", 1)
                     == run.batch_size)
        if position is not None and same_data:
            data.train.load_state_dict(position)
        else:
            say("data, seq_len or global batch size changed since the checkpoint: reading the "
                "data from its start", flush=True)
        say(f"resumed from {resume_path} at step {step} ({tokens_seen:,} tokens seen; "
            f"written by the {state.get('backend')} backend)", flush=True)
        if ranks.main:
            TrainingLogger.truncate(out_dir, step)
        if run.tokens is not None:  # a token budget: what is left at this run's step size
            total_steps = step + max(0, -(-(run.tokens - tokens_seen) // run.tokens_per_step))
    elif ranks.main and (out_dir / "metrics.jsonl").exists():
        (out_dir / "metrics.jsonl").unlink()  # a fresh run starts a fresh log
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out_dir)
        (out_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2)
                                                   + "\n")
    ranks.comm.barrier()

    flops_tok = flops_per_token(model_config, config.seq_len)
    peak = peak_flops(trainer.device_name, trainer.precision, config.peak_flops)
    logger = TrainingLogger(out_dir, config.log_interval, total_steps=total_steps,
                            start_step=step, progress=config.progress,
                            tensorboard=config.tensorboard, wandb_project=config.wandb_project,
                            run_config=config.to_dict()) if ranks.main else QuietLogger()
    schedule = {**schedule_for(run), "total_steps": total_steps}
    checkpoint: Path | None = resume_path
    losses: list[float] = []

    def trainer_state() -> dict:
        return {"format_version": STATE_FORMAT_VERSION, "package_version": __version__,
                "backend": backend, "device": trainer.device_name, "step": step,
                "optimizer_step": trainer.optimizer_step, "tokens_seen": tokens_seen,
                "data_position": data.train.state_dict(), "rng": trainer.rng_state(),
                "schedule": schedule, "nonfinite_streak": streak,
                "train_config": config.to_dict(), "model_config": model_config.to_dict(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **({"world_size": ranks.world} if ranks.distributed else {})}

    def save() -> Path | None:
        nonlocal checkpoint
        try:
            if ranks.distributed:  # collective: every rank writes its part, rank 0 the rest
                path = trainer.save_training_checkpoint(out_dir, model_config, trainer_state(),
                                                        data.tokenizer, config.keep_last)
            else:
                path = save_training_checkpoint(out_dir, model_config, trainer,
                                                trainer_state(), data.tokenizer,
                                                config.keep_last)
        except OSError as e:
            logger.write(f"checkpoint at step {step} failed ({e}); "
                         + (f"the previous checkpoint {checkpoint} is still valid"
                            if checkpoint else "no earlier checkpoint exists"))
            return None
        checkpoint = path
        return path

    interrupted = False
    try:
        with StopFlag() as stop:
            while step < total_steps:
                lr = learning_rate(step, **schedule)
                micro = [data.train.next_batch() for _ in range(config.grad_accum)]
                t0 = time.perf_counter()
                try:
                    result = trainer.train_step(micro, lr)
                except Exception as e:
                    if trainer.is_out_of_memory(e):
                        raise TrainingError(_oom_message(config, e)) from e
                    raise
                elapsed = time.perf_counter() - t0
                step += 1
                tokens_seen += run.tokens_per_step
                tps = run.tokens_per_step / max(elapsed, 1e-9)
                metrics = {"loss": result["loss"], "lr": lr, "grad_norm": result["grad_norm"],
                           "tokens_per_sec": tps, "tokens": tokens_seen,
                           "step_time": elapsed}
                if math.isfinite(result["loss"]):
                    metrics["perplexity"] = math.exp(min(result["loss"], 700.0))
                if peak:  # per device: each rank runs 1/world of the tokens
                    metrics["mfu"] = tps / ranks.world * flops_tok / peak
                mem = trainer.peak_memory_bytes()
                if mem:
                    metrics["peak_memory_gb"] = mem / 1e9
                if result["skipped"]:
                    streak += 1
                    metrics.update(skipped=True, skip_reason=(
                        "non-finite loss" if not math.isfinite(result["loss"])
                        else "non-finite gradient"))
                else:
                    streak = 0
                    losses.append(result["loss"])
                if config.eval_every and (step % config.eval_every == 0 or step == total_steps):
                    val = _validate(trainer, data, config.eval_batches)
                    metrics.update(val_loss=val, val_perplexity=math.exp(min(val, 700.0)))
                logger.log(step, metrics)
                if streak and streak >= config.max_nonfinite:  # 0: stop at the first one
                    path = save()
                    raise TrainingError(
                        f"{streak} non-finite steps in a row at step {step}: the run diverged. "
                        f"Parameters are those of the last good step"
                        + (f", saved to {path}" if path else "")
                        + "; lower --lr, raise warmup_steps or check the data, then resume")
                if ranks.comm.any(stop.signal is not None):  # all ranks stop at one step
                    interrupted = True
                    break
                if config.save_every and step % config.save_every == 0 and step < total_steps:
                    save()
            path = save() if checkpoint is None or not checkpoint.name.endswith(
                f"{step:08d}") else checkpoint
            if interrupted:
                name = signal.Signals(stop.signal).name if stop.signal else "a signal"
                logger.write(f"{name} received: stopped after step {step}; "
                             + (f"checkpoint saved to {path}; continue with --resume latest"
                                if path else "the checkpoint could not be saved"))
    finally:
        logger.close()
    if ranks.distributed:
        trainer.close()  # only after a clean finish: a rank that failed must not wait on others
    summary = logger.get_summary()
    return TrainResult(out_dir, backend, step, tokens_seen, checkpoint, summary, interrupted,
                       losses, ranks.rank)


def _validate(trainer, data: Data, n_batches: int) -> float:
    """Mean loss over the first n validation batches (the same batches every time)."""
    stream = data.make_validation()
    return trainer.eval_loss([stream.next_batch() for _ in range(n_batches)])
