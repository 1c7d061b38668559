"""Training metrics: the FLOPs model and MFU, and TrainingLogger (metrics.jsonl, a console
progress bar with ETA, TensorBoard and Weights & Biases when installed and asked for)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from retention.config import ModelConfig
from retention.reference import feature_dim

METRICS_FILE = "metrics.jsonl"

# Dense peak FLOP/s per device: (bfloat16/float16, float32 without TF32). Vendor figures
# without sparsity; Apple GPUs are approximate fp32 figures (bf16 runs at about the same rate).
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "h200": (989e12, 67e12),
    "h100 pcie": (756e12, 51e12),
    "h100": (989e12, 67e12),
    "a100": (312e12, 19.5e12),
    "a10g": (70e12, 31.2e12),
    "a10": (125e12, 31.2e12),
    "l40s": (362e12, 91.6e12),
    "l40": (181e12, 90.5e12),
    "l4": (121e12, 30.3e12),
    "rtx 4090": (165e12, 82.6e12),
    "rtx 3090": (71e12, 35.6e12),
    "v100": (125e12, 15.7e12),
    "t4": (65e12, 8.1e12),
    "apple m1 ultra": (21e12, 21e12), "apple m1 max": (10.4e12, 10.4e12),
    "apple m1 pro": (5.2e12, 5.2e12), "apple m1": (2.6e12, 2.6e12),
    "apple m2 ultra": (27.2e12, 27.2e12), "apple m2 max": (13.6e12, 13.6e12),
    "apple m2 pro": (6.8e12, 6.8e12), "apple m2": (3.6e12, 3.6e12),
    "apple m3 ultra": (28e12, 28e12), "apple m3 max": (16.4e12, 16.4e12),
    "apple m3 pro": (7.4e12, 7.4e12), "apple m3": (4.1e12, 4.1e12),
    "apple m4 max": (18.4e12, 18.4e12), "apple m4 pro": (9.2e12, 9.2e12),
    "apple m4": (4.3e12, 4.3e12),
}
# A CPU core with two AVX2/NEON FMA units at ~3 GHz: a rough figure so MFU is not blank.
CPU_FLOPS_PER_CORE = 100e9


def matmul_parameters(config: ModelConfig) -> int:
    """Parameters that take part in matmuls: every projection plus the LM head (tied or not);
    the embedding lookup and the norms cost no FLOPs worth counting."""
    c = config
    per_layer = (2 * c.q_dim * c.d_model + 2 * c.kv_dim * c.d_model + c.n_kv_heads * c.d_model
                 + 3 * c.mlp_hidden * c.d_model)
    return c.n_layers * per_layer + c.vocab_size * c.d_model


def retention_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of power retention per token and layer: the cheaper of its two exact forms
    (the Triton kernels also pick by T). Attention form: token t scores and weights t keys,
    4 d per key and query head, so 2 d (T + 1) on average. Chunked form: the same within a
    chunk of c (2 d (c + 1)) plus, for the share of tokens past the first chunk (1 - c/T),
    reading the D x d state (2 D (d + 1) per query head) and adding keys to it (2 D (d + 1)
    per KV head)."""
    T, d = seq_len, config.head_dim
    c = min(config.chunk_size, T)
    D = feature_dim(d, config.degree)
    attention = 2 * d * (T + 1) * config.n_heads
    chunked = (2 * d * (c + 1) * config.n_heads
               + (1.0 - c / T) * 2 * D * (d + 1) * (config.n_heads + config.n_kv_heads))
    return min(attention, chunked)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 N for the matmuls (forward 2N, backward 4N) plus three times
    the forward retention term in every layer."""
    return (6 * matmul_parameters(config)
            + 3 * config.n_layers * retention_flops_per_token(config, seq_len))


def peak_flops(device_name: str, precision: str = "float32",
               override: float | None = None) -> float | None:
    """Peak FLOP/s of `device_name` at `precision` from PEAK_FLOPS (longest matching name),
    a CPU estimate for CPUs, `override` when given, None when unknown."""
    if override:
        return float(override)
    name = device_name.lower()
    if name.startswith("cpu"):  # MLX names its CPU after the chip: "cpu (Apple M2 Max)"
        return CPU_FLOPS_PER_CORE * (os.cpu_count() or 1)
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in name:
            bf16, fp32 = PEAK_FLOPS[key]
            return bf16 if precision in ("bfloat16", "float16") else fp32
    if "cpu" in name:
        return CPU_FLOPS_PER_CORE * (os.cpu_count() or 1)
    return None


def _number(x):
    """A float from a Python number, NumPy scalar or 0-d framework array (guide passes mx arrays)."""
    if isinstance(x, (bool, str)) or x is None:
        return x
    try:
        return float(x.item()) if hasattr(x, "item") else float(x)
    except (TypeError, ValueError):
        return x


class TrainingLogger:
    """Writes one JSON object per logged step to `<log_dir>/metrics.jsonl`, prints a line every
    `log_interval` steps, and drives a tqdm progress bar (with ETA) when `total_steps` is given.

    TensorBoard event files go to `<log_dir>/tensorboard` when tensorboardX (the `tensorboard`
    extra) is installed; Weights & Biases logs when `wandb_project` is set and wandb is installed.
    """

    def __init__(self, log_dir: str | Path = "logs", log_interval: int = 10, *,
                 total_steps: int | None = None, start_step: int = 0, progress: bool = True,
                 tensorboard: bool = True, wandb_project: str | None = None,
                 run_config: dict | None = None):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_interval = max(1, int(log_interval))
        self.path = self.log_dir / METRICS_FILE
        self.losses: list[float] = []
        self.total_steps = total_steps
        self._t0, self._step0 = time.perf_counter(), start_step
        self._file = open(self.path, "a")
        self._bar = None
        if total_steps is not None and progress:
            from tqdm.auto import tqdm
            # disable=None: no bar when stderr is not a terminal (CI logs, nohup files)
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step",
                             dynamic_ncols=True, file=sys.stderr, leave=True, disable=None)
        # A resumed run redoes the steps after its checkpoint: TensorBoard drops them too.
        self._tb = _tensorboard_writer(self.log_dir / "tensorboard",
                                       start_step + 1 if start_step else None) \
            if tensorboard else None
        self._wandb = _wandb_run(wandb_project, run_config) if wandb_project else None

    @staticmethod
    def truncate(log_dir: str | Path, after_step: int) -> None:
        """Drop records of steps after `after_step` (a resumed run redoes them)."""
        path = Path(log_dir) / METRICS_FILE
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= after_step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": int(step)}
        record.update({k: _number(v) for k, v in metrics.items()})
        loss = record.get("loss")
        if isinstance(loss, float) and math.isfinite(loss):
            self.losses.append(loss)
            record.setdefault("perplexity", math.exp(min(loss, 700.0)))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if self._bar is not None:
            self._bar.update(max(0, step - self._bar.n))
            if isinstance(loss, float):
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step % self.log_interval == 0 or "val_loss" in record or record.get("skipped"):
            line = format_record(record, self.total_steps)
            if self.total_steps and step > self._step0 and step < self.total_steps:
                rate = (time.perf_counter() - self._t0) / (step - self._step0)
                line += f" | eta {format_seconds(rate * (self.total_steps - step))}"
            self.write(line)

    def write(self, line: str) -> None:
        """Print a line without breaking the progress bar."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def get_summary(self) -> dict:
        if not self.losses:
            return {"steps": 0, "avg_loss": float("nan"), "min_loss": float("nan"),
                    "last_loss": float("nan")}
        return {"steps": len(self.losses), "avg_loss": sum(self.losses) / len(self.losses),
                "min_loss": min(self.losses), "last_loss": self.losses[-1]}

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_record(r: dict, total_steps: int | None = None) -> str:
    step = f"step {r['step']}" + (f"/{total_steps}" if total_steps else "")
    parts = [step]
    if r.get("skipped"):
        parts.append(f"skipped ({r.get('skip_reason', 'non-finite')})")
    for key, fmt in (("loss", "loss {:.4f}"), ("perplexity", "ppl {:.2f}"),
                     ("val_loss", "val_loss {:.4f}"), ("val_perplexity", "val_ppl {:.2f}"),
                     ("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"),
                     ("tokens_per_sec", "{:,.0f} tok/s"), ("mfu", "mfu {:.2%}")):
        value = r.get(key)
        if isinstance(value, float) and math.isfinite(value):
            parts.append(fmt.format(value))
    if isinstance(r.get("peak_memory_gb"), float):
        parts.append(f"mem {r['peak_memory_gb']:.2f} GB")
    return " | ".join(parts)


def _tensorboard_writer(path: Path, purge_step: int | None = None):
    """A tensorboardX SummaryWriter (framework-free, the same on both backends), or None when
    it is not installed. Events at steps >= purge_step that earlier writers left are dropped."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(logdir=str(path), purge_step=purge_step or None)


def _wandb_run(project: str, config: dict | None):
    try:
        import wandb
    except ImportError:
        print("wandb_project is set but wandb is not installed (pip install wandb); "
              "logging to metrics.jsonl only", file=sys.stderr)
        return None
    return wandb.init(project=project, config=config or {})
