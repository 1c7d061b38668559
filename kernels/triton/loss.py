"""Fused cross entropy over the logits of a language-model head, for the torch trainer on CUDA.

The loss of a 65,536-token step over a 50k vocabulary reads and writes the logits many times
when done with torch ops (a float32 copy, log-softmax, its backward, the cast back): about
15% of a small model's step on an H200. Here one program per row reads the logits once in
their own dtype in the forward (a running max and sum of exponentials: the row's log-sum-exp
and loss) and once in the backward, which writes the gradient already scaled by the upstream
gradient (read from memory, no host sync). Forming the gradient in the forward instead costs
a third pass to scale it (and materialized zeros for the unused output). Math in float32;
the gradient is stored in the logits' dtype, as autograd through `logits.float()` casts it.

    cross_entropy(logits_NV, targets_N, ignore_index=-100) -> mean loss over non-ignored rows
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["V", "stride"])
def _ce_fwd(LOGITS, TARGETS, LOSS, LSE, V, stride, ignore_index, BV: tl.constexpr,
            LANE_SUM: tl.constexpr):
    """One row: log-sum-exp by a running max and sum of exponentials, and the row's loss.
    One exp per logit (the block's max first). LANE_SUM keeps the sum per lane, rescaled by
    one exp per block, and reduces it once at the end: one block reduction per block (the
    max) instead of two."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    target = tl.load(TARGETS + row).to(tl.int32)
    valid = target != ignore_index
    cols = tl.arange(0, BV)
    m = float("-inf")
    s = 0.0
    s_lanes = tl.zeros([BV], dtype=tl.float32)
    for off in range(0, V, BV):
        x = tl.load(base + off + cols, mask=off + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # A block of -inf logits (masked vocabulary) must not make -inf - -inf = nan: while
        # the max is -inf, exponentiate against 0 (every term is then 0 anyway).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        if LANE_SUM:
            s_lanes = s_lanes * tl.exp(m - m_ref) + tl.exp(x - m_ref)
        else:
            s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
        m = m_new
    if LANE_SUM:
        s = tl.sum(s_lanes, axis=0)
    lse = m + tl.log(s)
    x_t = tl.load(base + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - x_t, 0.0))
    tl.store(LSE + row, lse)


@triton.jit(do_not_specialize=["V", "stride"])
def _ce_bwd(LOGITS, TARGETS, LSE, SCALE, GRAD, V, stride, ignore_index, BV: tl.constexpr):
    """One row of d loss / d logits = (softmax - onehot) * SCALE on rows that count, else 0;
    SCALE (upstream gradient / count) is read from memory: no host sync."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    target = tl.load(TARGETS + row).to(tl.int32)
    scale = tl.where(target != ignore_index, tl.load(SCALE).to(tl.float32), 0.0)
    lse = tl.load(LSE + row)
    cols = tl.arange(0, BV)
    gbase = GRAD + row * V
    for off in range(0, V, BV):
        c = off + cols
        x = tl.load(base + c, mask=c < V, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(c == target, 1.0, 0.0)) * scale
        tl.store(gbase + c, g.to(GRAD.dtype.element_ty), mask=c < V)


# Launch settings by pass: (logits per block, warps, LANE_SUM for the forward), the fastest
# of `benchmarks/cross_entropy.py --tune` (65,536 x 50,304 bf16 logits, H200, 2026-11-30):
# forward 2.31 ms against 2.57 for (4096, 8, False), before; backward 3.79 ms.
CE_FWD = (2048, 4, True)
CE_BWD = (4096, 8)


def _block(V: int, top: int) -> int:
    return min(top, triton.next_power_of_2(V))


@torch.library.custom_op("retention::triton_cross_entropy", mutates_args=())
def _ce_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over the rows that count, per-row log-sum-exp [N] float32 for the backward)
    for logits [N,V] (unit stride along V), targets [N]."""
    N, V = logits.shape
    loss_rows = torch.empty(N, device=logits.device, dtype=torch.float32)
    lse = torch.empty(N, device=logits.device, dtype=torch.float32)
    if N:
        bv, warps, lane_sum = CE_FWD
        _ce_fwd[(N,)](logits, targets, loss_rows, lse, V, logits.stride(0), ignore_index,
                      BV=_block(V, bv), LANE_SUM=lane_sum, num_warps=warps)
    count = (targets != ignore_index).sum()
    return loss_rows.sum() / count.clamp(min=1), lse


@_ce_op.register_fake
def _ce_fake(logits, targets, ignore_index):
    return (logits.new_empty((), dtype=torch.float32),
            logits.new_empty(logits.shape[:1], dtype=torch.float32))


@torch.library.custom_op("retention::triton_cross_entropy_bwd", mutates_args=())
def _ce_bwd_op(dloss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
               lse: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """d loss / d logits [N,V] in the logits' dtype, for the upstream gradient dloss (0-d)."""
    N, V = logits.shape
    grad = torch.empty((N, V), device=logits.device, dtype=logits.dtype)
    scale = dloss.float() / (targets != ignore_index).sum().clamp(min=1)
    if N:
        bv, warps = CE_BWD
        _ce_bwd[(N,)](logits, targets, lse, scale, grad, V, logits.stride(0), ignore_index,
                      BV=_block(V, bv), num_warps=warps)
    return grad


@_ce_bwd_op.register_fake
def _ce_bwd_fake(dloss, logits, targets, lse, ignore_index):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, targets, ignore_index = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dloss, dlse):
    # The gradient is formed here, already scaled: one read of the logits and one write.
    logits, targets, lse = ctx.saved_tensors
    grad = torch.ops.retention.triton_cross_entropy_bwd(dloss, logits, targets, lse,
                                                        ctx.ignore_index)
    return grad, None, None


_ce_op.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy(logits_NV: torch.Tensor, targets_N: torch.Tensor,
                  ignore_index: int = -100) -> torch.Tensor:
    """Mean cross entropy over the rows whose target is not ignore_index (float32 scalar), as
    F.cross_entropy(logits.float(), targets) but with one read of the logits per pass. All
    rows ignored gives 0 (F.cross_entropy gives nan)."""
    if logits_NV.ndim != 2 or targets_N.shape != logits_NV.shape[:1]:
        raise ValueError(f"expected logits [N,V] and targets [N], got {tuple(logits_NV.shape)} "
                         f"and {tuple(targets_N.shape)}")
    if logits_NV.stride(-1) != 1:
        logits_NV = logits_NV.contiguous()
    loss, _ = torch.ops.retention.triton_cross_entropy(logits_NV, targets_N.contiguous(),
                                                       int(ignore_index))
    return loss
