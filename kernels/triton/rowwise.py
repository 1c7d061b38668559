"""Row-wise Triton kernels around the chunked ones: one pass each where torch would take four
or five (float casts, products, sums, permutes), which cost ~2 ms per fwd+bwd at 65,536
tokens x 16 heads before they were folded here.

  _row_delta     delta[b, hq, t] = dy . y (the normalizer's backward input), and with RDEN
                 1/den (1 where den is 0): the one-chunk backward multiplies by it where
                 it divided per query block (a division is a dozen instructions). Rows of
                 TR >= T entries, those past T zero (the one-chunk kernels read whole
                 blocks without masks: a zero 1/den zeroes a padded query's terms).
"""
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T", "Hq"])
def _row_delta(DY, Y, DELTA, DEN, RDEN, T, TR, Hq, D_HEAD: tl.constexpr, BT: tl.constexpr,
               WANT_RDEN: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    bq = tl.program_id(1)                      # b * Hq + hq
    b = bq // Hq
    hq = bq % Hq
    tm = t < T
    c = tl.arange(0, D_HEAD)
    off = ((b.to(tl.int64) * T + t) * Hq + hq)[:, None] * D_HEAD + c[None, :]
    dy = tl.load(DY + off, mask=tm[:, None], other=0.0).to(tl.float32)
    y = tl.load(Y + off, mask=tm[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bq.to(tl.int64) * TR + t, tl.sum(dy * y, axis=1), mask=t < TR)
    if WANT_RDEN:
        den = tl.load(DEN + bq.to(tl.int64) * T + t, mask=tm, other=1.0)
        rden = tl.where(tm, 1.0 / tl.where(den > 0, den, 1.0), 0.0)
        tl.store(RDEN + bq.to(tl.int64) * TR + t, rden, mask=t < TR)
