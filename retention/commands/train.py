"""`retention train`, `retention quickstart` and `retention plot`.

`train` reads an optional run.toml (TrainConfig fields) and applies the flags given on top;
the backend is imported only when training starts.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

# flag -> TrainConfig field, for flags whose value maps one to one
FIELD_FLAGS = {
    "steps": "steps", "tokens": "tokens", "batch_size": "batch_size", "grad_accum": "grad_accum",
    "seq_len": "seq_len", "lr": "lr", "min_lr": "min_lr", "warmup_steps": "warmup_steps",
    "weight_decay": "weight_decay", "clip_norm": "clip_norm", "out": "out_dir",
    "save_every": "save_every", "eval_every": "eval_every", "eval_batches": "eval_batches",
    "keep_last": "keep_last", "log_interval": "log_interval", "seed": "seed",
    "precision": "precision", "device": "device", "peak_flops": "peak_flops",
    "wandb_project": "wandb_project", "tokenizer": "tokenizer", "data_mix": "data_mix",
    "resume": "resume", "schedule": "schedule",
}


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train a model (a run.toml and/or flags)",
                       description="Train a RetentionLLM on MLX or PyTorch. Flags override "
                       "the values of --config.")
    p.add_argument("--config", help="run.toml (or .json) with TrainConfig fields")
    p.add_argument("--backend", choices=["mlx", "torch"],
                   help="default: mlx on Apple Silicon, torch elsewhere")
    p.add_argument("--model", help="preset (tiny, small, medium, large, 7b) or a config.json")
    p.add_argument("--data", nargs="+", help="source name(s) or path(s): builtin, a catalog "
                   "name, files or globs, 'synthetic'")
    p.add_argument("--data-mix", nargs="+", type=float, help="weights of the --data sources")
    p.add_argument("--tokenizer", help="tokenizer path (default: the built-in corpus's)")
    p.add_argument("--steps", type=int)
    p.add_argument("--tokens", type=int, help="train on this many tokens instead of --steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--min-lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--schedule", choices=["cosine", "constant"])
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--clip-norm", type=float, help="global gradient norm; 0 disables")
    p.add_argument("--out", help="run directory (metrics, checkpoints)")
    p.add_argument("--save-every", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--keep-last", type=int, help="checkpoints to keep (0 keeps all)")
    p.add_argument("--log-interval", type=int)
    p.add_argument("--resume", nargs="?", const="latest",
                   help="'latest' (the default when the flag has no value), a run directory "
                   "or a checkpoint directory")
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--device", help="torch: cuda, cuda:1, cpu; mlx: gpu, cpu")
    p.add_argument("--peak-flops", type=float, help="device peak FLOP/s for the MFU estimate")
    p.add_argument("--wandb-project", help="log to Weights & Biases (needs wandb installed)")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="torch: recompute each layer's activations in the backward pass")
    p.add_argument("--compile", action="store_true", help="torch: torch.compile each layer")
    p.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=None,
                   help="torch: AdamW as torch's fused kernel (default: on CUDA only; the "
                   "same math as the explicit loop)")
    p.set_defaults(func=run_train)

    p = sub.add_parser("export", help="write a sharded (torchrun/FSDP) checkpoint in the "
                       "canonical layout (model.safetensors, optimizer.safetensors)",
                       description="Convert the DCP checkpoint of a multi-process torch run "
                       "into config.json + model.safetensors + optimizer.safetensors + "
                       "trainer_state.json, which either backend loads and resumes.")
    p.add_argument("checkpoint", help="a checkpoint directory or a run directory (its latest)")
    p.add_argument("--out", help="write a new checkpoint directory here (default: add the "
                   "files beside dcp/ in the checkpoint itself)")
    p.set_defaults(func=run_export)

    p = sub.add_parser("quickstart", help="train the tiny model for ~100 steps on the "
                       "built-in corpus and generate a sample")
    p.add_argument("--backend", choices=["mlx", "torch"])
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--steps", type=int, default=100)
    p.set_defaults(func=run_quickstart)

    p = sub.add_parser("plot", help="plot a run's loss, validation loss, learning rate and "
                       "throughput to a PNG")
    p.add_argument("run_dir", help="the run's --out directory (or its metrics.jsonl)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/training.png)")
    p.set_defaults(func=run_plot)


def config_from_args(args):
    """TrainConfig from --config, then every flag that was given."""
    from retention.config import ModelConfig, TrainConfig
    data = TrainConfig.load(args.config).to_dict() if args.config else {}
    if args.resume is not None and not args.config:
        # Resuming without a run.toml: the run's own settings, then the flags given now.
        from retention.train_checkpoint import CHECKPOINTS, resolve_resume, saved_train_config
        data = saved_train_config(args.resume, args.out or TrainConfig.out_dir)
        found = resolve_resume(args.resume, args.out or TrainConfig.out_dir)
        if args.out is None and args.resume != "latest" and found.parent.name == CHECKPOINTS:
            # The run goes on where its checkpoint is, not in the out_dir recorded at its
            # start (gone once the run is copied to another machine or folder).
            data["out_dir"] = str(found.parent.parent)
    for flag, name in FIELD_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            data[name] = value
    if args.clip_norm == 0:
        data["clip_norm"] = None
    if args.data:
        data["data"] = args.data[0] if len(args.data) == 1 else list(args.data)
    if args.model:
        if Path(args.model).exists():
            data["model"] = ModelConfig.load(args.model)
        else:
            data["model"] = args.model
    if args.no_tensorboard:
        data["tensorboard"] = False
    if args.no_progress:
        data["progress"] = False
    if args.activation_checkpointing:
        data["activation_checkpointing"] = True
    if args.compile:
        data["compile"] = True
    if getattr(args, "fused_adamw", None) is not None:
        data["fused_adamw"] = args.fused_adamw
    if args.tokens is not None and args.steps is None:
        data["steps"] = None
    if args.steps is not None and args.tokens is None:
        data["tokens"] = None  # --steps given now replaces a token budget of the file/run
    return TrainConfig.from_dict(data)


def run_train(args) -> int:
    from retention.train import TrainingError, train
    config = config_from_args(args)
    try:
        result = train(config, backend=args.backend)
    except TrainingError as e:
        print(f"retention train: {e}", file=sys.stderr)
        return 1
    _print_result(result)
    return 130 if result.interrupted else 0


def run_export(args) -> int:
    from retention.train_checkpoint import export_checkpoint
    path = export_checkpoint(Path(args.checkpoint), Path(args.out) if args.out else None)
    print(f"canonical checkpoint: {path}")
    return 0


def _print_result(result) -> None:
    if result.rank != 0:
        return
    s = result.summary
    if s["steps"]:
        print(f"done: step {result.step}, {result.tokens_seen:,} tokens; loss last "
              f"{s['last_loss']:.4f}, min {s['min_loss']:.4f}, average {s['avg_loss']:.4f}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"metrics:    {Path(result.out_dir) / 'metrics.jsonl'}")


# --- quickstart ----------------------------------------------------------------------------

def quickstart_config(out_dir: str = "runs/quickstart", steps: int = 100):
    """The quick start's run: the tiny preset at the default tokenizer's vocabulary, cut to
    4 layers and 128-token windows (one retention chunk each), so 100 steps fit in under 3
    minutes on a 2-core CPU."""
    from retention.config import TrainConfig
    return TrainConfig(model="tiny", model_overrides={"n_layers": 4, "chunk_size": 128},
                       data="builtin", seq_len=128, batch_size=8, steps=steps, lr=2e-3,
                       min_lr=2e-4, warmup_steps=10, weight_decay=0.1, eval_every=50,
                       eval_batches=4, save_every=0, keep_last=1, log_interval=10,
                       out_dir=out_dir, seed=0)


def clear_previous_run(out: Path) -> None:
    """Remove `out` if it holds an earlier run (train_config.json); refuse any other folder."""
    out = Path(out)
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / "train_config.json").exists():
        raise ValueError(f"{out} is not empty and holds no earlier run; pass another --out")
    shutil.rmtree(out)


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int = 60,
                temperature: float = 0.8, seed: int = 0) -> str:
    """A continuation of `prompt` from retention.generation (plain temperature sampling)."""
    ids = list(tokenizer.encode(prompt))
    try:
        from retention.generation import generate
    except ImportError:
        generate = None
    if generate is not None:
        out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                       seed=seed)
        new = [int(t) for t in out[0][len(ids):]]
    else:
        new = _local_sample(model, ids, max_new_tokens, temperature, seed)
    return prompt + tokenizer.decode(new)


def _local_sample(model, ids, max_new_tokens, temperature, seed) -> list[int]:
    """Fallback sampler: re-runs the whole sequence each token (fine for 60 tokens)."""
    import numpy as np
    from retention.backends import backend_of, get_backend
    backend = get_backend(backend_of(model))
    rng = np.random.default_rng(seed)
    tokens = list(ids)
    for _ in range(max_new_tokens):
        x = backend.from_numpy(np.asarray([tokens], dtype=np.int32 if backend.name == "mlx"
                                          else np.int64))
        logits = backend.to_numpy(model(x))[0, -1].astype(np.float64) / max(temperature, 1e-6)
        p = np.exp(logits - logits.max())
        tokens.append(int(rng.choice(len(p), p=p / p.sum())))
    return tokens[len(ids):]


def run_quickstart(args) -> int:
    from retention.plot import plot_run
    from retention.train import TrainingError, train
    out = Path(args.out)
    clear_previous_run(out)  # a demo: each quick start begins afresh
    config = quickstart_config(str(out), args.steps)
    t0 = time.time()
    try:
        result = train(config, backend=args.backend)
    except TrainingError as e:
        print(f"retention quickstart: {e}", file=sys.stderr)
        return 1
    minutes = (time.time() - t0) / 60
    _print_result(result)
    if result.interrupted:
        return 130
    from retention.backends import get_backend
    from retention.train_data import load_run_tokenizer
    model = get_backend(result.backend).load_model(result.checkpoint)
    tokenizer = load_run_tokenizer(config)
    print(f"\ntrained {result.step} steps in {minutes:.1f} min. A sample (temperature 0.8):\n")
    print(sample_text(model, tokenizer, "In the beginning"))
    try:
        png = plot_run(out)
        print(f"\nplot:       {png}")
    except ImportError as e:
        print(f"\nno plot: {e}")
    print("\nnext: retention train --model tiny --data builtin --steps 2000 --out runs/tiny")
    return 0


def run_plot(args) -> int:
    from retention.plot import plot_run
    path = plot_run(args.run_dir, args.out)
    print(f"wrote {path}")
    return 0
