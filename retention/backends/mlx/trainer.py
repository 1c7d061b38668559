"""The MLX training step: loss and gradients with accumulation, global-norm clipping and an
explicit AdamW whose math is line for line the torch trainer's (docs/training.md).

MLX's own optim.Adam has bias_correction=False by default; we write the update out so both
backends take the same step. Precision: float32 by default; "bfloat16" computes the forward
and backward in bf16 from float32 master weights (gradients and moments stay float32).
"""
from __future__ import annotations

import math
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from retention.config import ModelConfig, TrainConfig
from retention.params import decays
from retention.backends.mlx.checkpoint_io import named_parameters
from retention.backends.mlx.model import build_model

IGNORE_INDEX = -100
GRAD_NORM_EPS = 1e-6  # clip coefficient = clip_norm / (norm + eps), as the torch trainer


def resolve_device(device: str | None):
    if device is None:
        return mx.default_device()
    name = str(device).lower()
    if name not in ("cpu", "gpu", "metal"):
        raise ValueError(f"MLX devices are 'cpu' and 'gpu', not {device!r}")
    return mx.cpu if name == "cpu" else mx.gpu


class Trainer:
    """Owns the model, the float32 master parameters, the AdamW moments and the step count."""

    backend = "mlx"

    def __init__(self, model_config: ModelConfig, config: TrainConfig):
        self.config = config
        self.device = resolve_device(config.device)
        mx.set_default_device(self.device)
        self.precision = "float32" if config.precision == "auto" else config.precision
        self.model = build_model(model_config, seed=config.seed)
        self.model.train()
        self.params = dict(named_parameters(self.model))
        self.exp_avg = {n: mx.zeros_like(p) for n, p in self.params.items()}
        self.exp_avg_sq = {n: mx.zeros_like(p) for n, p in self.params.items()}
        mx.eval(self.exp_avg, self.exp_avg_sq)
        self.optimizer_step = 0  # AdamW updates applied (skipped steps do not count)
        self._value_and_grad = mx.value_and_grad(self._loss_of)

    # --- description ----------------------------------------------------------------------
    @property
    def device_name(self) -> str:
        try:
            name = mx.device_info().get("device_name", "")
        except Exception:
            name = ""
        if self.device == mx.cpu or "gpu" not in str(self.device).lower():
            return f"cpu ({name})" if name else "cpu"
        return name or "gpu"

    def describe(self) -> str:
        return f"mlx {mx.__version__} on {self.device} ({self.device_name}), {self.precision}"

    # --- the step -------------------------------------------------------------------------
    def _sync_model(self) -> None:
        self.model.update(tree_unflatten(list(self.params.items())))

    def _loss_of(self, params: dict, x, y):
        if self.precision == "bfloat16":
            params = {n: p.astype(mx.bfloat16) for n, p in params.items()}
        self.model.update(tree_unflatten(list(params.items())))
        logits = self.model(x).astype(mx.float32)
        y = y.reshape(-1)
        keep = y != IGNORE_INDEX  # labels -100: outside the loss mask (as torch's default)
        ce = nn.losses.cross_entropy(logits.reshape(-1, logits.shape[-1]), mx.where(keep, y, 0))
        return (ce * keep).sum() / mx.maximum(keep.sum(), 1)

    def forward_backward(self, micro_batches) -> tuple[float, float, dict]:
        """Mean loss over the micro-batches, the global gradient norm and the mean gradients."""
        total, grads = self._mean_loss_and_grads(micro_batches)
        norm = mx.sqrt(sum(mx.sum(g * g) for g in grads.values()))
        mx.eval(norm, grads)
        return total.item(), norm.item(), grads

    def _mean_loss_and_grads(self, micro_batches):
        """(mean loss, mean gradients) over the micro-batches, lazy (the data-parallel trainer
        averages them over the ranks)."""
        n = len(micro_batches)
        total, grads = None, None
        for inputs, targets in micro_batches:
            x = mx.array(np.asarray(inputs, dtype=np.int32))
            y = mx.array(np.asarray(targets, dtype=np.int32))
            loss, g = self._value_and_grad(self.params, x, y)
            if grads is None:
                total, grads = loss, g
            else:
                total = total + loss
                grads = {k: grads[k] + g[k] for k in grads}
            mx.eval(total, grads)
        self._sync_model()
        if n > 1:
            grads = {k: g / n for k, g in grads.items()}
            total = total / n
        return total, grads

    def apply_update(self, grads: dict, lr: float, grad_norm: float) -> None:
        """Clip by global norm, then one AdamW step with bias correction; weight decay
        (decoupled) only on the parameters that retention.params.decays names."""
        c = self.config
        b1, b2 = c.betas
        clip = 1.0
        if c.clip_norm:
            clip = min(1.0, c.clip_norm / (grad_norm + GRAD_NORM_EPS))
        self.optimizer_step += 1
        t = self.optimizer_step
        step_size = lr / (1.0 - b1 ** t)
        bc2_sqrt = math.sqrt(1.0 - b2 ** t)
        for name, p in self.params.items():
            g = grads[name]
            if clip < 1.0:
                g = g * clip
            m = self.exp_avg[name] * b1 + g * (1.0 - b1)
            v = self.exp_avg_sq[name] * b2 + (g * g) * (1.0 - b2)
            if c.weight_decay and decays(name):
                p = p * (1.0 - lr * c.weight_decay)
            denom = mx.sqrt(v) / bc2_sqrt + c.eps
            self.params[name] = p - step_size * (m / denom)
            self.exp_avg[name], self.exp_avg_sq[name] = m, v
        mx.eval(self.params, self.exp_avg, self.exp_avg_sq)
        self._sync_model()

    def train_step(self, micro_batches, lr: float) -> dict:
        """One optimizer step over `micro_batches` [(inputs_BT, targets_BT) NumPy]; a
        non-finite loss or gradient norm leaves everything unchanged and reports skipped."""
        loss, grad_norm, grads = self.forward_backward(micro_batches)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return {"loss": loss, "grad_norm": grad_norm, "skipped": True}
        self.apply_update(grads, lr, grad_norm)
        return {"loss": loss, "grad_norm": grad_norm, "skipped": False}

    def eval_loss(self, batches) -> float:
        self.model.eval()
        try:
            losses = [self._loss_of(self.params, mx.array(np.asarray(x, np.int32)),
                                    mx.array(np.asarray(y, np.int32))) for x, y in batches]
            value = mx.mean(mx.stack(losses)).item()
        finally:
            self._sync_model()
            self.model.train()
        return value

    # --- state in and out (NumPy, canonical names) ----------------------------------------
    def parameters_numpy(self) -> dict[str, np.ndarray]:
        return {n: np.array(p) for n, p in self.params.items()}

    def load_parameters_numpy(self, tensors: dict) -> None:
        missing = sorted(set(self.params) - set(tensors))
        if missing:
            raise ValueError(f"parameters missing: {missing[:8]}")
        for n, p in self.params.items():
            a = np.asarray(tensors[n], np.float32)
            if a.shape != tuple(p.shape):
                raise ValueError(f"parameter {n!r} has shape {a.shape}, expected {p.shape}")
            self.params[n] = mx.array(a)
        mx.eval(self.params)
        self._sync_model()

    def optimizer_state_numpy(self) -> dict[str, np.ndarray]:
        out = {f"exp_avg.{n}": np.array(m) for n, m in self.exp_avg.items()}
        out.update({f"exp_avg_sq.{n}": np.array(v) for n, v in self.exp_avg_sq.items()})
        return out

    def load_optimizer_state_numpy(self, tensors: dict, optimizer_step: int) -> None:
        for n in self.params:
            self.exp_avg[n] = mx.array(np.asarray(tensors[f"exp_avg.{n}"], np.float32))
            self.exp_avg_sq[n] = mx.array(np.asarray(tensors[f"exp_avg_sq.{n}"], np.float32))
        mx.eval(self.exp_avg, self.exp_avg_sq)
        self.optimizer_step = int(optimizer_step)

    def rng_state(self) -> dict:
        """MLX has no setter for its global key, so each checkpoint re-seeds it from (seed,
        optimizer step) and records that seed: the run that goes on and the run that resumes
        from the checkpoint then hold the same key."""
        seed = (self.config.seed * 1_000_003 + self.optimizer_step) % 2**32
        mx.random.seed(seed)
        return {"backend": "mlx", "seed": seed}

    def set_rng_state(self, state: dict) -> None:
        if state.get("backend") != "mlx":
            return  # another backend's generator: nothing here draws from it during training
        mx.random.seed(int(state["seed"]))

    # --- memory ---------------------------------------------------------------------------
    def peak_memory_bytes(self) -> int | None:
        if "gpu" in str(self.device).lower():
            return int(mx.get_peak_memory())
        try:
            import resource
        except ImportError:
            return None
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if os.uname().sysname == "Darwin" else rss * 1024

    @staticmethod
    def is_out_of_memory(error: BaseException) -> bool:
        text = str(error).lower()
        return isinstance(error, (RuntimeError, MemoryError)) and (
            "out of memory" in text or "malloc" in text or "allocate" in text)
