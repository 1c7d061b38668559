"""The one-chunk form without states: causal (q.k)^2 attention with gates, flash-attention
style (training's call on sequences up to ops.QUADRATIC_MAX).

Weights are w_ij = (s q_i.k_j)^2 e^{b_i - b_j} for j <= i, with b the cumulative log-gate
(non-increasing), and y_i = sum_j w_ij v_j / sum_j w_ij. Unlike softmax there is no running
maximum, and the gate is rank one: for a block pair with every key before every query, any
position r between them splits it into e^{b_i - b_r} e^{b_r - b_j}, both factors <= 1 (no
overflow; a factor only underflows where the weight itself does). So off-diagonal blocks
take no exponential per element (at d=64 the exponentials of a block cost about as much
MUFU time as its two dots take on the tensor cores), no mask, and the query-side factor
leaves the loop. Only the blocks on the diagonal take e^{b_i - b_j} per element, masked.

  _attn_fwd  (query block, query head): y and den (den kept for the backward)
  _attn_dq   (query block, query head): dq, and q.dq per row
  _attn_dkv  (key block, KV head): dk and dv over the group's query heads, and k.dk per row

Normalization in the backward: with dnum = dy/den and dden = -(dy.y)/den = -delta/den,
dw_ij = dnum_i.v_j + dden_i = (dy_i.v_j - delta_i)/den_i, and dw/d(q.k) = 2 s^2 (q.k) e^{..}.
The backward kernels read rden = 1/den (rowwise._row_delta), a multiply where a division per
query and block pair would take a dozen instructions.
Gradients are written in the inputs' dtype, with the rows' q.dq and k.dk in float32: the
log-gate gradient is their difference's reversed cumulative sum (ops._log_gate_grad). Gates
come as b [B*H, Tp] float32 with Tp a multiple of every block size.
"""
import triton
import triton.language as tl


@triton.jit
def _query_rows(T, H, Hq, Tp, D_HEAD: tl.constexpr, BM: tl.constexpr):
    """A (query block, query head) program's rows, longest blocks first (the last rows see
    the most keys), the offsets of its query head and KV head, and of its gates' row (in Bg
    and in any [B*H, Tp] array laid out like them)."""
    pm = tl.num_programs(0) - 1 - tl.program_id(0)
    pbh = tl.program_id(1)
    b = pbh // Hq
    hq = pbh % Hq
    h = hq // (Hq // H)
    m0 = pm * BM
    rows = m0 + tl.arange(0, BM)
    qoff = (b.to(tl.int64) * T * Hq + hq) * D_HEAD
    kvoff = (b.to(tl.int64) * T * H + h) * D_HEAD
    goff = (b * H + h).to(tl.int64) * Tp
    return pbh, m0, rows, rows < T, qoff, kvoff, goff


@triton.jit(do_not_specialize=["T", "H", "Hq", "Tp"])
def _attn_fwd(Q, K, V, Bg, EK, Y, DEN, scale, T, H, Hq, Tp,
              D_HEAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              DT: tl.constexpr, PREC: tl.constexpr):
    pbh, m0, rows, rm, qoff, kvoff, goff = _query_rows(T, H, Hq, Tp, D_HEAD, BM)
    gbase = Bg + goff
    cols = tl.arange(0, D_HEAD)
    qrs = Hq * D_HEAD
    krs = H * D_HEAD
    q = tl.load(Q + qoff + rows[:, None] * qrs + cols[None, :], mask=rm[:, None],
                other=0.0).to(DT)
    bq = tl.load(gbase + rows)
    bref = tl.load(gbase + m0)
    acc = tl.zeros([BM, D_HEAD], dtype=tl.float32)
    den = tl.zeros([BM], dtype=tl.float32)
    # Keys before the block: all causal, gate e^{bq - bref} (after the loop) x e^{bref - bk}.
    for kb in tl.range(0, m0, BN):
        kr = kb + tl.arange(0, BN)
        kT = tl.load(K + kvoff + kr[None, :] * krs + cols[:, None])
        s = tl.dot(q, kT.to(DT), input_precision=PREC)
        # e^{bref - b_j} = e^{bref - b_R} (one exponential per block) x EK_j = e^{b_R - b_j}
        col = tl.load(EK + goff + kr) * tl.exp(bref - tl.load(gbase + kb + BN - 1))
        w = s * s * col[None, :]
        vb = tl.load(V + kvoff + kr[:, None] * krs + cols[None, :])
        acc += tl.dot(w.to(DT), vb.to(DT), input_precision=PREC)
        den += tl.sum(w, axis=1)
    eq = tl.exp(bq - bref) * (scale * scale)
    acc = acc * eq[:, None]
    den = den * eq
    # The diagonal block: masked, one exponential per pair.
    for kb in tl.range(0, BM, BN, num_stages=1):
        kr = m0 + kb + tl.arange(0, BN)
        km = kr < T
        kT = tl.load(K + kvoff + kr[None, :] * krs + cols[:, None], mask=km[None, :], other=0.0)
        s = tl.dot(q, kT.to(DT), input_precision=PREC) * scale
        e = tl.where(rows[:, None] >= kr[None, :],
                     tl.exp(bq[:, None] - tl.load(gbase + kr)[None, :]), 0.0)
        w = s * s * e
        vb = tl.load(V + kvoff + kr[:, None] * krs + cols[None, :], mask=km[:, None], other=0.0)
        acc += tl.dot(w.to(DT), vb.to(DT), input_precision=PREC)
        den += tl.sum(w, axis=1)
    y = acc / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(Y + qoff + rows[:, None] * qrs + cols[None, :], y.to(Y.dtype.element_ty),
             mask=rm[:, None])
    tl.store(DEN + pbh.to(tl.int64) * T + rows, den, mask=rm)


@triton.jit(do_not_specialize=["T", "H", "Hq", "Tp"])
def _attn_dq(Q, K, V, Bg, EK, DY, Y, DEN, DELTA, RDEN, CQ, DQ, QDQ, scale, T, H, Hq, Tp,
             D_HEAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             DT: tl.constexpr, PREC: tl.constexpr, TRANS: tl.constexpr, QB: tl.constexpr,
             MATCHED: tl.constexpr = False):
    """dq of BM queries. Off the diagonal the gate splits three ways: e^{b_i - b_m0} / den_i per
    query (m0 the block's first row: it leaves the loop, applied to the sum), one exponential
    e^{b_m0 - b_R} per key block (R its last position) and EK_j = e^{b_R - b_j} per key, read
    from memory (rowwise._gate_cumsum writes it with the gates); every factor <= 1. An
    exponential per key column and thread had cost 74 of 423 instructions per 64 x 64 pair, a
    query factor per pair 2 more per row.
    MATCHED multiplies the query factor (CQ below, of this block's rows: QB = BM) into each
    summand before it is rounded, in _attn_dkv's order, so that dq's and dk's rounded summands
    are the same numbers (the log-gate gradient sums their difference): one multiply more per
    score.

    Before its loop the program forms, for its rows, what the backward's other launches read:
    DELTA = dy.y, RDEN = 1/den and CQ = e^{b_i - b_Q}/den_i (Q the first row of i's block of
    QB rows), zero past T (_attn_dkv reads whole query blocks without masks), [B*Hq, Tp]. A
    row-wise launch and three torch ops had done this, reading dy a second time."""
    pbh, m0, rows, rm, qoff, kvoff, goff = _query_rows(T, H, Hq, Tp, D_HEAD, BM)
    gbase = Bg + goff
    ekbase = EK + goff
    cols = tl.arange(0, D_HEAD)
    qrs = Hq * D_HEAD
    krs = H * D_HEAD
    qp = qoff + rows[:, None] * qrs + cols[None, :]
    q = tl.load(Q + qp, mask=rm[:, None], other=0.0).to(DT)
    dy_in = tl.load(DY + qp, mask=rm[:, None], other=0.0)
    delta = tl.sum(dy_in.to(tl.float32) *
                   tl.load(Y + qp, mask=rm[:, None], other=0.0).to(tl.float32), axis=1)
    dy = dy_in.to(DT)
    den = tl.load(DEN + pbh.to(tl.int64) * T + rows, mask=rm, other=1.0)
    rden = tl.where(rm, 1.0 / tl.where(den > 0, den, 1.0), 0.0)
    bq = tl.load(gbase + rows)
    bref = tl.load(gbase + m0)
    cq = rden * tl.exp(bq - tl.load(gbase + (rows // QB) * QB))
    rowp = pbh.to(tl.int64) * Tp + rows
    tl.store(DELTA + rowp, delta)
    tl.store(RDEN + rowp, rden)
    tl.store(CQ + rowp, cq)
    dq = tl.zeros([BM, D_HEAD], dtype=tl.float32)
    for kb in tl.range(0, m0, BN):
        kr = kb + tl.arange(0, BN)
        kT, vT, kn = _key_tiles(K, V, kvoff, kr, kr, cols, krs, TRANS, False)
        s = tl.dot(q, kT.to(DT), input_precision=PREC)
        p = tl.dot(dy, vT.to(DT), input_precision=PREC)
        ck = tl.load(ekbase + kr) * tl.exp(bref - tl.load(gbase + kb + BN - 1))
        if MATCHED:
            u = s * ck[None, :] * cq[:, None]
        else:
            u = s * ck[None, :]
        dq += tl.dot(((p - delta[:, None]) * u).to(DT), kn.to(DT), input_precision=PREC)
    if not MATCHED:
        dq = dq * (tl.exp(bq - bref) * rden)[:, None]
    for kb in tl.range(0, BM, BN, num_stages=1):
        kr = m0 + kb + tl.arange(0, BN)
        km = kr < T
        kT, vT, kn = _key_tiles(K, V, kvoff, kr, km, cols, krs, TRANS, True)
        s = tl.dot(q, kT.to(DT), input_precision=PREC)
        p = tl.dot(dy, vT.to(DT), input_precision=PREC)
        e = tl.where(rows[:, None] >= kr[None, :],
                     tl.exp(bq[:, None] - tl.load(gbase + kr)[None, :]), 0.0)
        if MATCHED:
            u = s * e * rden[:, None]
        else:
            u = s * (e * rden[:, None])
        dq += tl.dot(((p - delta[:, None]) * u).to(DT), kn.to(DT), input_precision=PREC)
    # dq_i = sum_j 2 s^2 (q_i.k_j) e^{b_i - b_j} dw_ij k_j, dw_ij = (dy_i.v_j - delta_i)/den_i.
    dq = dq * (2.0 * scale * scale)
    tl.store(DQ + qp, dq.to(DQ.dtype.element_ty), mask=rm[:, None])
    tl.store(QDQ + pbh.to(tl.int64) * T + rows, tl.sum(q.to(tl.float32) * dq, axis=1), mask=rm)


@triton.jit
def _key_tiles(K, V, kvoff, kr, km, cols, krs, TRANS: tl.constexpr, MASKED: tl.constexpr):
    """A key block as the query-side backward reads it: k^T, v^T and k (rows km only when
    MASKED). TRANS False loads the transposed tiles as such; True transposes the loaded ones
    (tl.trans of a load, not of a dot result: triton 3.4-3.7.0 miscompiles that on Hopper)."""
    pN = kvoff + kr[:, None] * krs + cols[None, :]
    pT = kvoff + kr[None, :] * krs + cols[:, None]
    if MASKED:
        kn = tl.load(K + pN, mask=km[:, None], other=0.0)
        if TRANS:
            return tl.trans(kn), tl.trans(tl.load(V + pN, mask=km[:, None], other=0.0)), kn
        kT = tl.load(K + pT, mask=km[None, :], other=0.0)
        return kT, tl.load(V + pT, mask=km[None, :], other=0.0), kn
    kn = tl.load(K + pN)
    if TRANS:
        return tl.trans(kn), tl.trans(tl.load(V + pN)), kn
    return tl.load(K + pT), tl.load(V + pT), kn


@triton.jit
def _query_tiles(Q, DY, RDEN, DELTA, qoff, rowbase, qr, cols, qrs, T, TRANS: tl.constexpr):
    """A query block as the key-side program reads it: q and dy both ways round (TRANS as in
    _key_tiles), its row factor (1/den, or the gate factor CQ) and delta, as _attn_dq wrote
    them. No masks (a compare and a select per element and pipeline stage): rows past T read
    row T-1's q and dy, and their zero row factor (_attn_dq writes zeros past T) zeroes
    every term they enter."""
    qc = tl.minimum(qr, T - 1)
    pN = qoff + qc[:, None] * qrs + cols[None, :]
    qn = tl.load(Q + pN)
    dyn = tl.load(DY + pN)
    if TRANS:
        qT = tl.trans(qn)
        dyT = tl.trans(dyn)
    else:
        pT = qoff + qc[None, :] * qrs + cols[:, None]
        qT = tl.load(Q + pT)
        dyT = tl.load(DY + pT)
    return qT, qn, dyT, dyn, tl.load(RDEN + rowbase + qr), tl.load(DELTA + rowbase + qr)


@triton.jit
def _dkv_pair(k, v, qT, qn, dyT, dyn, ck, cq, delta, dk, dv, DT: tl.constexpr,
              PREC: tl.constexpr, PART: tl.constexpr):
    """Adds one (key block, query block) pair: the gate over den is ck * cq (broadcast; [BN, 1]
    x [1, BM] off the diagonal, so no [BN, BM] gate tile is held; the masked [BN, BM]
    exponentials x [1, BM] on it), without the s^2 (and 2 s^2 for dk) that the caller applies
    at the end. The rounded dk summand is _attn_dq's dq summand (the same number when both
    form the gate from the same factors, ops.ATTN_MATCHED): the gate gradient sums q.dq - k.dk
    over all pairs after t, whose bf16 rounding errors then cancel. PART 1 adds dv only, 2 dk
    only, 0 both."""
    sT = tl.dot(k, qT.to(DT), input_precision=PREC)
    if PART != 1:
        pT = tl.dot(v, dyT.to(DT), input_precision=PREC)
    u = sT * ck * cq
    if PART != 2:
        dv += tl.dot((sT * u).to(DT), dyn.to(DT), input_precision=PREC)
    if PART != 1:
        dk += tl.dot(((pT - delta[None, :]) * u).to(DT), qn.to(DT), input_precision=PREC)
    return dk, dv


@triton.jit(do_not_specialize=["T", "H", "Hq", "Tp"])
def _attn_dkv(Q, K, V, Bg, EK, DY, RDEN, CQ, DELTA, DK, DV, KDK, scale, T, H, Hq, Tp,
              D_HEAD: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
              DT: tl.constexpr, PREC: tl.constexpr, TRANS: tl.constexpr, PART: tl.constexpr,
              QB: tl.constexpr = 0):
    """dk and dv of BN keys: the group's queries in BM-row blocks, the diagonal ones masked.
    Off the diagonal the gate is e^{b_R - b_j} per key (R the block's last key), one
    exponential e^{b_Q - b_R} per query block (Q its first row) and CQ_i = e^{b_i - b_Q}/den_i
    per query, read from memory (written by _attn_dq): no exponential per query column and
    thread. PART 0 computes both; 1 only dv and 2 only dk (two launches, fewer live registers
    each, the scores computed twice). QB > 0 (_attn_dq's MATCHED, its BM rows; BN its key
    block): Q is the first row of the query's QB-row block and e^{b_R - b_j} comes from EK
    (rowwise._gate_cumsum), so every factor is the very number _attn_dq forms."""
    pn = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    RG = Hq // H
    n0 = pn * BN
    rows = n0 + tl.arange(0, BN)
    rm = rows < T
    cols = tl.arange(0, D_HEAD)
    qrs = Hq * D_HEAD
    krs = H * D_HEAD
    kp = (b.to(tl.int64) * T * H + h) * D_HEAD + rows[:, None] * krs + cols[None, :]
    k = tl.load(K + kp, mask=rm[:, None], other=0.0).to(DT)
    v = tl.load(V + kp, mask=rm[:, None], other=0.0).to(DT)
    gbase = Bg + bh.to(tl.int64) * Tp
    bk = tl.load(gbase + rows)
    bref = tl.load(gbase + n0 + BN - 1)
    if QB > 0:
        ek = tl.load(EK + bh.to(tl.int64) * Tp + rows)[:, None]
    else:
        ek = tl.exp(bref - bk)[:, None]
    dk = tl.zeros([BN, D_HEAD], dtype=tl.float32)
    dv = tl.zeros([BN, D_HEAD], dtype=tl.float32)
    # Queries after the block: all causal, gate e^{bref - bk} x e^{bq - bref}.
    for r in range(RG):
        hq = h * RG + r
        qoff = (b.to(tl.int64) * T * Hq + hq) * D_HEAD
        rowbase = (b * Hq + hq).to(tl.int64) * Tp
        for qb in tl.range(n0 + BN, T, BM):
            qr = qb + tl.arange(0, BM)
            qT, qn, dyT, dyn, cq, delta = _query_tiles(Q, DY, CQ, DELTA, qoff, rowbase, qr,
                                                       cols, qrs, T, TRANS)
            qref = qb   # Q: the query block's first row, or that of dq's block holding it
            if QB > 0:
                qref = (qb // QB) * QB
            ck = ek * tl.exp(tl.load(gbase + qref) - bref)
            dk, dv = _dkv_pair(k, v, qT, qn, dyT, dyn, ck, cq[None, :], delta, dk, dv, DT, PREC,
                               PART)
    # Queries in the block's own rows: masked, one exponential per pair.
    for r in range(RG):
        hq = h * RG + r
        qoff = (b.to(tl.int64) * T * Hq + hq) * D_HEAD
        rowbase = (b * Hq + hq).to(tl.int64) * Tp
        for qb in tl.range(0, BN, BM, num_stages=1):
            qr = n0 + qb + tl.arange(0, BM)
            qT, qn, dyT, dyn, rden, delta = _query_tiles(Q, DY, RDEN, DELTA, qoff, rowbase, qr,
                                                         cols, qrs, T, TRANS)
            e = tl.where(qr[None, :] >= rows[:, None],
                         tl.exp(tl.load(gbase + qr)[None, :] - bk[:, None]), 0.0)
            dk, dv = _dkv_pair(k, v, qT, qn, dyT, dyn, e, rden[None, :], delta, dk, dv,
                               DT, PREC, PART)
    s2 = scale * scale
    if PART != 1:
        dk = dk * (2.0 * s2)
        tl.store(DK + kp, dk.to(DK.dtype.element_ty), mask=rm[:, None])
        tl.store(KDK + bh.to(tl.int64) * T + rows, tl.sum(k.to(tl.float32) * dk, axis=1),
                 mask=rm)
    if PART != 2:
        tl.store(DV + kp, (dv * s2).to(DV.dtype.element_ty), mask=rm[:, None])
