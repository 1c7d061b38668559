"""Row-wise Triton kernels around the chunked ones: one pass each where torch would take four
or five (float casts, products, sums, permutes), which cost ~2 ms per fwd+bwd at 65,536
tokens x 16 heads before they were folded here.

  _row_delta     delta[b, hq, t] = dy . y (the normalizer's backward input) for the chunked
                 backward (the one-chunk dq kernel forms its rows' own).
  _gate_cumsum   the log-gates [B, T, H] summed from each chunk's start, as [B*H, Tp] rows
                 (zeros past T add no decay): one pass where torch took a permute, a pad and
                 a cumsum (its three cumsums per fwd+bwd took 0.111 ms at 65,536 tokens x
                 16 heads on an H200). With KB, also the one-chunk kernels' key-side gate
                 factors e^{b_R - b_j} (R the last key of j's block), where torch took two
                 more launches per pass.
  _gate_grad     d log_g [B, T, H] from the kernels' row sums: the reversed cumulative sum of
                 dG_t = (sum over the group of q_t.dq_t - k_t.dk_t) / 2 (+ the final state's
                 term at the last step), where torch took a sum, a sub, two flips, a cumsum
                 and a transpose; in spans of the sequence, each starting from the sum of
                 the terms after it (one program per head had scanned 64k tokens in 0.13 ms).
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


@triton.jit(do_not_specialize=["T", "Tp"])
def _gate_cumsum(LG, BG, EK, T, H, Tp, C: tl.constexpr, BT: tl.constexpr, KB: tl.constexpr = 0):
    c0 = tl.program_id(0) * C
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    i = tl.arange(0, BT)
    carry = tl.zeros([], dtype=tl.float32)
    for s in tl.range(0, C, BT):
        t = c0 + s + i
        x = tl.load(LG + (b.to(tl.int64) * T + t) * H + h, mask=t < T, other=0.0)
        y = tl.cumsum(x.to(tl.float32), 0) + carry
        tl.store(BG + bh.to(tl.int64) * Tp + t, y)
        if KB > 0:   # e^{b_R - b_j}, R the last position of j's block of KB keys (KB | BT)
            yb = tl.reshape(y, [BT // KB, KB])
            last = tl.sum(tl.where(tl.arange(0, KB)[None, :] == KB - 1, yb, 0.0), 1)
            tl.store(EK + bh.to(tl.int64) * Tp + t, tl.reshape(tl.exp(last[:, None] - yb), [BT]))
        carry = tl.sum(tl.where(i == BT - 1, y, 0.0), 0)   # the last sum exactly


@triton.jit
def _gate_terms(QDQ, KDK, LAST, b, h, H, T, t, tm, RG: tl.constexpr, HAS_LAST: tl.constexpr):
    """dG_t = (sum over the group of q_t.dq_t - k_t.dk_t) / 2 (+ the final state's term at the
    last step) at positions t, 0 where tm is false."""
    bh = b * H + h
    qdq = tl.zeros(t.shape, dtype=tl.float32)
    for r in tl.static_range(RG):
        qdq += tl.load(QDQ + (bh * RG + r).to(tl.int64) * T + t, mask=tm, other=0.0)
    g = 0.5 * (qdq - tl.load(KDK + bh.to(tl.int64) * T + t, mask=tm, other=0.0))
    if HAS_LAST:
        g += tl.where(t == T - 1, tl.load(LAST + bh), 0.0)
    return tl.where(tm, g, 0.0)


@triton.jit(do_not_specialize=["T"])
def _gate_grad(QDQ, KDK, LAST, DLG, T, H, RG: tl.constexpr, BT: tl.constexpr,
               CT: tl.constexpr, HAS_LAST: tl.constexpr):
    """One program per (KV head, CT positions): the sum of dG over the positions after its
    span (a plain reduction, so long sequences of few heads still fill the GPU), then the
    reversed cumulative sum over its span in blocks of BT."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    i = tl.arange(0, BT)
    end = tl.minimum(tl.program_id(1) * CT + CT, T)
    later = tl.zeros([BT], dtype=tl.float32)
    for t0 in range(end, T, BT):
        later += _gate_terms(QDQ, KDK, LAST, b, h, H, T, t0 + i, t0 + i < T, RG, HAS_LAST)
    carry = tl.sum(later, 0)
    for blk in range(CT // BT):
        t = end - (blk + 1) * BT + i     # from the span's end; the last block may start early
        tm = (t >= tl.program_id(1) * CT) & (t < T)
        g = _gate_terms(QDQ, KDK, LAST, b, h, H, T, t, tm, RG, HAS_LAST)
        y = tl.cumsum(g, 0, reverse=True) + carry
        tl.store(DLG + (b.to(tl.int64) * T + t) * H + h, y, mask=tm)
        carry = tl.sum(tl.where(i == 0, y, 0.0), 0)
