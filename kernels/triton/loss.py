"""Fused cross entropy over the logits of a language-model head, for the torch trainer on CUDA.

The loss of a 65,536-token step over a 50k vocabulary reads and writes the logits many times
when done with torch ops (a float32 copy, log-softmax, its backward, the cast back): about
15% of a small model's step on an H200. Here one program per row reads the logits twice in
their own dtype (a running max and sum of exponentials, then the gradient) and writes the
gradient once: loss and gradient are both formed in the forward, and the backward only scales
the saved gradient. Math in float32; the gradient is stored in the logits' dtype, as autograd
through `logits.float()` would cast it.

    cross_entropy(logits_NV, targets_N, ignore_index=-100) -> mean loss over non-ignored rows
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["V", "stride"])
def _ce_fwd_grad(LOGITS, TARGETS, COUNT, LOSS, GRAD, V, stride, ignore_index,
                 BV: tl.constexpr, NEED_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    target = tl.load(TARGETS + row).to(tl.int32)
    valid = target != ignore_index
    cols = tl.arange(0, BV)
    m = tl.full([BV], float("-inf"), tl.float32)   # per-lane running max and sum of exp
    s = tl.zeros([BV], tl.float32)
    for off in range(0, V, BV):
        x = tl.load(base + off + cols, mask=off + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(tl.where(m_new == float("-inf"), 0.0, m - m_new)) + \
            tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new))
        m = m_new
    mx = tl.max(m, axis=0)
    lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), axis=0))
    x_t = tl.load(base + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - x_t, 0.0))
    if not NEED_GRAD:
        return
    # d mean / d logits = (softmax - onehot) / count on rows that count, 0 elsewhere.
    scale = tl.where(valid, 1.0 / tl.maximum(tl.load(COUNT).to(tl.float32), 1.0), 0.0)
    gbase = GRAD + row * V
    for off in range(0, V, BV):
        c = off + cols
        x = tl.load(base + c, mask=c < V, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(c == target, 1.0, 0.0)) * scale
        tl.store(gbase + c, g.to(GRAD.dtype.element_ty), mask=c < V)


@torch.library.custom_op("retention::triton_cross_entropy", mutates_args=())
def _ce_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, need_grad: bool
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, gradient of the mean loss w.r.t. the logits) for logits [N,V], targets [N];
    the gradient is an empty placeholder when need_grad is False (evaluation)."""
    N, V = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    targets = targets.contiguous()
    count = (targets != ignore_index).sum()
    loss_rows = torch.empty(N, device=logits.device, dtype=torch.float32)
    grad = logits.new_empty((N, V) if need_grad else (0,))
    if N:
        _ce_fwd_grad[(N,)](logits, targets, count, loss_rows, grad, V, logits.stride(0),
                           ignore_index, BV=min(4096, triton.next_power_of_2(V)),
                           NEED_GRAD=need_grad, num_warps=8)
    return loss_rows.sum() / count.clamp(min=1), grad


@_ce_op.register_fake
def _ce_fake(logits, targets, ignore_index, need_grad):
    return (logits.new_empty((), dtype=torch.float32),
            logits.new_empty(logits.shape if need_grad else (0,)))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _backward(ctx, dloss, dgrad):
    # Scaled in place: a second pass over a logits-sized tensor and its memory saved (the
    # gradient is this op's own buffer; a graph kept with retain_graph must not reuse it).
    (grad,) = ctx.saved_tensors
    return grad.mul_(dloss.to(grad.dtype)), None, None, None


_ce_op.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy(logits_NV: torch.Tensor, targets_N: torch.Tensor,
                  ignore_index: int = -100) -> torch.Tensor:
    """Mean cross entropy over the rows whose target is not ignore_index (float32 scalar), as
    F.cross_entropy(logits.float(), targets) but with one read of the logits per pass. All
    rows ignored gives 0 (F.cross_entropy gives nan)."""
    if logits_NV.ndim != 2 or targets_N.shape != logits_NV.shape[:1]:
        raise ValueError(f"expected logits [N,V] and targets [N], got {tuple(logits_NV.shape)} "
                         f"and {tuple(targets_N.shape)}")
    need_grad = torch.is_grad_enabled() and logits_NV.requires_grad
    loss, _ = torch.ops.retention.triton_cross_entropy(logits_NV, targets_N, int(ignore_index),
                                                       need_grad)
    return loss
