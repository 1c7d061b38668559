"""Row-wise Triton kernels around the chunked ones: one pass each where torch would take four
or five (float casts, products, sums, permutes), which cost ~2 ms per fwd+bwd at 65,536
tokens x 16 heads before they were folded here.

  _row_delta     delta[b, hq, t] = dy . y (the normalizer's backward input).
  _finish_grads  dq, dk, dv from their float32 accumulators to the input dtype, and the
                 log-gate gradient's summand dG[b, t, h] = (sum over the group of q.dq - k.dk)/2
                 (degree-2 homogeneity; ops._bwd_op explains it).
"""
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T", "Hq"])
def _row_delta(DY, Y, DELTA, T, Hq, D_HEAD: tl.constexpr, BT: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    bq = tl.program_id(1)                      # b * Hq + hq
    b = bq // Hq
    hq = bq % Hq
    tm = t < T
    c = tl.arange(0, D_HEAD)
    off = ((b.to(tl.int64) * T + t) * Hq + hq)[:, None] * D_HEAD + c[None, :]
    dy = tl.load(DY + off, mask=tm[:, None], other=0.0).to(tl.float32)
    y = tl.load(Y + off, mask=tm[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bq.to(tl.int64) * T + t, tl.sum(dy * y, axis=1), mask=tm)


@triton.jit(do_not_specialize=["T", "H", "Hq"])
def _finish_grads(Q, K, DQ32, DK32, DV32, DQ, DK, DV, DG, T, H, Hq,
                  D_HEAD: tl.constexpr, BT: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    bh = tl.program_id(1)                      # b * H + h
    b = bh // H
    h = bh % H
    RG = Hq // H
    tm = t < T
    m = tm[:, None]
    c = tl.arange(0, D_HEAD)
    koff = ((b.to(tl.int64) * T + t) * H + h)[:, None] * D_HEAD + c[None, :]
    k = tl.load(K + koff, mask=m, other=0.0).to(tl.float32)
    dk = tl.load(DK32 + koff, mask=m, other=0.0)
    tl.store(DK + koff, dk.to(DK.dtype.element_ty), mask=m)
    tl.store(DV + koff, tl.load(DV32 + koff, mask=m, other=0.0).to(DV.dtype.element_ty), mask=m)
    dg = -tl.sum(k * dk, axis=1)
    for r in range(RG):
        qoff = ((b.to(tl.int64) * T + t) * Hq + h * RG + r)[:, None] * D_HEAD + c[None, :]
        q = tl.load(Q + qoff, mask=m, other=0.0).to(tl.float32)
        dq = tl.load(DQ32 + qoff, mask=m, other=0.0)
        tl.store(DQ + qoff, dq.to(DQ.dtype.element_ty), mask=m)
        dg += tl.sum(q * dq, axis=1)
    tl.store(DG + (b.to(tl.int64) * T + t) * H + h, dg * 0.5, mask=tm)
