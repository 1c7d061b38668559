"""The training loss on torch: mean next-token cross entropy over the unmasked labels.

On CUDA (the model's impl resolving to the Triton kernels) it is the fused kernel of
kernels/triton/loss.py, which reads the logits in their compute dtype; elsewhere
F.cross_entropy on float32 logits. Both are the same math.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from retention.backends.torch.power_retention import resolve_impl

IGNORE_INDEX = -100  # labels outside the loss mask (F.cross_entropy's default)


def uses_fused_loss(model, device: torch.device) -> bool:
    """The fused kernel runs wherever the model's power retention runs on the kernels."""
    return resolve_impl(getattr(model, "impl", "auto"), device) == "kernel"


def cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor,
                  fused: bool) -> torch.Tensor:
    """Mean cross entropy over the labels that are not IGNORE_INDEX (float32 scalar)."""
    V = logits_BTV.shape[-1]
    if fused:
        from retention.kernels.triton import cross_entropy as fused_cross_entropy

        return fused_cross_entropy(logits_BTV.reshape(-1, V), targets_BT.reshape(-1),
                                   IGNORE_INDEX)
    return F.cross_entropy(logits_BTV.float().reshape(-1, V), targets_BT.reshape(-1),
                           ignore_index=IGNORE_INDEX)
