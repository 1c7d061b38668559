"""Triton kernels of chunked power retention, degree 2 (DESIGN section 1), in the "row a" form.

Internal layout (layout.py): the state holds, for each head-dim row a (block I = a // 16), the
features x_a x_b for b in [16 I, d), weight sqrt(2) when b is in a later block; D_int rows of
d values. The denominator's state is the d x d Gram matrix Z = sum k k^T (phi(q).z = q^T Z q).
Every state matmul is then a plain dot with one operand scaled by one column x_a: no feature
tile is ever reshaped. In the row-block kernels the scaled [rows, W] tile of x stays in the
wgmma register layout (A operand from registers) while the pipeliner streams the state rows;
in the scan the B operand carries the scale, rebuilt in shared memory per row a: by default
(TRANS) x's block columns, W_I wide, against y^T straight from shared memory; otherwise the
values tile against x^T (_scaled_dot, _paired_dot).

  _state_scan   one program per (group of AG rows a | the Gram matrix, value tile, KV head)
                walks every chunk: stores the state entering the chunk, decays, adds the chunk.
                REVERSE: the same for the state gradients, from the queries' dnum = dy/den.
  _out_fwd      one program per (row block, query head): state read + masked intra-chunk
                attention; y = num / den.
  _dq_bwd       one program per (row block, query head).
  _dkv_bwd      one program per (row block, KV head), looping over the group's query heads.

Row-block gradients through the features: for f = sum_a sum_b fac w_ab x_a x_b U[a,b],
df/dx_a (x_a as the row) is a column of the result and df/dx_b a [rows, W] tile; both are
added into the fp32 output in global memory (read-modify-write between barriers: one
program owns its rows). Matrix operands are bf16 for bf16 inputs and float32 otherwise;
accumulators float32. No tl.trans (Hopper miscompiles tl.trans of a dot result fed to a dot,
triton 3.4-3.7.0): transposed operands are loaded transposed. Gates: Bg holds log-gates summed
from each chunk's start (b_i); queries carry e^{b_i}, keys e^{b_last - b_j}, the state decays
by e^{b_last} per chunk; every factor is <= 1.
"""
import triton
import triton.language as tl

SQRT2 = tl.constexpr(1.4142135623730951)


# --- the state scan -------------------------------------------------------------------------
@triton.jit
def _src_tile(xbase, t, tm, xrs, rows_b, bmask):
    """x^T rows b, tokens t: [d, BK] in the input dtype."""
    return tl.load(xbase + t[None, :].to(tl.int64) * xrs + rows_b[:, None],
                   mask=bmask[:, None] & tm[None, :], other=0.0)


@triton.jit
def _scaled_dot(xT, yb, scale_t, acc, BSIDE: tl.constexpr, DT: tl.constexpr,
                PREC: tl.constexpr):
    """acc += x^T diag(scale_t) y. BSIDE scales y's rows (a new shared-memory B operand per
    call, x^T feeds the tensor cores straight from shared memory); else x^T's columns in
    registers (A operand). The transposed scan (TRANS) passes y^T as xT and x as yb."""
    if BSIDE:
        return tl.dot(xT.to(DT), (yb * scale_t[:, None]).to(DT), acc, input_precision=PREC)
    else:
        return tl.dot((xT.to(tl.float32) * scale_t[None, :]).to(DT), yb.to(DT), acc,
                      input_precision=PREC)


@triton.jit
def _store_rows(ptr, acc, wcol, smask, row_step, PAIR: tl.constexpr):
    """Store an accumulator times the feature weights: one row a, or (PAIR) two side by side
    (interleaved columns, _paired_dot), the second row_step elements after the first."""
    if PAIR:
        a, b = tl.split(tl.reshape(acc, [acc.shape[0], acc.shape[1] // 2, 2]))
        tl.store(ptr, (a * wcol).to(ptr.dtype.element_ty), mask=smask)
        tl.store(ptr + row_step, (b * wcol).to(ptr.dtype.element_ty), mask=smask)
    else:
        tl.store(ptr, (acc * wcol).to(ptr.dtype.element_ty), mask=smask)


@triton.jit
def _store_accs(ptr, acc0, acc1, acc2, acc3, wcol, smask, row_step, NS: tl.constexpr,
                PAIR: tl.constexpr):
    """Store a program's NS accumulators, rows a in order from ptr (_store_rows each)."""
    RP: tl.constexpr = 2 if PAIR else 1
    _store_rows(ptr, acc0, wcol, smask, row_step, PAIR)
    if NS > 1:
        _store_rows(ptr + RP * row_step, acc1, wcol, smask, row_step, PAIR)
    if NS > 2:
        _store_rows(ptr + 2 * RP * row_step, acc2, wcol, smask, row_step, PAIR)
        _store_rows(ptr + 3 * RP * row_step, acc3, wcol, smask, row_step, PAIR)


@triton.jit
def _load_rows(ptr, wcol, smask, row_step, PAIR: tl.constexpr):
    """The inverse of _store_rows: unweighted float32 rows."""
    a = tl.load(ptr, mask=smask, other=0.0) / wcol
    if PAIR:
        b = tl.load(ptr + row_step, mask=smask, other=0.0) / wcol
        return tl.reshape(tl.join(a, b), [a.shape[0], 2 * a.shape[1]])
    else:   # a static else: the compiler rejects returns of two shapes otherwise
        return a


@triton.jit
def _paired_dot(xT, yb, s0, s1, acc, DT: tl.constexpr, PREC: tl.constexpr):
    """acc += x^T [diag(s0) y | diag(s1) y], the two scaled values tiles interleaved by column
    (column 2v + j is tile j's column v): one dot of twice the width instead of two."""
    y2 = tl.reshape(tl.join((yb * s0[:, None]).to(DT), (yb * s1[:, None]).to(DT)),
                    [yb.shape[0], 2 * yb.shape[1]])
    return tl.dot(xT.to(DT), y2, acc, input_precision=PREC)


@triton.constexpr_function
def _wide_rows(d):
    """Rows a < d/2 have blocks wider than d/2 (W_I = d - 16 I); at d=16 every row's is d."""
    return d // 2 if d >= 32 else d


@triton.jit(do_not_specialize=["T", "H", "Hq", "Tp", "N"])
def _state_scan(X, Yv, Bg, DEN, DELTA, INIT_S, INIT_Z, Sst, Zst, FIN_S, FIN_Z, scale,
                T, H, Hq, Tp, N,
                D_HEAD: tl.constexpr, DINT: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                AG: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BSIDE: tl.constexpr,
                STORE_FIN: tl.constexpr, PAIR: tl.constexpr = False,
                TRANS: tl.constexpr = False, VEC: tl.constexpr = False,
                AGN: tl.constexpr = 0, PRE: tl.constexpr = False):
    """Forward (X = k, Yv = v): Sst[n] = state entering chunk n, FIN = final state.
    REVERSE (X = q, Yv = dy, over the group's query heads): Sst[n] = gradient of the state
    leaving chunk n, FIN = gradient of the initial state. Program axis 1: groups of AG rows a
    (all in one 16-block), the last one the Gram matrix Z (rows a = all of d, unweighted).
    The two kinds of program are separate static paths, so each token loop is pipelined.
    STORE_FIN: write FIN (a [B*H, Di, d] float32 store: skipped when nobody reads it).
    PAIR (with BSIDE, AG even): rows a come in pairs whose values tiles sit side by side, one
    [d, 2 BV] accumulator and one dot of twice the width per pair instead of two.
    TRANS: the accumulators hold the state rows transposed, [values, features]: the dot is
    y^T diag(x_a fac) x[:, block I's columns], so the MMA width (and with BSIDE the rebuilt
    operand) is W_I rounded up to a power of two instead of d: a block of 16 features costs a
    quarter of a block of 64 (in the [features, values] form M is d for every block). Without
    BSIDE, y^T diag(x_a fac) is formed in registers per row a and x's columns feed the tensor
    cores from shared memory as loaded, with no tile rebuilt.
    VEC: the columns x_a of a token's AG rows in one vector load (_scan_cols).
    PRE: the tokens' log-gates (and den, delta in REVERSE) loaded one step ahead into
    registers, as x_a are (_scan_tokens), instead of through the pipeliner's shared-memory
    buffers: 0.5-1 KB less shared memory per program.
    AGN: rows a per program for the rows a >= d/2 (W_I <= d/2: with TRANS a program of
    AGN = 2 AG rows rebuilds no more columns per step than one of the wider rows), AG for
    the others; 0 means AG.
    Grid (B*H*NV, (d/2)/AG + (d/2)/AGN + 1; d/AG + 1 at d=16): blocks launch x-fastest, so
    the cheap Gram programs come last and fill the tail of the last wave."""
    g = tl.program_id(1)
    AGR: tl.constexpr = AGN if AGN > 0 else AG
    tl.static_assert(TRANS or AGR == AG)   # the untransposed path groups every row by AG
    HALF: tl.constexpr = _wide_rows(D_HEAD)
    NWIDE: tl.constexpr = HALF // AG      # programs of the rows a < d/2 (W_I > d/2)
    if g == NWIDE + (D_HEAD - HALF) // AGR:
        _scan_rows(X, Yv, Bg, DEN, DELTA, INIT_Z, Zst, FIN_Z, scale, T, H, Hq, Tp, N, 0,
                   D_HEAD, DINT, C, BK, AG, BV, DT, PREC, HAS_INIT, REVERSE, BSIDE, STORE_FIN,
                   True, False, VEC=VEC, PRE=PRE)
    elif not TRANS:
        _scan_rows(X, Yv, Bg, DEN, DELTA, INIT_S, Sst, FIN_S, scale, T, H, Hq, Tp, N, g * AG,
                   D_HEAD, DINT, C, BK, AG, BV, DT, PREC, HAS_INIT, REVERSE, BSIDE, STORE_FIN,
                   False, PAIR, VEC=VEC, PRE=PRE)
    elif g < NWIDE:
        _scan_rows(X, Yv, Bg, DEN, DELTA, INIT_S, Sst, FIN_S, scale, T, H, Hq, Tp, N, g * AG,
                   D_HEAD, DINT, C, BK, AG, BV, DT, PREC, HAS_INIT, REVERSE, BSIDE,
                   STORE_FIN, False, PAIR, True, D_HEAD, VEC=VEC, PRE=PRE)
    else:
        # The rows a >= d/2 in groups of AGN: one static path per power-of-two width
        # WN >= W_I (W_I >= 16): d/2, d/4, d/8.
        a0 = HALF + (g - NWIDE) * AGR
        W = D_HEAD - 16 * (a0 // 16)
        if D_HEAD // 2 >= 16:
            if W > D_HEAD // 4:
                _scan_rows(X, Yv, Bg, DEN, DELTA, INIT_S, Sst, FIN_S, scale, T, H, Hq, Tp, N,
                           a0, D_HEAD, DINT, C, BK, AGR, BV, DT, PREC, HAS_INIT, REVERSE,
                           BSIDE, STORE_FIN, False, PAIR, True, D_HEAD // 2, VEC=VEC, PRE=PRE)
            else:
                if D_HEAD // 4 >= 16:
                    if W > D_HEAD // 8:
                        _scan_rows(X, Yv, Bg, DEN, DELTA, INIT_S, Sst, FIN_S, scale, T, H, Hq,
                                   Tp, N, a0, D_HEAD, DINT, C, BK, AGR, BV, DT, PREC, HAS_INIT,
                                   REVERSE, BSIDE, STORE_FIN, False, PAIR, True, D_HEAD // 4,
                                   VEC=VEC, PRE=PRE)
                    else:
                        if D_HEAD // 8 >= 16:
                            _scan_rows(X, Yv, Bg, DEN, DELTA, INIT_S, Sst, FIN_S, scale, T, H,
                                       Hq, Tp, N, a0, D_HEAD, DINT, C, BK, AGR, BV, DT, PREC,
                                       HAS_INIT, REVERSE, BSIDE, STORE_FIN, False, PAIR, True,
                                       D_HEAD // 8, VEC=VEC, PRE=PRE)


@triton.jit
def _scan_rows(X, Yv, Bg, DEN, DELTA, INIT, Sst, FIN, scale, T, H, Hq, Tp, N, a0,
               D_HEAD: tl.constexpr, DINT: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
               AG: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
               HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BSIDE: tl.constexpr,
               STORE_FIN: tl.constexpr, IS_Z: tl.constexpr, PAIR: tl.constexpr,
               TRANS: tl.constexpr = False, WN: tl.constexpr = 0, VEC: tl.constexpr = False,
               PRE: tl.constexpr = False):
    """One scan program (see _state_scan). Accumulators are [features, values] (rows b of
    x^T, d of them, those past W_I masked), or with TRANS [values, features] (WN columns
    b = 16 I + c, those with c >= W_I masked); PAIR puts two rows a side by side in one."""
    NV: tl.constexpr = D_HEAD // BV
    RP: tl.constexpr = 2 if PAIR else 1          # rows a per accumulator
    NS: tl.constexpr = 1 if IS_Z else AG // RP   # accumulators
    tl.static_assert(NS <= 4)
    SW: tl.constexpr = RP * (WN if TRANS else BV)   # accumulator width (PAIR: two rows a)
    NF: tl.constexpr = WN if TRANS else D_HEAD      # features held per row a (M or N)
    bh = tl.program_id(0) // NV
    pv = tl.program_id(0) % NV
    b = bh // H
    h = bh % H
    RG = Hq // H
    r = tl.arange(0, NF)
    vc = pv * BV + tl.arange(0, BV)
    bh64 = bh.to(tl.int64)
    if IS_Z:
        a0 = 0
        I = 0
        W = D_HEAD
        rows_b = r
        bmask = r < D_HEAD
        wrow = tl.full([D_HEAD], 1.0, tl.float32)
        LEN: tl.constexpr = D_HEAD
        srow = r
    else:
        I = a0 // 16
        W = D_HEAD - 16 * I
        rows_b = 16 * I + r                      # accumulator row r <-> feature column b
        bmask = rows_b < D_HEAD
        wrow = tl.where(rows_b < 16 * I + 16, 1.0, SQRT2)
        LEN: tl.constexpr = DINT
        srow = 16 * (I * D_HEAD - 8 * I * (I - 1)) + (a0 - 16 * I) * W + r
    ROW = W * D_HEAD          # from one row a's stored features to the next's
    if TRANS:
        smask = (r < W)[None, :] & (vc < D_HEAD)[:, None]
        sptr = srow[None, :] * D_HEAD + vc[:, None]
        wcol = wrow[None, :]
        acc0 = tl.zeros([BV, SW], dtype=tl.float32)
    else:
        smask = (r < W)[:, None] & (vc < D_HEAD)[None, :]
        sptr = srow[:, None] * D_HEAD + vc[None, :]
        wcol = wrow[:, None]  # the accumulators hold unweighted rows; weights on load/store
        acc0 = tl.zeros([D_HEAD, SW], dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    if HAS_INIT:
        ib = INIT + bh64 * LEN * D_HEAD + sptr
        acc0 = _load_rows(ib, wcol, smask, ROW, PAIR)
        if NS > 1:
            acc1 = _load_rows(ib + RP * ROW, wcol, smask, ROW, PAIR)
        if NS > 2:
            acc2 = _load_rows(ib + 2 * RP * ROW, wcol, smask, ROW, PAIR)
            acc3 = _load_rows(ib + 3 * RP * ROW, wcol, smask, ROW, PAIR)
    if REVERSE:
        xrs = Hq * D_HEAD
        nrep = RG
    else:
        xrs = H * D_HEAD
        nrep = 1
    # One flat loop over (chunk, query head of the group, token step): the pipeliner then
    # prefetches across chunk boundaries. The chunk's last log-gate and the columns x_a are
    # scalar/strided loads it cannot copy asynchronously: they are loaded one step ahead.
    SPC: tl.constexpr = C // BK
    per_chunk = nrep * SPC
    steps = N * per_chunk
    xbase, ybase, rowbase, t, tm, blast = _scan_step_src(
        0, X, Yv, Bg, b, h, bh64, T, H, Hq, Tp, N, xrs, per_chunk, D_HEAD, C, BK, SPC,
        REVERSE, IS_Z)
    xa0n, xa1n, xa2n, xa3n, xa4n, xa5n, xa6n, xa7n = _scan_cols(xbase, t, tm, xrs, a0, AG,
                                                                IS_Z, VEC)
    btn, denn, dln = _scan_tokens(Bg, DEN, DELTA, bh64 * Tp, rowbase, t, tm, REVERSE, IS_Z)
    for j in range(steps):
        xa0, xa1, xa2, xa3 = xa0n, xa1n, xa2n, xa3n
        xa4, xa5, xa6, xa7 = xa4n, xa5n, xa6n, xa7n
        blast_j = blast
        if j % per_chunk == 0:
            # Store what the chunk sees (forward) or what its keys get (reverse), then decay.
            n = j // per_chunk
            if REVERSE:
                n = N - 1 - n
            _store_accs(Sst + (bh64 * N + n) * LEN * D_HEAD + sptr, acc0, acc1, acc2, acc3,
                        wcol, smask, ROW, NS, PAIR)
            decay = tl.exp(blast_j)
            acc0 *= decay
            acc1 *= decay
            acc2 *= decay
            acc3 *= decay
        xb = xbase
        yb_base = ybase
        rb = rowbase
        tj = t
        tmj = tm
        # Next step's sources (clamped at the last step: a harmless reload).
        xbase, ybase, rowbase, t, tm, blast = _scan_step_src(
            tl.minimum(j + 1, steps - 1), X, Yv, Bg, b, h, bh64, T, H, Hq, Tp, N, xrs,
            per_chunk, D_HEAD, C, BK, SPC, REVERSE, IS_Z)
        xa0n, xa1n, xa2n, xa3n, xa4n, xa5n, xa6n, xa7n = _scan_cols(xbase, t, tm, xrs, a0, AG,
                                                                    IS_Z, VEC)
        if PRE:
            bt, den, dl = btn, denn, dln
            btn, denn, dln = _scan_tokens(Bg, DEN, DELTA, bh64 * Tp, rowbase, t, tm, REVERSE,
                                          IS_Z)
        else:
            bt, den, dl = _scan_tokens(Bg, DEN, DELTA, bh64 * Tp, rb, tj, tmj, REVERSE, IS_Z)
        if REVERSE:
            den = tl.where(den > 0, den, 1.0)
            fac = scale * scale * tl.exp(bt) / den            # phi(q) / den
            if IS_Z:
                fac = -fac * dl                                 # f dden
        else:
            fac = tl.exp(blast_j - bt)                          # phi(k e^{(bl-b)/2})
        if TRANS:
            # y^T times x's block columns; the per-token scale on x (BSIDE) or on y^T.
            lhs = tl.load(yb_base + tj[None, :].to(tl.int64) * xrs + vc[:, None],
                          mask=tmj[None, :], other=0.0).to(DT)
            rhs = tl.load(xb + tj[:, None].to(tl.int64) * xrs + rows_b[None, :],
                          mask=tmj[:, None] & bmask[None, :], other=0.0)
            if BSIDE:
                rhs = rhs.to(tl.float32)
        else:
            lhs = _src_tile(xb, tj, tmj, xrs, rows_b, bmask)
            rhs = tl.load(yb_base + tj[:, None].to(tl.int64) * xrs + vc[None, :],
                          mask=tmj[:, None], other=0.0).to(tl.float32)
        if IS_Z:
            acc0 = _scaled_dot(lhs, rhs, fac, acc0, BSIDE, DT, PREC)
        elif PAIR:
            acc0 = _paired_dot(lhs, rhs, xa0 * fac, xa1 * fac, acc0, DT, PREC)
            if NS > 1:
                acc1 = _paired_dot(lhs, rhs, xa2 * fac, xa3 * fac, acc1, DT, PREC)
            if NS > 2:
                acc2 = _paired_dot(lhs, rhs, xa4 * fac, xa5 * fac, acc2, DT, PREC)
                acc3 = _paired_dot(lhs, rhs, xa6 * fac, xa7 * fac, acc3, DT, PREC)
        else:
            acc0 = _scaled_dot(lhs, rhs, xa0 * fac, acc0, BSIDE, DT, PREC)
            if AG > 1:
                acc1 = _scaled_dot(lhs, rhs, xa1 * fac, acc1, BSIDE, DT, PREC)
            if AG > 2:
                acc2 = _scaled_dot(lhs, rhs, xa2 * fac, acc2, BSIDE, DT, PREC)
                acc3 = _scaled_dot(lhs, rhs, xa3 * fac, acc3, BSIDE, DT, PREC)
    if STORE_FIN:   # skipped when nobody reads it (no state returned / no initial state)
        _store_accs(FIN + bh64 * LEN * D_HEAD + sptr, acc0, acc1, acc2, acc3, wcol, smask, ROW,
                    NS, PAIR)


@triton.jit
def _scan_step_src(j, X, Yv, Bg, b, h, bh64, T, H, Hq, Tp, N, xrs, per_chunk,
                   D_HEAD: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                   SPC: tl.constexpr, REVERSE: tl.constexpr, IS_Z: tl.constexpr):
    """Step j of the flat scan loop: the x and y bases of its head, the row base of the
    per-query-head den/delta, its tokens t (and mask) and the last log-gate of its chunk."""
    n = j // per_chunk
    rem = j % per_chunk
    if REVERSE:
        n = N - 1 - n
        hx = h * (Hq // H) + rem // SPC
        xbase = X + (b.to(tl.int64) * T * Hq + hx) * D_HEAD
        ybase = Yv + (b.to(tl.int64) * T * Hq + hx) * D_HEAD
        rowbase = (b * Hq + hx).to(tl.int64) * T
    else:
        xbase = X + (b.to(tl.int64) * T * H + h) * D_HEAD
        ybase = Yv + (b.to(tl.int64) * T * H + h) * D_HEAD
        rowbase = bh64 * T
    if IS_Z:
        ybase = xbase
    t = n * C + (rem % SPC) * BK + tl.arange(0, BK)
    blast = tl.load(Bg + bh64 * Tp + n * C + C - 1)
    return xbase, ybase, rowbase, t, t < T, blast


@triton.jit
def _scan_tokens(Bg, DEN, DELTA, grow, rowbase, t, tm, REVERSE: tl.constexpr, IS_Z: tl.constexpr):
    """Tokens t's log-gates b_t and, in REVERSE, den_t (1 past T) and (IS_Z) delta_t (0 past
    T); unused ones are b_t again."""
    bt = tl.load(Bg + grow + t)
    den = bt
    dl = bt
    if REVERSE:
        den = tl.load(DEN + rowbase + t, mask=tm, other=1.0)
        if IS_Z:
            dl = tl.load(DELTA + rowbase + t, mask=tm, other=0.0)
    return bt, den, dl


@triton.jit
def _scan_cols(xbase, t, tm, xrs, a0, AG: tl.constexpr, IS_Z: tl.constexpr,
               VEC: tl.constexpr = False):
    """Columns x_a0 .. x_a0+AG-1 (AG up to 8) of tokens t, float32 (unused ones are zeros).
    VEC (AG of 2, 4 or 8) reads a token's AG columns as one vector, split in registers: one
    load per token instead of AG, each of which used 2 of its sector's 32 bytes."""
    z = tl.zeros(t.shape, tl.float32)
    c0 = z
    c1 = z
    c2 = z
    c3 = z
    c4 = z
    c5 = z
    c6 = z
    c7 = z
    if not IS_Z:
        if VEC and AG > 1:
            cols = tl.load(xbase + t[:, None].to(tl.int64) * xrs + a0
                           + tl.arange(0, AG)[None, :], mask=tm[:, None], other=0.0)
            cols = cols.to(tl.float32)
            if AG == 8:
                # [t, i, j, k] is column 4i + 2j + k: split k, then j, then i.
                even, odd = tl.split(tl.reshape(cols, [t.shape[0], 2, 2, 2]))
                e0, e1 = tl.split(even)
                o0, o1 = tl.split(odd)
                c0, c4 = tl.split(e0)
                c2, c6 = tl.split(e1)
                c1, c5 = tl.split(o0)
                c3, c7 = tl.split(o1)
            elif AG == 4:
                even, odd = tl.split(tl.reshape(cols, [t.shape[0], 2, 2]))
                c0, c2 = tl.split(even)   # even: columns 0 and 2, odd: 1 and 3
                c1, c3 = tl.split(odd)
            else:
                c0, c1 = tl.split(cols)
        else:
            p = xbase + t.to(tl.int64) * xrs + a0
            c0 = tl.load(p, mask=tm, other=0.0).to(tl.float32)
            if AG > 1:
                c1 = tl.load(p + 1, mask=tm, other=0.0).to(tl.float32)
            if AG > 2:
                c2 = tl.load(p + 2, mask=tm, other=0.0).to(tl.float32)
                c3 = tl.load(p + 3, mask=tm, other=0.0).to(tl.float32)
            if AG > 4:
                c4 = tl.load(p + 4, mask=tm, other=0.0).to(tl.float32)
                c5 = tl.load(p + 5, mask=tm, other=0.0).to(tl.float32)
                c6 = tl.load(p + 6, mask=tm, other=0.0).to(tl.float32)
                c7 = tl.load(p + 7, mask=tm, other=0.0).to(tl.float32)
    return c0, c1, c2, c3, c4, c5, c6, c7


# --- row-block helpers ----------------------------------------------------------------------
@triton.jit
def _block_cols(xrow, rm, c):
    """Columns c of rows xrow, float32, times the feature weight (1 in block I, else sqrt2)."""
    return tl.load(xrow[:, None] + c[None, :], mask=rm[:, None], other=0.0).to(tl.float32)


@triton.jit
def _read_block(acc, xrow, rm, fac, Sb, cols, I: tl.constexpr, D_HEAD: tl.constexpr,
                DT: tl.constexpr, PREC: tl.constexpr, PAIR: tl.constexpr = 0):
    """acc += phi(x)[:, block I's features] @ S rows, as sum_a dot(fac x_a * w x_J, S_a).
    Row a holds W = d - 16 I features from OFF (layout.row_offsets); W is cut into up to
    three power-of-two column parts (dot shapes). PAIR 1, when W is a power of two, or 2, for
    every W: rows a and a+1 in dots of depth 2W (their S rows are adjacent in memory; 2W cut
    into power-of-two parts), half the dots or fewer."""
    W: tl.constexpr = D_HEAD - 16 * I
    OFF: tl.constexpr = 16 * (I * D_HEAD - 8 * I * (I - 1))
    P1: tl.constexpr = W & (0 - W)
    R1: tl.constexpr = W - P1
    P2: tl.constexpr = R1 & (0 - R1)
    R2: tl.constexpr = R1 - P2
    P3: tl.constexpr = R2 & (0 - R2)
    if PAIR == 2 or (PAIR == 1 and R1 == 0):
        return _read_block_paired(acc, xrow, rm, fac, Sb, cols, I, D_HEAD, DT, PREC)
    c1 = 16 * I + tl.arange(0, P1)
    x1 = _block_cols(xrow, rm, c1) * tl.where(c1 < 16 * I + 16, 1.0, SQRT2)[None, :]
    x2 = x1
    x3 = x1
    if R1 > 0:
        c2 = 16 * I + P1 + tl.arange(0, P2)
        x2 = _block_cols(xrow, rm, c2) * SQRT2
    if R2 > 0:
        c3 = 16 * I + P1 + P2 + tl.arange(0, P3)
        x3 = _block_cols(xrow, rm, c3) * SQRT2
    acc2 = tl.zeros_like(acc)   # a part's own accumulator keeps its dots in flight
    acc3 = tl.zeros_like(acc)
    for al in range(16):
        xa = tl.load(xrow + 16 * I + al, mask=rm, other=0.0).to(tl.float32) * fac
        so = Sb + (OFF + al * W) * D_HEAD
        s1 = tl.load(so + tl.arange(0, P1)[:, None] * D_HEAD + cols[None, :])
        acc = tl.dot((x1 * xa[:, None]).to(DT), s1.to(DT), acc, input_precision=PREC)
        if R1 > 0:
            s2 = tl.load(so + (P1 + tl.arange(0, P2))[:, None] * D_HEAD + cols[None, :])
            acc2 = tl.dot((x2 * xa[:, None]).to(DT), s2.to(DT), acc2, input_precision=PREC)
        if R2 > 0:
            s3 = tl.load(so + (P1 + P2 + tl.arange(0, P3))[:, None] * D_HEAD + cols[None, :])
            acc3 = tl.dot((x3 * xa[:, None]).to(DT), s3.to(DT), acc3, input_precision=PREC)
    if R1 > 0:
        acc += acc2
    if R2 > 0:
        acc += acc3
    return acc


@triton.jit
def _pair_part(xrow, rm, I: tl.constexpr, W: tl.constexpr, O: tl.constexpr, P: tl.constexpr):
    """Depths O .. O+P of a row pair's 2W in _read_block_paired: x's block columns behind
    them (weighted; row a's W features, then row a+1's) and which belong to row a+1."""
    j = O + tl.arange(0, P)
    second = j >= W
    c = 16 * I + tl.where(second, j - W, j)
    x = _block_cols(xrow, rm, c) * tl.where(c < 16 * I + 16, 1.0, SQRT2)[None, :]
    return x, second


@triton.jit
def _pair_dot(acc, x, second, xa, xb, so, O: tl.constexpr, P: tl.constexpr, cols,
              D_HEAD: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """acc += one part of a row pair's read: x's columns scaled by their row's x_a, times the
    pair's S rows O .. O+P."""
    s = tl.load(so + (O + tl.arange(0, P))[:, None] * D_HEAD + cols[None, :])
    scaled = x * tl.where(second[None, :], xb[:, None], xa[:, None])
    return tl.dot(scaled.to(DT), s.to(DT), acc, input_precision=PREC)


@triton.jit
def _read_block_paired(acc, xrow, rm, fac, Sb, cols, I: tl.constexpr, D_HEAD: tl.constexpr,
                       DT: tl.constexpr, PREC: tl.constexpr):
    """_read_block with two rows a per dot: [x_a w x_J | x_a+1 w x_J] (x's block columns
    twice, each half scaled by its row's x_a) times the [2W, values] S rows of a and a+1,
    adjacent in memory; 2W cut into up to three power-of-two parts (one when W is a power of
    two; W = 48: 32 + 64, two dots per pair instead of four)."""
    W: tl.constexpr = D_HEAD - 16 * I
    OFF: tl.constexpr = 16 * (I * D_HEAD - 8 * I * (I - 1))
    P1: tl.constexpr = (2 * W) & (0 - 2 * W)
    R1: tl.constexpr = 2 * W - P1
    P2: tl.constexpr = R1 & (0 - R1)
    R2: tl.constexpr = R1 - P2
    P3: tl.constexpr = R2 & (0 - R2)
    x1, m1 = _pair_part(xrow, rm, I, W, 0, P1)
    x2 = x1
    m2 = m1
    x3 = x1
    m3 = m1
    if R1 > 0:
        x2, m2 = _pair_part(xrow, rm, I, W, P1, P2)
    if R2 > 0:
        x3, m3 = _pair_part(xrow, rm, I, W, P1 + P2, P3)
    # Each part accumulates on its own: a dot whose result feeds only its next iteration stays
    # in flight (triton 3.6 waits on a dot whose result feeds another dot of the same step).
    acc2 = tl.zeros_like(acc)
    acc3 = tl.zeros_like(acc)
    for ap in range(8):
        al = 2 * ap
        xa = tl.load(xrow + 16 * I + al, mask=rm, other=0.0).to(tl.float32) * fac
        xb = tl.load(xrow + 16 * I + al + 1, mask=rm, other=0.0).to(tl.float32) * fac
        so = Sb + (OFF + al * W) * D_HEAD
        acc = _pair_dot(acc, x1, m1, xa, xb, so, 0, P1, cols, D_HEAD, DT, PREC)
        if R1 > 0:
            acc2 = _pair_dot(acc2, x2, m2, xa, xb, so, P1, P2, cols, D_HEAD, DT, PREC)
        if R2 > 0:
            acc3 = _pair_dot(acc3, x3, m3, xa, xb, so, P1 + P2, P3, cols, D_HEAD, DT, PREC)
    if R1 > 0:
        acc += acc2
    if R2 > 0:
        acc += acc3
    return acc


@triton.jit
def _rmw(ptr, rm, c, add):
    """out[rows, c] += add (fp32, this program's own rows)."""
    p = ptr[:, None] + c[None, :]
    m = rm[:, None]
    tl.store(p, tl.load(p, mask=m, other=0.0, cache_modifier=".cg") + add, mask=m)


@triton.jit
def _grad_block(grow, rm, A, xrow, fac, Sb, cols, I: tl.constexpr, D_HEAD: tl.constexpr,
                BM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                PAIR: tl.constexpr = 0):
    """grad[rows] += d/dx of sum_{a in block I, b} fac w_ab x_a x_b U[a,b], U_a = A @ S_a^T.
    x_a as the row gives a column (assembled in a [BM, 16] tile), x_b a [BM, W] tile; W is
    cut into up to three power-of-two feature parts. PAIR 1, when W is a power of two, or 2,
    for every W: U of rows a and a+1 together, one dot per part of twice its width
    (_grad_part; 2W's power-of-two parts halve to W's, so the tiles are the same)."""
    W: tl.constexpr = D_HEAD - 16 * I
    OFF: tl.constexpr = 16 * (I * D_HEAD - 8 * I * (I - 1))
    P1: tl.constexpr = W & (0 - W)
    R1: tl.constexpr = W - P1
    P2: tl.constexpr = R1 & (0 - R1)
    R2: tl.constexpr = R1 - P2
    P3: tl.constexpr = R2 & (0 - R2)
    c1 = 16 * I + tl.arange(0, P1)
    w1 = tl.where(c1 < 16 * I + 16, 1.0, SQRT2)
    x1 = _block_cols(xrow, rm, c1) * w1[None, :]
    g1 = tl.zeros([BM, P1], dtype=tl.float32)
    x2 = x1
    x3 = x1
    g2 = g1
    g3 = g1
    if R1 > 0:   # parts after the first start at feature 16 or later: all weighted sqrt2
        c2 = 16 * I + P1 + tl.arange(0, P2)
        x2 = _block_cols(xrow, rm, c2) * SQRT2
        g2 = tl.zeros([BM, P2], dtype=tl.float32)
    if R2 > 0:
        c3 = 16 * I + P1 + P2 + tl.arange(0, P3)
        x3 = _block_cols(xrow, rm, c3) * SQRT2
        g3 = tl.zeros([BM, P3], dtype=tl.float32)
    colI = tl.zeros([BM, 16], dtype=tl.float32)
    k16 = tl.arange(0, 16)
    if PAIR == 2 or (PAIR == 1 and R1 == 0):
        for ap in range(8):
            al = 2 * ap
            xa = tl.load(xrow + 16 * I + al, mask=rm, other=0.0).to(tl.float32) * fac
            xb = tl.load(xrow + 16 * I + al + 1, mask=rm, other=0.0).to(tl.float32) * fac
            so = Sb + (OFF + al * W) * D_HEAD
            cola = tl.zeros([BM], dtype=tl.float32)
            colb = tl.zeros([BM], dtype=tl.float32)
            g1, cola, colb = _grad_part(A, so, xa, xb, x1, g1, cola, colb, 0, 2 * P1, W, cols,
                                        BM, D_HEAD, DT, PREC)
            if R1 > 0:
                g2, cola, colb = _grad_part(A, so, xa, xb, x2, g2, cola, colb, P1, 2 * P2, W,
                                            cols, BM, D_HEAD, DT, PREC)
            if R2 > 0:
                g3, cola, colb = _grad_part(A, so, xa, xb, x3, g3, cola, colb, P1 + P2, 2 * P3,
                                            W, cols, BM, D_HEAD, DT, PREC)
            colI += tl.where((k16 == al)[None, :], cola[:, None],
                             tl.where((k16 == al + 1)[None, :], colb[:, None], 0.0))
    else:
        for al in range(16):
            xa = tl.load(xrow + 16 * I + al, mask=rm, other=0.0).to(tl.float32) * fac
            so = Sb + (OFF + al * W) * D_HEAD
            sT1 = tl.load(so + tl.arange(0, P1)[None, :] * D_HEAD + cols[:, None])
            u = tl.dot(A, sT1.to(DT), input_precision=PREC)
            col = tl.sum(u * x1, axis=1)
            g1 += u * xa[:, None]
            if R1 > 0:
                sT2 = tl.load(so + (P1 + tl.arange(0, P2))[None, :] * D_HEAD + cols[:, None])
                u = tl.dot(A, sT2.to(DT), input_precision=PREC)
                col += tl.sum(u * x2, axis=1)
                g2 += u * xa[:, None]
            if R2 > 0:
                sT3 = tl.load(so + (P1 + P2 + tl.arange(0, P3))[None, :] * D_HEAD
                              + cols[:, None])
                u = tl.dot(A, sT3.to(DT), input_precision=PREC)
                col += tl.sum(u * x3, axis=1)
                g3 += u * xa[:, None]
            colI += tl.where((k16 == al)[None, :], col[:, None], 0.0)
    tl.debug_barrier()
    _rmw(grow, rm, c1, g1 * w1[None, :])
    if R1 > 0:
        _rmw(grow, rm, c2, g2 * SQRT2)
    if R2 > 0:
        _rmw(grow, rm, c3, g3 * SQRT2)
    tl.debug_barrier()
    _rmw(grow, rm, 16 * I + k16, colI * fac[:, None])
    tl.debug_barrier()


@triton.jit
def _grad_part(A, so, xa, xb, x, g, cola, colb, F: tl.constexpr, P: tl.constexpr,
               W: tl.constexpr, cols, BM: tl.constexpr, D_HEAD: tl.constexpr, DT: tl.constexpr,
               PREC: tl.constexpr):
    """Features F .. F+P/2 of a row pair in _grad_block: U of both rows as one [BM, P] dot
    with interleaved columns (column 2c + j is row a+j's feature F + c), split back in
    registers (a wgmma thread holds adjacent column pairs); then their x_b tile sums and x_a
    columns."""
    j = tl.arange(0, P)
    srow = (j % 2) * W + F + j // 2        # the S row (of the pair's 2W) behind each column
    sT = tl.load(so + srow[None, :] * D_HEAD + cols[:, None])
    ua, ub = tl.split(tl.reshape(tl.dot(A, sT.to(DT), input_precision=PREC), [BM, P // 2, 2]))
    g += ua * xa[:, None] + ub * xb[:, None]
    cola += tl.sum(ua * x, axis=1)
    colb += tl.sum(ub * x, axis=1)
    return g, cola, colb


@triton.jit
def _finish_rows(grow, orow, xrow, XDX, rm, cols):
    """A row block's float32 gradient (after the block-wise adds: _grad_block ends on a
    barrier) to the input dtype at orow, and its row sums x.dx to XDX."""
    g = tl.load(grow[:, None] + cols[None, :], mask=rm[:, None], other=0.0)
    tl.store(orow[:, None] + cols[None, :], g.to(orow.dtype.element_ty), mask=rm[:, None])
    x = tl.load(xrow[:, None] + cols[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
    tl.store(XDX, tl.sum(x * g, axis=1), mask=rm)


@triton.jit
def _gram_tile(Zst, bh64, N, n, cols, D_HEAD: tl.constexpr):
    """The d x d Gram matrix Z (or its gradient) of chunk n of KV head bh64."""
    return tl.load(Zst + (bh64 * N + n) * D_HEAD * D_HEAD + cols[:, None] * D_HEAD
                   + cols[None, :])


@triton.jit
def _intra_gate(bq, bk, keep, diag, bref_ptr, RANK1: tl.constexpr, QROWS: tl.constexpr):
    """The intra-chunk gate e^{bq_i - bk_j}, 0 where not kept: [queries, keys] if QROWS, else
    [keys, queries]. RANK1, off the diagonal block (every key before every query):
    e^{bq_i - bref} e^{bref - bk_j} with bref the query block's first log-gate, both factors
    <= 1: no exponential per pair, no mask (keys past T reach only padded rows, and load as
    zeros). The query-side and key-side kernels form the same two factors, so their products
    (and the dq and dk summands built on them) round alike."""
    if QROWS:
        diff = bq[:, None] - bk[None, :]
    else:
        diff = bq[None, :] - bk[:, None]
    if RANK1:
        if diag:
            e = tl.where(keep, tl.exp(diff), 0.0)
        else:
            bref = tl.load(bref_ptr)
            eq = tl.exp(bq - bref)
            ek = tl.exp(bref - bk)
            if QROWS:
                e = eq[:, None] * ek[None, :]
            else:
                e = ek[:, None] * eq[None, :]
    else:
        e = tl.where(keep, tl.exp(diff), 0.0)
    return e


# --- forward output -------------------------------------------------------------------------
@triton.jit
def _query_block(Q, K, V, T, H, Hq, D_HEAD: tl.constexpr, C: tl.constexpr, BM: tl.constexpr):
    """What a (row block, query head) program reads: its rows and chunk, its KV head, row
    pointers into q and base pointers of that head's k and v."""
    pm = tl.program_id(0)
    pbh = tl.program_id(1)
    b = pbh // Hq
    hq = pbh % Hq
    h = hq // (Hq // H)
    n = (pm * BM) // C
    rows = pm * BM + tl.arange(0, BM)
    rm = rows < T
    cols = tl.arange(0, D_HEAD)
    bh64 = (b * H + h).to(tl.int64)
    qrs = Hq * D_HEAD
    krs = H * D_HEAD
    qrow = Q + (b.to(tl.int64) * T * Hq + hq) * D_HEAD + rows.to(tl.int64) * qrs
    kbase = K + (b.to(tl.int64) * T * H + h) * D_HEAD
    vbase = V + (b.to(tl.int64) * T * H + h) * D_HEAD
    return pm, pbh, b, hq, h, n, rows, rm, cols, bh64, qrs, krs, qrow, kbase, vbase


@triton.jit(do_not_specialize=["T", "H", "Hq", "Tp", "N"])
def _out_fwd(Q, K, V, Bg, Sst, Zst, Y, DEN, scale,
             T, H, Hq, Tp, N,
             D_HEAD: tl.constexpr, DINT: tl.constexpr, C: tl.constexpr, BM: tl.constexpr,
             DT: tl.constexpr, PREC: tl.constexpr, RANK1: tl.constexpr,
             READ_PAIR: tl.constexpr = 0):
    NB: tl.constexpr = D_HEAD // 16
    pm, pbh, b, hq, h, n, rows, rm, cols, bh64, qrs, krs, qrow, kbase, vbase = \
        _query_block(Q, K, V, T, H, Hq, D_HEAD, C, BM)
    bq = tl.load(Bg + bh64 * Tp + rows)
    q = tl.load(qrow[:, None] + cols[None, :], mask=rm[:, None], other=0.0)
    fq = scale * scale * tl.exp(bq)
    # Denominator's state: phi(q).z = q^T Z q.
    zt = _gram_tile(Zst, bh64, N, n, cols, D_HEAD)
    qz = tl.dot(q.to(DT), zt.to(DT), input_precision=PREC)
    den = fq * tl.sum(qz * q.to(tl.float32), axis=1)
    acc = tl.zeros([BM, D_HEAD], dtype=tl.float32)
    Sb = Sst + (bh64 * N + n) * DINT * D_HEAD
    for I in tl.static_range(NB):
        acc = _read_block(acc, qrow, rm, fq, Sb, cols, I, D_HEAD, DT, PREC, READ_PAIR)
    # Masked attention over this chunk's keys up to the diagonal.
    qd = q.to(DT)
    for kb in range(n * C, pm * BM + BM, BM):
        kr = kb + tl.arange(0, BM)
        km = kr < T
        kT = tl.load(kbase + kr[None, :] * krs + cols[:, None], mask=km[None, :], other=0.0)
        s = tl.dot(qd, kT.to(DT), input_precision=PREC) * scale
        bk = tl.load(Bg + bh64 * Tp + kr)
        keep = (rows[:, None] >= kr[None, :]) & km[None, :]
        wgt = s * s * _intra_gate(bq, bk, keep, kb == pm * BM, Bg + bh64 * Tp + pm * BM, RANK1,
                                  True)
        vb = tl.load(vbase + kr[:, None] * krs + cols[None, :], mask=km[:, None], other=0.0)
        acc += tl.dot(wgt.to(DT), vb.to(DT), input_precision=PREC)
        den += tl.sum(wgt, axis=1)
    y = acc / tl.where(den > 0, den, 1.0)[:, None]
    ybase = Y + (b.to(tl.int64) * T * Hq + hq) * D_HEAD
    tl.store(ybase + rows[:, None] * qrs + cols[None, :], y.to(Y.dtype.element_ty),
             mask=rm[:, None])
    tl.store(DEN + pbh.to(tl.int64) * T + rows, den, mask=rm)


# --- backward ------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T", "H", "Hq", "Tp", "N"])
def _dq_bwd(Q, K, V, Bg, Sst, Zst, DY, DEN, DELTA, DQ, DQO, QDQ, scale,
            T, H, Hq, Tp, N,
            D_HEAD: tl.constexpr, DINT: tl.constexpr, C: tl.constexpr, BM: tl.constexpr,
            DT: tl.constexpr, PREC: tl.constexpr, RANK1: tl.constexpr,
            GRAD_PAIR: tl.constexpr = 0):
    """dq of one row block of queries, summed in the float32 DQ (the state read adds into it
    block by block), then written to DQO in the input dtype with its row sums q.dq in QDQ
    [B*Hq, T] (the gate gradient's summand)."""
    NB: tl.constexpr = D_HEAD // 16
    pm, pbh, b, hq, h, n, rows, rm, cols, bh64, qrs, krs, qrow, kbase, vbase = \
        _query_block(Q, K, V, T, H, Hq, D_HEAD, C, BM)
    dybase = DY + (b.to(tl.int64) * T * Hq + hq) * D_HEAD
    grow = DQ + (b.to(tl.int64) * T * Hq + hq) * D_HEAD + rows.to(tl.int64) * qrs
    bq = tl.load(Bg + bh64 * Tp + rows)
    fq = scale * scale * tl.exp(bq)
    den = tl.load(DEN + pbh.to(tl.int64) * T + rows, mask=rm, other=1.0)
    den = tl.where(den > 0, den, 1.0)
    dden = -tl.load(DELTA + pbh.to(tl.int64) * T + rows, mask=rm, other=0.0) / den
    dnum = tl.load(dybase + rows[:, None] * qrs + cols[None, :], mask=rm[:, None],
                   other=0.0).to(tl.float32) / den[:, None]
    dnum_dt = dnum.to(DT)
    q = tl.load(qrow[:, None] + cols[None, :], mask=rm[:, None], other=0.0)
    qd = q.to(DT)
    # den = fq q^T Z q (Z symmetric): dq = 2 fq dden Z q.
    zt = _gram_tile(Zst, bh64, N, n, cols, D_HEAD)
    dq = tl.dot(qd, zt.to(DT), input_precision=PREC) * (2.0 * fq * dden)[:, None]
    for kb in range(n * C, pm * BM + BM, BM):
        kr = kb + tl.arange(0, BM)
        km = kr < T
        kT = tl.load(kbase + kr[None, :] * krs + cols[:, None], mask=km[None, :], other=0.0)
        kn = tl.load(kbase + kr[:, None] * krs + cols[None, :], mask=km[:, None], other=0.0)
        vT = tl.load(vbase + kr[None, :] * krs + cols[:, None], mask=km[None, :], other=0.0)
        s = tl.dot(qd, kT.to(DT), input_precision=PREC) * scale
        bk = tl.load(Bg + bh64 * Tp + kr)
        keep = (rows[:, None] >= kr[None, :]) & km[None, :]
        dw = tl.dot(dnum_dt, vT.to(DT), input_precision=PREC) + dden[:, None]
        ds = 2.0 * dw * s * _intra_gate(bq, bk, keep, kb == pm * BM, Bg + bh64 * Tp + pm * BM,
                                        RANK1, True) * scale
        dq += tl.dot(ds.to(DT), kn.to(DT), input_precision=PREC)
    tl.store(grow[:, None] + cols[None, :], dq, mask=rm[:, None])
    # The state read: u_a = dnum @ S_a^T; added into DQ block by block.
    Sb = Sst + (bh64 * N + n) * DINT * D_HEAD
    for I in tl.static_range(NB):
        _grad_block(grow, rm, dnum_dt, qrow, fq, Sb, cols, I, D_HEAD, BM, DT, PREC, GRAD_PAIR)
    obase = DQO + (b.to(tl.int64) * T * Hq + hq) * D_HEAD + rows.to(tl.int64) * qrs
    _finish_rows(grow, obase, qrow, QDQ + pbh.to(tl.int64) * T + rows, rm, cols)


@triton.jit(do_not_specialize=["T", "H", "Hq", "Tp", "N"])
def _dkv_bwd(Q, K, V, Bg, dSst, dZst, DY, DEN, DELTA, DK, DKO, DV, KDK, scale,
             T, H, Hq, Tp, N,
             D_HEAD: tl.constexpr, DINT: tl.constexpr, C: tl.constexpr, BM: tl.constexpr,
             DT: tl.constexpr, PREC: tl.constexpr, PART: tl.constexpr, RANK1: tl.constexpr,
             READ_PAIR: tl.constexpr = 0, GRAD_PAIR: tl.constexpr = 0):
    """dk and dv of one row block of keys. PART 0 computes both in one pass; 1 only dv and 2
    only dk (two launches with fewer live registers each; the intra-chunk scores are computed
    twice); 3 the dv pass and then the dk pass in one program (one launch, one accumulator
    live at a time). dv goes straight to DV in the input dtype; dk is summed in the float32
    DK (the state write adds into it block by block), then written to DKO in the input dtype
    with its row sums k.dk in KDK [B*H, T]."""
    if PART == 3:
        _dkv_rows(Q, K, V, Bg, dSst, dZst, DY, DEN, DELTA, DK, DKO, DV, KDK, scale, T, H, Hq,
                  Tp, N, D_HEAD, DINT, C, BM, DT, PREC, RANK1, True, False, READ_PAIR)
        _dkv_rows(Q, K, V, Bg, dSst, dZst, DY, DEN, DELTA, DK, DKO, DV, KDK, scale, T, H, Hq,
                  Tp, N, D_HEAD, DINT, C, BM, DT, PREC, RANK1, False, True, 0, GRAD_PAIR)
    else:
        _dkv_rows(Q, K, V, Bg, dSst, dZst, DY, DEN, DELTA, DK, DKO, DV, KDK, scale, T, H, Hq,
                  Tp, N, D_HEAD, DINT, C, BM, DT, PREC, RANK1, PART != 2, PART != 1,
                  READ_PAIR, GRAD_PAIR)


@triton.jit
def _dkv_rows(Q, K, V, Bg, dSst, dZst, DY, DEN, DELTA, DK, DKO, DV, KDK, scale, T, H, Hq,
              Tp, N,
              D_HEAD: tl.constexpr, DINT: tl.constexpr, C: tl.constexpr, BM: tl.constexpr,
              DT: tl.constexpr, PREC: tl.constexpr, RANK1: tl.constexpr, DO_V: tl.constexpr,
              DO_K: tl.constexpr, READ_PAIR: tl.constexpr = 0,
              GRAD_PAIR: tl.constexpr = 0):
    """The body of _dkv_bwd: dv when DO_V, dk when DO_K, over the same key rows."""
    NB: tl.constexpr = D_HEAD // 16
    pm = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    RG = Hq // H
    n = (pm * BM) // C
    rows = pm * BM + tl.arange(0, BM)
    rm = rows < T
    cols = tl.arange(0, D_HEAD)
    bh64 = bh.to(tl.int64)
    qrs = Hq * D_HEAD
    krs = H * D_HEAD
    krow = K + (b.to(tl.int64) * T * H + h) * D_HEAD + rows.to(tl.int64) * krs
    vbase = V + (b.to(tl.int64) * T * H + h) * D_HEAD
    grow = DK + (b.to(tl.int64) * T * H + h) * D_HEAD + rows.to(tl.int64) * krs
    bk = tl.load(Bg + bh64 * Tp + rows)
    blast = tl.load(Bg + bh64 * Tp + n * C + C - 1)
    gk = tl.exp(blast - bk)
    k = tl.load(krow[:, None] + cols[None, :], mask=rm[:, None], other=0.0).to(DT)
    v = tl.load(vbase + rows[:, None] * krs + cols[None, :], mask=rm[:, None], other=0.0).to(DT)
    dk = tl.zeros([BM, D_HEAD], dtype=tl.float32)
    if DO_K:
        # Keys wrote Z = sum gk k k^T into the state leaving their chunk: dk = 2 gk dZ k.
        dzt = _gram_tile(dZst, bh64, N, n, cols, D_HEAD)
        dk = tl.dot(k, dzt.to(DT), input_precision=PREC) * (2.0 * gk)[:, None]
    dv = tl.zeros([BM, D_HEAD], dtype=tl.float32)
    Sb = dSst + (bh64 * N + n) * DINT * D_HEAD
    if DO_V:
        for I in tl.static_range(NB):
            dv = _read_block(dv, krow, rm, gk, Sb, cols, I, D_HEAD, DT, PREC, READ_PAIR)
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
            if DO_K:
                qn = tl.load(qbase + qr[:, None] * qrs + cols[None, :], mask=qm[:, None],
                             other=0.0)
            bq = tl.load(Bg + bh64 * Tp + qr)
            den = tl.load(DEN + rowbase + qr, mask=qm, other=1.0)
            den = tl.where(den > 0, den, 1.0)
            if DO_K:
                dden = -tl.load(DELTA + rowbase + qr, mask=qm, other=0.0) / den
            if DO_V:
                dnum = tl.load(dybase + qr[:, None] * qrs + cols[None, :], mask=qm[:, None],
                               other=0.0).to(tl.float32) / den[:, None]
            if DO_K:
                dnumT = tl.load(dybase + qr[None, :] * qrs + cols[:, None], mask=qm[None, :],
                                other=0.0).to(tl.float32) / den[None, :]
            sT = tl.dot(k, qT.to(DT), input_precision=PREC) * scale
            keep = (qr[None, :] >= rows[:, None]) & qm[None, :]
            E = _intra_gate(bq, bk, keep, qb == pm * BM, Bg + bh64 * Tp + qb, RANK1, False)
            if DO_V:
                wT = sT * sT * E
                dv += tl.dot(wT.to(DT), dnum.to(DT), input_precision=PREC)
            if DO_K:
                dwT = tl.dot(v, dnumT.to(DT), input_precision=PREC) + dden[None, :]
                # scale inside the operand: a dot whose result only accumulates stays in
                # flight (triton 3.6 waits on one whose result is scaled); dq does the same.
                dsT = 2.0 * dwT * sT * E * scale
                dk += tl.dot(dsT.to(DT), qn.to(DT), input_precision=PREC)
    if DO_V:
        dvbase = DV + (b.to(tl.int64) * T * H + h) * D_HEAD
        tl.store(dvbase + rows[:, None] * krs + cols[None, :], dv.to(DV.dtype.element_ty),
                 mask=rm[:, None])
    if DO_K:
        tl.store(grow[:, None] + cols[None, :], dk, mask=rm[:, None])
        # The state write: u_a = v @ dS_a^T; added into DK block by block.
        for I in tl.static_range(NB):
            _grad_block(grow, rm, v, krow, gk, Sb, cols, I, D_HEAD, BM, DT, PREC, GRAD_PAIR)
        orow = DKO + (b.to(tl.int64) * T * H + h) * D_HEAD + rows.to(tl.int64) * krs
        _finish_rows(grow, orow, krow, KDK + bh64 * T + rows, rm, cols)
