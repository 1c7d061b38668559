"""The torch training step: loss and gradients with accumulation, global-norm clipping and
AdamW whose math is line for line the MLX trainer's (docs/training.md): written out, or (the
CUDA default, TrainConfig.fused_adamw) torch's fused AdamW kernel with the same math, which
needs no temporaries and one pass over the parameters, gradients and moments.

Precision: float32 on the CPU; on CUDA bfloat16 autocast over float32 master weights (the
parameters, gradients and moments stay float32).
"""
from __future__ import annotations

import base64
import math
import os

import numpy as np
import torch

from retention.config import ModelConfig, TrainConfig
from retention.params import decays
from retention.backends.torch.checkpoint_io import load_named_parameters, named_parameters
from retention.backends.torch.loss import IGNORE_INDEX, cross_entropy, uses_fused_loss
from retention.backends.torch.model import build_model

GRAD_NORM_EPS = 1e-6  # clip coefficient = clip_norm / (norm + eps), as torch.nn.utils does


def resolve_device(device: str | None) -> torch.device:
    if device:
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU; "
                             "leave --device out to train on the CPU")
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return precision


def resolve_fused_adamw(setting: bool | None, device: torch.device) -> bool:
    """TrainConfig.fused_adamw: None (auto) = the fused kernel on CUDA, the explicit loop
    elsewhere (the reference the MLX trainer mirrors)."""
    return device.type == "cuda" if setting is None else bool(setting)


def global_grad_norm_squared(grads) -> torch.Tensor:
    """sum_p |g_p|^2 as a 0-d tensor: one norm per tensor (torch._foreach_norm), so no g*g
    temporary the size of the largest parameter."""
    if not grads:
        return torch.zeros(())
    return torch.stack(torch._foreach_norm(list(grads))).square().sum()


class Trainer:
    """Owns the model, the AdamW moments and the step counter of one run on one device."""

    backend = "torch"

    def __init__(self, model_config: ModelConfig, config: TrainConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, self.device)
        if self.device.type == "cpu":
            # The CPU float32 matmul must not silently become TF32-like reduced precision.
            torch.set_float32_matmul_precision("highest")
        self.model = build_model(model_config, seed=config.seed, device=self.device)
        if config.activation_checkpointing or config.compile:
            from retention.backends.torch.fsdp import wrap_layers
            wrap_layers(self.model, config.activation_checkpointing, config.compile)
        self.model.train()
        self.params = named_parameters(self.model)
        self.exp_avg = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.optimizer_step = 0  # AdamW updates applied (skipped steps do not count)

    # --- description ----------------------------------------------------------------------
    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({torch.get_num_threads()} threads)"

    @property
    def fused_adamw(self) -> bool:
        return resolve_fused_adamw(self.config.fused_adamw, self.device)

    def describe(self) -> str:
        adamw = "fused AdamW" if self.fused_adamw else "AdamW"
        return (f"torch {torch.__version__} on {self.device} ({self.device_name}), "
                f"{self.precision}, {adamw}")

    # --- the step -------------------------------------------------------------------------
    def _loss(self, inputs, targets):
        x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.int64)).to(self.device)
        y = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64)).to(self.device)
        # The fused loss (kernels/triton/loss.py) goes with the model's impl, read per call.
        fused = uses_fused_loss(self.model, self.device)
        if self.precision == "bfloat16":
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                logits = self.model(x, upcast=not fused)
        else:
            logits = self.model(x, upcast=not fused)
        if not np.any(np.asarray(targets) != IGNORE_INDEX):
            # Every label masked: a zero loss (as the MLX trainer), not cross_entropy's 0/0 NaN.
            return logits.float().sum() * 0.0
        return cross_entropy(logits, y, fused)

    def _accumulate(self, micro_batches) -> torch.Tensor:
        """Backward over the micro-batches (grads averaged into .grad); their mean loss."""
        for p in self.params.values():
            p.grad = None
        n = len(micro_batches)
        total = torch.zeros((), device=self.device)
        for inputs, targets in micro_batches:
            loss = self._loss(inputs, targets)
            (loss / n).backward()
            total += loss.detach()
        return total / n

    def forward_backward(self, micro_batches) -> tuple[float, float]:
        """Mean loss over the micro-batches and the global gradient norm (grads left in .grad)."""
        mean = self._accumulate(micro_batches)
        norm = torch.sqrt(global_grad_norm_squared(p.grad for p in self.params.values()))
        return mean.item(), norm.item()

    @torch.no_grad()
    def apply_update(self, lr: float, grad_norm: float) -> None:
        """Clip by global norm, then one AdamW step with bias correction; weight decay
        (decoupled) only on the parameters that retention.params.decays names."""
        c = self.config
        clip = 1.0
        if c.clip_norm:
            clip = min(1.0, c.clip_norm / (grad_norm + GRAD_NORM_EPS))
        self.optimizer_step += 1
        views = list(self._update_views())
        if clip < 1.0:  # in place: the gradients are dropped after the step anyway
            torch._foreach_mul_([g for _, _, g, _, _ in views], clip)
        if self.fused_adamw:
            # The kernel walks flat memory: a strided view (none today) takes the explicit loop.
            flat = [all(t.is_contiguous() for t in view[1:]) for view in views]
            self._fused_adamw([v for v, f in zip(views, flat) if f], lr)
            self._explicit_adamw([v for v, f in zip(views, flat) if not f], lr)
        else:
            self._explicit_adamw(views, lr)
        for p in self.params.values():
            p.grad = None

    def _explicit_adamw(self, views, lr: float) -> None:
        c = self.config
        b1, b2 = c.betas
        t = self.optimizer_step
        step_size = lr / (1.0 - b1 ** t)
        bc2_sqrt = math.sqrt(1.0 - b2 ** t)
        for name, p, g, m, v in views:
            m.mul_(b1).add_(g, alpha=1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            if c.weight_decay and decays(name):
                p.mul_(1.0 - lr * c.weight_decay)
            denom = v.sqrt().div_(bc2_sqrt).add_(c.eps)  # the one temporary per parameter
            p.addcdiv_(m, denom, value=-step_size)

    def _fused_adamw(self, views, lr: float) -> None:
        """torch._fused_adamw_ (the kernel of torch.optim.AdamW(fused=True)) on two groups,
        decayed and not: p -= lr wd p; m, v as above; p -= lr/(1-b1^t) m / (sqrt(v)/sqrt(1-b2^t)
        + eps). It reads the step count t from a tensor and updates m and v in place, so
        the moments stay the tensors that checkpoints save."""
        c = self.config
        b1, b2 = c.betas
        decayed = [bool(c.weight_decay) and decays(view[0]) for view in views]
        for decay in (True, False):
            group = [view for view, d in zip(views, decayed) if d == decay]
            if not group:
                continue
            _, ps, gs, ms, vs = (list(x) for x in zip(*group))
            step = torch.full((), float(self.optimizer_step), dtype=torch.float32,
                              device=ps[0].device)
            torch._fused_adamw_(ps, gs, ms, vs, [], [step] * len(ps), lr=lr, beta1=b1,
                                beta2=b2, weight_decay=c.weight_decay if decay else 0.0,
                                eps=c.eps, amsgrad=False, maximize=False)

    def _update_views(self):
        """(name, parameter, gradient, exp_avg, exp_avg_sq) that AdamW updates in place (the
        FSDP trainer yields the local shards)."""
        for name, p in self.params.items():
            yield name, p, p.grad, self.exp_avg[name], self.exp_avg_sq[name]

    def train_step(self, micro_batches, lr: float) -> dict:
        """One optimizer step over `micro_batches` [(inputs_BT, targets_BT) NumPy]; a
        non-finite loss or gradient norm leaves everything unchanged and reports skipped."""
        loss, grad_norm = self.forward_backward(micro_batches)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            for p in self.params.values():
                p.grad = None
            return {"loss": loss, "grad_norm": grad_norm, "skipped": True}
        self.apply_update(lr, grad_norm)
        return {"loss": loss, "grad_norm": grad_norm, "skipped": False}

    @torch.no_grad()
    def eval_loss(self, batches) -> float:
        self.model.eval()
        try:
            losses = [self._loss(x, y) for x, y in batches]
            return torch.stack(losses).mean().item()
        finally:
            self.model.train()

    # --- state in and out (NumPy, canonical names) ----------------------------------------
    def parameters_numpy(self) -> dict[str, np.ndarray]:
        return {n: p.detach().cpu().numpy().copy() for n, p in self.params.items()}

    def load_parameters_numpy(self, tensors: dict) -> None:
        load_named_parameters(self.model, {n: torch.from_numpy(np.asarray(a, np.float32))
                                           for n, a in tensors.items()})

    def optimizer_state_numpy(self) -> dict[str, np.ndarray]:
        out = {f"exp_avg.{n}": m.cpu().numpy().copy() for n, m in self.exp_avg.items()}
        out.update({f"exp_avg_sq.{n}": v.cpu().numpy().copy() for n, v in self.exp_avg_sq.items()})
        return out

    def load_optimizer_state_numpy(self, tensors: dict, optimizer_step: int) -> None:
        for n in self.params:
            self.exp_avg[n].copy_(torch.from_numpy(np.asarray(tensors[f"exp_avg.{n}"])))
            self.exp_avg_sq[n].copy_(torch.from_numpy(np.asarray(tensors[f"exp_avg_sq.{n}"])))
        self.optimizer_step = int(optimizer_step)

    def rng_state(self) -> dict:
        state = {"backend": "torch",
                 "cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
        if self.device.type == "cuda":
            state["cuda"] = base64.b64encode(
                torch.cuda.get_rng_state(self.device).numpy().tobytes()).decode()
        return state

    def set_rng_state(self, state: dict) -> None:
        if state.get("backend") != "torch":
            return  # another backend's generator: nothing here draws from it during training
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cpu"])),
                                             dtype=torch.uint8))
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(torch.frombuffer(
                bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8), self.device)

    # --- memory ---------------------------------------------------------------------------
    def peak_memory_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _process_peak_rss()

    @staticmethod
    def is_out_of_memory(error: BaseException) -> bool:
        text = str(error).lower()  # the CPU allocator says "can't allocate memory"
        return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
            isinstance(error, RuntimeError) and ("out of memory" in text
                                                 or "can't allocate memory" in text))


def _process_peak_rss() -> int | None:
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if os.uname().sysname == "Darwin" else rss * 1024  # macOS bytes, Linux KiB
