"""Row-wise Triton kernels around the chunked ones: one pass each where torch would take four
or five (float casts, products, sums, permutes), which cost ~2 ms per fwd+bwd at 65,536
tokens x 16 heads before they were folded here.

  _row_delta     delta[b, hq, t] = dy . y (the normalizer's backward input).
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
