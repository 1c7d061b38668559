"""Triton kernels of chunked power retention, degree 2 (DESIGN section 1).

A chunk of C tokens is cut into row blocks of BM tokens; the 256 features of a block pair
(I <= J) of the head dim (layout.py) form one feature tile (FW-row halves in the state kernels).
  _chunk_state   one program per (chunk, feature tile, KV head x value tile): the chunk's
                 increment of the state (all chunks in parallel).
  _scan          the carry across chunks, in place: increments -> states entering each chunk
                 (Hst, Zst) and the final state; reversed, the same for gradients.
  _out_fwd       one program per (row block, query head): queries read their chunk's state,
                 plus masked attention over the chunk's earlier keys; y = num / den.
  _chunk_dstate  the chunk's queries' increment of the state gradient (then _scan, reversed).
  _dq_bwd        one program per (row block, query head).
  _dkv_bwd       one program per (row block, KV head), looping over the group's query heads.

Features: the state kernels build a tile phiT[(a,b), t] = x[t, I*16+a] * x[t, J*16+b] as the
product of two exact 0/1 selections E_I^T x^T and E_J^T x^T (SELT tables), which keeps it in
the tensor cores' register layout; the per-block kernels build [BM, 256] tiles from two
[BM, 16] column blocks by broadcasting and tl.reshape, and scatter gradients back the same way
(faster there on an H200: the selection matmuls spilled registers; docs/kernels.md).
Matrix operands are bf16 for bf16 inputs and float32 otherwise (the state of a long sequence
overflows float16); accumulators are float32. No tl.trans: transposed operands are loaded
transposed from memory (Hopper miscompiles tl.trans of a dot result fed to a dot, triton
3.4-3.7.0). Gates: Bg holds log-gates summed from each chunk's start (b_i); queries carry
e^{b_i}, keys e^{b_last - b_j}, the state decays by e^{b_last} per chunk.
"""
import triton
import triton.language as tl

SQRT2 = tl.constexpr(1.4142135623730951)


@triton.jit
def _selT(SELT, which, blk, h, D_HEAD: tl.constexpr, NB: tl.constexpr, FW: tl.constexpr):
    """Rows h*FW.. of the selection SELT[which, blk], [FW, d]: row f picks column
    blk*16 + f//16 (which=0) or blk*16 + f%16 (which=1)."""
    c = tl.arange(0, D_HEAD)
    ff = h * FW + tl.arange(0, FW)
    return tl.load(SELT + ((which * NB + blk) * 256 + ff[:, None]) * D_HEAD + c[None, :])


@triton.jit
def _pair_of(p, NB: tl.constexpr):
    """Block pair (I, J) of tile index p (pairs ordered I <= J, row by row)."""
    I = p * 0
    for i in tl.static_range(1, NB):
        I += (p >= i * NB - (i * (i - 1)) // 2).to(tl.int32)
    J = p - (I * NB - (I * (I - 1)) // 2) + I
    return I, J


@triton.jit(do_not_specialize=["T", "H", "Tp", "N"])
def _chunk_state(K, V, Bg, Hst, Zst, SELT,
                 T, H, Tp, N,
                 D_HEAD: tl.constexpr, DINT: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, FW: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """What chunk n adds to the state: phi(keys discounted to the chunk end)^T v, and sum."""
    NB: tl.constexpr = D_HEAD // 16
    HS: tl.constexpr = 256 // FW
    NV: tl.constexpr = D_HEAD // BV
    n = tl.program_id(0)
    p = tl.program_id(1) // HS
    hs = tl.program_id(1) % HS
    bh = tl.program_id(2) // NV
    pv = tl.program_id(2) % NV
    b = bh // H
    h = bh % H
    I, J = _pair_of(p, NB)
    w = tl.where(I == J, 1.0, SQRT2)
    e1T = _selT(SELT, 0, I, hs, D_HEAD, NB, FW)
    e2T = _selT(SELT, 1, J, hs, D_HEAD, NB, FW)
    cols = tl.arange(0, D_HEAD)
    vc = pv * BV + tl.arange(0, BV)
    bh64 = bh.to(tl.int64)
    rs = H * D_HEAD
    kbase = K + (b.to(tl.int64) * T * H + h) * D_HEAD
    vbase = V + (b.to(tl.int64) * T * H + h) * D_HEAD
    blast = tl.load(Bg + bh64 * Tp + n * C + C - 1)
    S = tl.zeros([FW, BV], dtype=tl.float32)
    z = tl.zeros([FW], dtype=tl.float32)
    for s in range(C // BK):
        t = n * C + s * BK + tl.arange(0, BK)
        tm = t < T
        kfac = tl.exp(blast - tl.load(Bg + bh64 * Tp + t)) * w
        kT = tl.load(kbase + t[None, :] * rs + cols[:, None], mask=tm[None, :], other=0.0).to(DT)
        phiT = (tl.dot(e1T, kT, input_precision=PREC) * tl.dot(e2T, kT, input_precision=PREC)
                * kfac[None, :])
        vb = tl.load(vbase + t[:, None] * rs + vc[None, :], mask=tm[:, None], other=0.0)
        S += tl.dot(phiT.to(DT), vb.to(DT), input_precision=PREC)
        z += tl.sum(phiT, axis=1)
    f = p * 256 + hs * FW + tl.arange(0, FW)
    tl.store(Hst + ((bh64 * N + n) * DINT + f[:, None]) * D_HEAD + vc[None, :], S.to(DT))
    tl.store(Zst + (bh64 * N + n) * DINT + f, z, mask=f < tl.where(pv == 0, DINT, 0))


@triton.jit(do_not_specialize=["N", "L", "Tp"])
def _scan(X, Bg, INIT, FINAL, N, L, Tp, C: tl.constexpr, BL: tl.constexpr,
          HAS_INIT: tl.constexpr, REVERSE: tl.constexpr):
    """In place over chunks: X[n] <- carry, carry <- e^{b_last(n)} carry + X[n].

    Forward: chunk increments become the states entering each chunk, FINAL the last state.
    REVERSE: query-side increments become the gradients of the states after each chunk,
    FINAL the gradient of the initial state."""
    bh = tl.program_id(0)
    offs = tl.program_id(1) * BL + tl.arange(0, BL)
    m = offs < L
    bh64 = bh.to(tl.int64)
    if HAS_INIT:
        carry = tl.load(INIT + bh64 * L + offs, mask=m, other=0.0)
    else:
        carry = tl.zeros([BL], dtype=tl.float32)
    for i in range(N):
        if REVERSE:
            n = N - 1 - i
        else:
            n = i
        decay = tl.exp(tl.load(Bg + bh64 * Tp + n * C + C - 1))
        ptr = X + (bh64 * N + n) * L + offs
        x = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
        tl.store(ptr, carry.to(X.dtype.element_ty), mask=m)
        carry = decay * carry + x
    tl.store(FINAL + bh64 * L + offs, carry, mask=m)


@triton.jit
def _load_pair(base, t, tmask, I, J, row_stride):
    """Columns of blocks I and J of rows t: two [BM, 16] float32 tiles."""
    a = tl.arange(0, 16)
    xi = tl.load(base + t[:, None] * row_stride + (I * 16 + a)[None, :], mask=tmask[:, None],
                 other=0.0).to(tl.float32)
    xj = tl.load(base + t[:, None] * row_stride + (J * 16 + a)[None, :], mask=tmask[:, None],
                 other=0.0).to(tl.float32)
    return xi, xj


@triton.jit(do_not_specialize=["T", "H", "Hq", "Tp", "N"])
def _out_fwd(Q, K, V, Bg, Hst, Zst, Y, DEN, PAIRS, scale,
             T, H, Hq, Tp, N,
             NP: tl.constexpr, D_HEAD: tl.constexpr, DINT: tl.constexpr, C: tl.constexpr,
             BM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    pm = tl.program_id(0)
    pbh = tl.program_id(1)
    b = pbh // Hq
    hq = pbh % Hq
    h = hq // (Hq // H)
    n = (pm * BM) // C
    rows = pm * BM + tl.arange(0, BM)
    rm = rows < T
    cols = tl.arange(0, D_HEAD)
    f = tl.arange(0, 256)
    bh64 = (b * H + h).to(tl.int64)
    qrs = Hq * D_HEAD
    krs = H * D_HEAD
    qbase = Q + (b.to(tl.int64) * T * Hq + hq) * D_HEAD
    kbase = K + (b.to(tl.int64) * T * H + h) * D_HEAD
    vbase = V + (b.to(tl.int64) * T * H + h) * D_HEAD
    bq = tl.load(Bg + bh64 * Tp + rows)
    qfac = scale * scale * tl.exp(bq)
    acc = tl.zeros([BM, D_HEAD], dtype=tl.float32)
    den = tl.zeros([BM], dtype=tl.float32)
    # Queries read the state that entered their chunk.
    for p in range(NP):
        I = tl.load(PAIRS + 2 * p)
        J = tl.load(PAIRS + 2 * p + 1)
        w = tl.where(I == J, 1.0, SQRT2)
        qi, qj = _load_pair(qbase, rows, rm, I, J, qrs)
        phi = tl.reshape(qi[:, :, None] * qj[:, None, :], (BM, 256)) * (w * qfac)[:, None]
        hoff = ((bh64 * N + n) * DINT + p * 256) * D_HEAD
        ht = tl.load(Hst + hoff + f[:, None] * D_HEAD + cols[None, :])
        acc += tl.dot(phi.to(DT), ht, input_precision=PREC)
        zt = tl.load(Zst + (bh64 * N + n) * DINT + p * 256 + f)
        den += tl.sum(phi * zt[None, :], axis=1)
    # Masked attention over this chunk's keys up to the diagonal.
    q = tl.load(qbase + rows[:, None] * qrs + cols[None, :], mask=rm[:, None], other=0.0).to(DT)
    for kb in range(n * C, pm * BM + BM, BM):
        kr = kb + tl.arange(0, BM)
        km = kr < T
        kT = tl.load(kbase + kr[None, :] * krs + cols[:, None], mask=km[None, :], other=0.0)
        s = tl.dot(q, kT.to(DT), input_precision=PREC) * scale
        bk = tl.load(Bg + bh64 * Tp + kr)
        keep = (rows[:, None] >= kr[None, :]) & km[None, :]
        wgt = tl.where(keep, s * s * tl.exp(bq[:, None] - bk[None, :]), 0.0)
        vb = tl.load(vbase + kr[:, None] * krs + cols[None, :], mask=km[:, None], other=0.0)
        acc += tl.dot(wgt.to(DT), vb.to(DT), input_precision=PREC)
        den += tl.sum(wgt, axis=1)
    y = acc / tl.where(den > 0, den, 1.0)[:, None]
    ybase = Y + (b.to(tl.int64) * T * Hq + hq) * D_HEAD
    tl.store(ybase + rows[:, None] * qrs + cols[None, :], y.to(Y.dtype.element_ty),
             mask=rm[:, None])
    tl.store(DEN + pbh.to(tl.int64) * T + rows, den, mask=rm)


@triton.jit(do_not_specialize=["T", "H", "Hq", "Tp", "N"])
def _chunk_dstate(Q, Bg, DY, DEN, DELTA, dHst, dZst, SELT, scale,
                  T, H, Hq, Tp, N,
                  D_HEAD: tl.constexpr, DINT: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, FW: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """What chunk n's queries add to the gradient of the state they read (the group's heads)."""
    NB: tl.constexpr = D_HEAD // 16
    HS: tl.constexpr = 256 // FW
    NV: tl.constexpr = D_HEAD // BV
    n = tl.program_id(0)
    p = tl.program_id(1) // HS
    hs = tl.program_id(1) % HS
    bh = tl.program_id(2) // NV
    pv = tl.program_id(2) % NV
    b = bh // H
    h = bh % H
    RG = Hq // H
    I, J = _pair_of(p, NB)
    w = tl.where(I == J, 1.0, SQRT2)
    e1T = _selT(SELT, 0, I, hs, D_HEAD, NB, FW)
    e2T = _selT(SELT, 1, J, hs, D_HEAD, NB, FW)
    cols = tl.arange(0, D_HEAD)
    vc = pv * BV + tl.arange(0, BV)
    bh64 = bh.to(tl.int64)
    qrs = Hq * D_HEAD
    R = tl.zeros([FW, BV], dtype=tl.float32)
    Rz = tl.zeros([FW], dtype=tl.float32)
    for r in range(RG):
        hq = h * RG + r
        qbase = Q + (b.to(tl.int64) * T * Hq + hq) * D_HEAD
        dybase = DY + (b.to(tl.int64) * T * Hq + hq) * D_HEAD
        rowbase = (b * Hq + hq).to(tl.int64) * T
        for s in range(C // BK):
            t = n * C + s * BK + tl.arange(0, BK)
            tm = t < T
            qfac = scale * scale * tl.exp(tl.load(Bg + bh64 * Tp + t)) * w
            qT = tl.load(qbase + t[None, :] * qrs + cols[:, None], mask=tm[None, :],
                         other=0.0).to(DT)
            phiT = (tl.dot(e1T, qT, input_precision=PREC) * tl.dot(e2T, qT, input_precision=PREC)
                    * qfac[None, :])
            den = tl.load(DEN + rowbase + t, mask=tm, other=1.0)
            den = tl.where(den > 0, den, 1.0)
            dden = -tl.load(DELTA + rowbase + t, mask=tm, other=0.0) / den
            dnum = tl.load(dybase + t[:, None] * qrs + vc[None, :], mask=tm[:, None],
                           other=0.0).to(tl.float32) / den[:, None]
            R += tl.dot(phiT.to(DT), dnum.to(DT), input_precision=PREC)
            Rz += tl.sum(phiT * dden[None, :], axis=1)
    f = p * 256 + hs * FW + tl.arange(0, FW)
    tl.store(dHst + ((bh64 * N + n) * DINT + f[:, None]) * D_HEAD + vc[None, :], R.to(DT))
    tl.store(dZst + (bh64 * N + n) * DINT + f, Rz, mask=f < tl.where(pv == 0, DINT, 0))


@triton.jit
def _scatter_pair(acc3, g, xi, xj, I, J, BM: tl.constexpr, NB: tl.constexpr):
    """acc3 [BM, NB, 16] += d/dx of sum(g * x_I (x) x_J): g is [BM, 256] over the tile."""
    g3 = tl.reshape(g, (BM, 16, 16))
    di = tl.sum(g3 * xj[:, None, :], axis=2)
    dj = tl.sum(g3 * xi[:, :, None], axis=1)
    blk = tl.arange(0, NB)
    acc3 += tl.where((blk == I)[None, :, None], di[:, None, :], 0.0)
    acc3 += tl.where((blk == J)[None, :, None], dj[:, None, :], 0.0)
    return acc3


@triton.jit(do_not_specialize=["T", "H", "Hq", "Tp", "N"])
def _dq_bwd(Q, K, V, Bg, Hst, Zst, DY, DEN, DELTA, DQ, PAIRS, scale,
            T, H, Hq, Tp, N,
            NP: tl.constexpr, D_HEAD: tl.constexpr, DINT: tl.constexpr, C: tl.constexpr,
            BM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    pm = tl.program_id(0)
    pbh = tl.program_id(1)
    b = pbh // Hq
    hq = pbh % Hq
    h = hq // (Hq // H)
    n = (pm * BM) // C
    rows = pm * BM + tl.arange(0, BM)
    rm = rows < T
    cols = tl.arange(0, D_HEAD)
    f = tl.arange(0, 256)
    bh64 = (b * H + h).to(tl.int64)
    qrs = Hq * D_HEAD
    krs = H * D_HEAD
    qbase = Q + (b.to(tl.int64) * T * Hq + hq) * D_HEAD
    kbase = K + (b.to(tl.int64) * T * H + h) * D_HEAD
    vbase = V + (b.to(tl.int64) * T * H + h) * D_HEAD
    dybase = DY + (b.to(tl.int64) * T * Hq + hq) * D_HEAD
    bq = tl.load(Bg + bh64 * Tp + rows)
    qfac = scale * scale * tl.exp(bq)
    den = tl.load(DEN + pbh.to(tl.int64) * T + rows, mask=rm, other=1.0)
    den = tl.where(den > 0, den, 1.0)
    dden = -tl.load(DELTA + pbh.to(tl.int64) * T + rows, mask=rm, other=0.0) / den
    dnum = tl.load(dybase + rows[:, None] * qrs + cols[None, :], mask=rm[:, None],
                   other=0.0).to(tl.float32) / den[:, None]
    dnum_dt = dnum.to(DT)
    NB: tl.constexpr = D_HEAD // 16
    dq3 = tl.zeros([BM, NB, 16], dtype=tl.float32)
    for p in range(NP):
        I = tl.load(PAIRS + 2 * p)
        J = tl.load(PAIRS + 2 * p + 1)
        w = tl.where(I == J, 1.0, SQRT2)
        hoff = ((bh64 * N + n) * DINT + p * 256) * D_HEAD
        htT = tl.load(Hst + hoff + f[None, :] * D_HEAD + cols[:, None])
        zt = tl.load(Zst + (bh64 * N + n) * DINT + p * 256 + f)
        dphi = tl.dot(dnum_dt, htT, input_precision=PREC) + dden[:, None] * zt[None, :]
        qi, qj = _load_pair(qbase, rows, rm, I, J, qrs)
        dq3 = _scatter_pair(dq3, dphi * (w * qfac)[:, None], qi, qj, I, J, BM, NB)
    dq = tl.reshape(dq3, (BM, D_HEAD))
    q = tl.load(qbase + rows[:, None] * qrs + cols[None, :], mask=rm[:, None], other=0.0).to(DT)
    for kb in range(n * C, pm * BM + BM, BM):
        kr = kb + tl.arange(0, BM)
        km = kr < T
        kT = tl.load(kbase + kr[None, :] * krs + cols[:, None], mask=km[None, :], other=0.0)
        kn = tl.load(kbase + kr[:, None] * krs + cols[None, :], mask=km[:, None], other=0.0)
        vT = tl.load(vbase + kr[None, :] * krs + cols[:, None], mask=km[None, :], other=0.0)
        s = tl.dot(q, kT.to(DT), input_precision=PREC) * scale
        bk = tl.load(Bg + bh64 * Tp + kr)
        keep = (rows[:, None] >= kr[None, :]) & km[None, :]
        dw = tl.dot(dnum_dt, vT.to(DT), input_precision=PREC) + dden[:, None]
        ds = tl.where(keep, 2.0 * dw * s * tl.exp(bq[:, None] - bk[None, :]), 0.0)
        dq += tl.dot(ds.to(DT), kn.to(DT), input_precision=PREC) * scale
    dqbase = DQ + (b.to(tl.int64) * T * Hq + hq) * D_HEAD
    tl.store(dqbase + rows[:, None] * qrs + cols[None, :], dq, mask=rm[:, None])


@triton.jit(do_not_specialize=["T", "H", "Hq", "Tp", "N"])
def _dkv_bwd(Q, K, V, Bg, dHst, dZst, DY, DEN, DELTA, DK, DV, PAIRS, scale,
             T, H, Hq, Tp, N,
             NP: tl.constexpr, D_HEAD: tl.constexpr, DINT: tl.constexpr, C: tl.constexpr,
             BM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    pm = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    RG = Hq // H
    n = (pm * BM) // C
    rows = pm * BM + tl.arange(0, BM)
    rm = rows < T
    cols = tl.arange(0, D_HEAD)
    f = tl.arange(0, 256)
    bh64 = bh.to(tl.int64)
    qrs = Hq * D_HEAD
    krs = H * D_HEAD
    kbase = K + (b.to(tl.int64) * T * H + h) * D_HEAD
    vbase = V + (b.to(tl.int64) * T * H + h) * D_HEAD
    bk = tl.load(Bg + bh64 * Tp + rows)
    blast = tl.load(Bg + bh64 * Tp + n * C + C - 1)
    kfac = tl.exp(blast - bk)
    k = tl.load(kbase + rows[:, None] * krs + cols[None, :], mask=rm[:, None], other=0.0).to(DT)
    v = tl.load(vbase + rows[:, None] * krs + cols[None, :], mask=rm[:, None], other=0.0).to(DT)
    NB: tl.constexpr = D_HEAD // 16
    dk3 = tl.zeros([BM, NB, 16], dtype=tl.float32)
    dv = tl.zeros([BM, D_HEAD], dtype=tl.float32)
    # Keys and values wrote the state that left their chunk.
    for p in range(NP):
        I = tl.load(PAIRS + 2 * p)
        J = tl.load(PAIRS + 2 * p + 1)
        w = tl.where(I == J, 1.0, SQRT2)
        ki, kj = _load_pair(kbase, rows, rm, I, J, krs)
        phi = tl.reshape(ki[:, :, None] * kj[:, None, :], (BM, 256)) * (w * kfac)[:, None]
        hoff = ((bh64 * N + n) * DINT + p * 256) * D_HEAD
        dh = tl.load(dHst + hoff + f[:, None] * D_HEAD + cols[None, :])
        dhT = tl.load(dHst + hoff + f[None, :] * D_HEAD + cols[:, None])
        dzt = tl.load(dZst + (bh64 * N + n) * DINT + p * 256 + f)
        dv += tl.dot(phi.to(DT), dh, input_precision=PREC)
        dphi = tl.dot(v, dhT, input_precision=PREC) + dzt[None, :]
        dk3 = _scatter_pair(dk3, dphi * (w * kfac)[:, None], ki, kj, I, J, BM, NB)
    dk = tl.reshape(dk3, (BM, D_HEAD))
    # Later queries of the same chunk attended to these keys.
    cend = tl.minimum(n * C + C, T)
    for r in range(RG):
        hq = h * RG + r
        qbase = Q + (b.to(tl.int64) * T * Hq + hq) * D_HEAD
        dybase = DY + (b.to(tl.int64) * T * Hq + hq) * D_HEAD
        rowbase = (b * Hq + hq).to(tl.int64) * T
        for qb in range(pm * BM, cend, BM):
            qr = qb + tl.arange(0, BM)
            qm = qr < T
            qT = tl.load(qbase + qr[None, :] * qrs + cols[:, None], mask=qm[None, :], other=0.0)
            qn = tl.load(qbase + qr[:, None] * qrs + cols[None, :], mask=qm[:, None], other=0.0)
            bq = tl.load(Bg + bh64 * Tp + qr)
            den = tl.load(DEN + rowbase + qr, mask=qm, other=1.0)
            den = tl.where(den > 0, den, 1.0)
            dden = -tl.load(DELTA + rowbase + qr, mask=qm, other=0.0) / den
            dnum = tl.load(dybase + qr[:, None] * qrs + cols[None, :], mask=qm[:, None],
                           other=0.0).to(tl.float32) / den[:, None]
            dnumT = tl.load(dybase + qr[None, :] * qrs + cols[:, None], mask=qm[None, :],
                            other=0.0).to(tl.float32) / den[None, :]
            sT = tl.dot(k, qT.to(DT), input_precision=PREC) * scale
            keep = (qr[None, :] >= rows[:, None]) & qm[None, :]
            E = tl.exp(bq[None, :] - bk[:, None])
            wT = tl.where(keep, sT * sT * E, 0.0)
            dv += tl.dot(wT.to(DT), dnum.to(DT), input_precision=PREC)
            dwT = tl.dot(v, dnumT.to(DT), input_precision=PREC) + dden[None, :]
            dsT = tl.where(keep, 2.0 * dwT * sT * E, 0.0)
            dk += tl.dot(dsT.to(DT), qn.to(DT), input_precision=PREC) * scale
    dkbase = DK + (b.to(tl.int64) * T * H + h) * D_HEAD
    dvbase = DV + (b.to(tl.int64) * T * H + h) * D_HEAD
    tl.store(dkbase + rows[:, None] * krs + cols[None, :], dk, mask=rm[:, None])
    tl.store(dvbase + rows[:, None] * krs + cols[None, :], dv, mask=rm[:, None])
