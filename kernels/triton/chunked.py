"""Triton kernels of chunked power retention, degree 2 (DESIGN section 1), in the "row a" form.

Internal layout (layout.py): the state holds, for each head-dim row a (block I = a // 16), the
full-square entries S[a, b] = sum k_a k_b v for b in [16 I, d), unweighted (reads weigh the
off-block ones by 2, their (b, a) not being stored); D_int rows of d values. The denominator's
state is the d x d Gram matrix Z = sum k k^T (phi(q).z = q^T Z q).
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

Row-block gradients through the features (dq, dk): 2 fac sum_b dot(x_b * A, S[b, :]) over
the full square, row b's entries gathered with its mirror entries from earlier rows
(_grad_rows): d^3 products per row, all accumulating dots; in the row-block kernels or in
their own launch (_state_grad). Matrix operands are bf16 for bf16 inputs and float32 otherwise;
accumulators float32. No tl.trans (Hopper miscompiles tl.trans of a dot result fed to a dot,
triton 3.4-3.7.0): transposed operands are loaded transposed. Gates: Bg holds log-gates summed
from each chunk's start (b_i); queries carry e^{b_i}, keys e^{b_last - b_j}, the state decays
by e^{b_last} per chunk; every factor is <= 1.
"""
import triton
import triton.language as tl

# A stored off-block feature (a, b), b in a later block than a, stands for (b, a) too.
PAIRED = tl.constexpr(2.0)


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
def _store_rows(ptr, acc, smask, row_step, PAIR: tl.constexpr):
    """Store an accumulator: one row a, or (PAIR) two side by side (interleaved columns,
    _paired_dot), the second row_step elements after the first."""
    if PAIR:
        a, b = tl.split(tl.reshape(acc, [acc.shape[0], acc.shape[1] // 2, 2]))
        tl.store(ptr, a.to(ptr.dtype.element_ty), mask=smask)
        tl.store(ptr + row_step, b.to(ptr.dtype.element_ty), mask=smask)
    else:
        tl.store(ptr, acc.to(ptr.dtype.element_ty), mask=smask)


@triton.jit
def _store_accs(ptr, acc0, acc1, acc2, acc3, smask, row_step, NS: tl.constexpr,
                PAIR: tl.constexpr):
    """Store a program's NS accumulators, rows a in order from ptr (_store_rows each)."""
    RP: tl.constexpr = 2 if PAIR else 1
    _store_rows(ptr, acc0, smask, row_step, PAIR)
    if NS > 1:
        _store_rows(ptr + RP * row_step, acc1, smask, row_step, PAIR)
    if NS > 2:
        _store_rows(ptr + 2 * RP * row_step, acc2, smask, row_step, PAIR)
        _store_rows(ptr + 3 * RP * row_step, acc3, smask, row_step, PAIR)


@triton.jit
def _load_rows(ptr, smask, row_step, PAIR: tl.constexpr):
    """The inverse of _store_rows: float32 rows."""
    a = tl.load(ptr, mask=smask, other=0.0)
    if PAIR:
        b = tl.load(ptr + row_step, mask=smask, other=0.0)
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
        LEN: tl.constexpr = D_HEAD
        srow = r
    else:
        I = a0 // 16
        W = D_HEAD - 16 * I
        rows_b = 16 * I + r                      # accumulator row r <-> feature column b
        bmask = rows_b < D_HEAD
        LEN: tl.constexpr = DINT
        srow = 16 * (I * D_HEAD - 8 * I * (I - 1)) + (a0 - 16 * I) * W + r
    ROW = W * D_HEAD          # from one row a's stored features to the next's
    if TRANS:
        smask = (r < W)[None, :] & (vc < D_HEAD)[:, None]
        sptr = srow[None, :] * D_HEAD + vc[:, None]
        acc0 = tl.zeros([BV, SW], dtype=tl.float32)
    else:
        smask = (r < W)[:, None] & (vc < D_HEAD)[None, :]
        sptr = srow[:, None] * D_HEAD + vc[None, :]
        acc0 = tl.zeros([D_HEAD, SW], dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    if HAS_INIT:
        ib = INIT + bh64 * LEN * D_HEAD + sptr
        acc0 = _load_rows(ib, smask, ROW, PAIR)
        if NS > 1:
            acc1 = _load_rows(ib + RP * ROW, smask, ROW, PAIR)
        if NS > 2:
            acc2 = _load_rows(ib + 2 * RP * ROW, smask, ROW, PAIR)
            acc3 = _load_rows(ib + 3 * RP * ROW, smask, ROW, PAIR)
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
                        smask, ROW, NS, PAIR)
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
        _store_accs(FIN + bh64 * LEN * D_HEAD + sptr, acc0, acc1, acc2, acc3, smask, ROW, NS,
                    PAIR)


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
    """Columns c of rows xrow, float32."""
    return tl.load(xrow[:, None] + c[None, :], mask=rm[:, None], other=0.0).to(tl.float32)


@triton.jit
def _read_block(acc, xrow, rm, fac, Sb, cols, I: tl.constexpr, D_HEAD: tl.constexpr,
                DT: tl.constexpr, PREC: tl.constexpr, PAIR: tl.constexpr = 0):
    """acc += phi(x)[:, block I's features] @ S rows, as sum_a dot(fac x_a * m x_J, S_a), m the
    multiplicity of each stored feature (1 in block I, PAIRED after it).
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
    x1 = _block_cols(xrow, rm, c1) * tl.where(c1 < 16 * I + 16, 1.0, PAIRED)[None, :]
    x2 = x1
    x3 = x1
    if R1 > 0:
        c2 = 16 * I + P1 + tl.arange(0, P2)
        x2 = _block_cols(xrow, rm, c2) * PAIRED
    if R2 > 0:
        c3 = 16 * I + P1 + P2 + tl.arange(0, P3)
        x3 = _block_cols(xrow, rm, c3) * PAIRED
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
    them (times their multiplicity; row a's W features, then row a+1's) and which belong to
    row a+1."""
    j = O + tl.arange(0, P)
    second = j >= W
    c = 16 * I + tl.where(second, j - W, j)
    x = _block_cols(xrow, rm, c) * tl.where(c < 16 * I + 16, 1.0, PAIRED)[None, :]
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
def _row_start(a, D_HEAD: tl.constexpr):
    """Where row a's features start in the state (layout.row_offsets), for scalars or vectors."""
    i = a // 16
    return 16 * (i * D_HEAD - 8 * i * (i - 1)) + (a - 16 * i) * (D_HEAD - 16 * i)


@triton.jit
def _grad_rows(acc, A, fac, xrow, rm, Sb, cols, D_HEAD: tl.constexpr, DT: tl.constexpr,
               PREC: tl.constexpr):
    """acc += sum_b dot(2 fac x_b * A, G_b), the gradient through the features of
    sum_{b,c} fac x_b x_c (A . S[b, c]) (S symmetric in b, c; fac per row). G_b[e, c] =
    S[b, c, e] is gathered over the full square: row b's feature c for c from b's block on,
    else row c's feature b. d^3 products per row where the triangle has D_int d, but every
    step is the state read's accumulating dot: no column sums, no read-modify-write."""
    start_c = _row_start(cols, D_HEAD)
    block_c = (cols // 16) * 16
    for b in range(D_HEAD):
        block_b = (b // 16) * 16
        srow = tl.where(cols >= block_b, _row_start(b, D_HEAD) + cols - block_b,
                        start_c + b - block_c)
        g = tl.load(Sb + srow[None, :] * D_HEAD + cols[:, None])
        xb = tl.load(xrow + b, mask=rm, other=0.0).to(tl.float32)
        acc = tl.dot((A.to(tl.float32) * (2.0 * fac * xb)[:, None]).to(DT), g.to(DT), acc,
                     input_precision=PREC)
    return acc


@triton.jit
def _finish_rows(orow, x, g, XDX, rm, cols):
    """A row block's float32 gradient g to orow in the input dtype, and its row sums x.g
    (the gate gradient's summand) to XDX."""
    tl.store(orow[:, None] + cols[None, :], g.to(orow.dtype.element_ty), mask=rm[:, None])
    tl.store(XDX, tl.sum(x.to(tl.float32) * g, axis=1), mask=rm)


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
def _dq_bwd(Q, K, V, Bg, Sst, Zst, DY, DEN, DELTA, DQO, QDQ, scale,
            T, H, Hq, Tp, N,
            D_HEAD: tl.constexpr, DINT: tl.constexpr, C: tl.constexpr, BM: tl.constexpr,
            DT: tl.constexpr, PREC: tl.constexpr, RANK1: tl.constexpr,
            FUSED: tl.constexpr = True):
    """dq of one row block of queries, summed in float32 registers, written to DQO in the
    input dtype with its row sums q.dq in QDQ [B*Hq, T] (the gate gradient's summand).
    Without FUSED the state term is _state_grad's: DQO is float32 and gets the rest."""
    pm, pbh, b, hq, h, n, rows, rm, cols, bh64, qrs, krs, qrow, kbase, vbase = \
        _query_block(Q, K, V, T, H, Hq, D_HEAD, C, BM)
    dybase = DY + (b.to(tl.int64) * T * Hq + hq) * D_HEAD
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
    # The state read: y_num = fq sum_{b,c} q_b q_c (S[b, c] . ), so dq += 2 fq S q . dnum.
    obase = DQO + (b.to(tl.int64) * T * Hq + hq) * D_HEAD + rows.to(tl.int64) * qrs
    if FUSED:   # dnum = dy / den, with 1/den in the row factor (dy reloaded: fewer registers)
        Sb = Sst + (bh64 * N + n) * DINT * D_HEAD
        dyt = tl.load(dybase + rows[:, None] * qrs + cols[None, :], mask=rm[:, None], other=0.0)
        dq = _grad_rows(dq, dyt, fq / den, qrow, rm, Sb, cols, D_HEAD, DT, PREC)
        _finish_rows(obase, q, dq, QDQ + pbh.to(tl.int64) * T + rows, rm, cols)
    else:
        tl.store(obase[:, None] + cols[None, :], dq, mask=rm[:, None])


@triton.jit(do_not_specialize=["T", "H", "Hq", "Tp", "N"])
def _dkv_bwd(Q, K, V, Bg, dSst, dZst, DY, DEN, DELTA, DKO, DV, KDK, scale,
             T, H, Hq, Tp, N,
             D_HEAD: tl.constexpr, DINT: tl.constexpr, C: tl.constexpr, BM: tl.constexpr,
             DT: tl.constexpr, PREC: tl.constexpr, PART: tl.constexpr, RANK1: tl.constexpr,
             READ_PAIR: tl.constexpr = 0, FUSED: tl.constexpr = True):
    """dk and dv of one row block of keys. PART 0 computes both in one pass; 1 only dv and 2
    only dk (two launches with fewer live registers each; the intra-chunk scores are computed
    twice); 3 the dv pass and then the dk pass in one program (one launch, one accumulator
    live at a time). dv and dk go to DV and DKO in the input dtype, dk with its row sums
    k.dk in KDK [B*H, T]; without FUSED, dk's state term is _state_grad's: DKO is float32
    and gets the rest."""
    if PART == 3:
        _dkv_rows(Q, K, V, Bg, dSst, dZst, DY, DEN, DELTA, DKO, DV, KDK, scale, T, H, Hq,
                  Tp, N, D_HEAD, DINT, C, BM, DT, PREC, RANK1, True, False, READ_PAIR)
        _dkv_rows(Q, K, V, Bg, dSst, dZst, DY, DEN, DELTA, DKO, DV, KDK, scale, T, H, Hq,
                  Tp, N, D_HEAD, DINT, C, BM, DT, PREC, RANK1, False, True, 0, FUSED)
    else:
        _dkv_rows(Q, K, V, Bg, dSst, dZst, DY, DEN, DELTA, DKO, DV, KDK, scale, T, H, Hq,
                  Tp, N, D_HEAD, DINT, C, BM, DT, PREC, RANK1, PART != 2, PART != 1,
                  READ_PAIR, FUSED)


@triton.jit
def _dkv_rows(Q, K, V, Bg, dSst, dZst, DY, DEN, DELTA, DKO, DV, KDK, scale, T, H, Hq,
              Tp, N,
              D_HEAD: tl.constexpr, DINT: tl.constexpr, C: tl.constexpr, BM: tl.constexpr,
              DT: tl.constexpr, PREC: tl.constexpr, RANK1: tl.constexpr, DO_V: tl.constexpr,
              DO_K: tl.constexpr, READ_PAIR: tl.constexpr = 0, FUSED: tl.constexpr = True):
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
        orow = DKO + (b.to(tl.int64) * T * H + h) * D_HEAD + rows.to(tl.int64) * krs
        if FUSED:
            # The state write: S[b, c] += gk k_b k_c v, so dk += 2 gk dS k . v.
            dk = _grad_rows(dk, v, gk, krow, rm, Sb, cols, D_HEAD, DT, PREC)
            _finish_rows(orow, k, dk, KDK + bh64 * T + rows, rm, cols)
        else:
            tl.store(orow[:, None] + cols[None, :], dk, mask=rm[:, None])


@triton.jit(do_not_specialize=["T", "H", "Hx", "Tp", "N"])
def _state_grad(X, A, Bg, DEN, Sst, G32, GO, XDX, scale, T, H, Hx, Tp, N,
                D_HEAD: tl.constexpr, DINT: tl.constexpr, C: tl.constexpr, BM: tl.constexpr,
                DT: tl.constexpr, PREC: tl.constexpr, IS_Q: tl.constexpr):
    """The state term of dq (IS_Q: A = dy, over den, against the forward's states) or of dk
    (A = v, against the state gradients) for one row block of head Hx, added to the rest
    of the gradient in G32 (float32, from _dq_bwd / _dkv_bwd without FUSED), written to GO
    in the input dtype with the row sums x.dx in XDX [B*Hx, T]. Its own launch: light
    enough for several programs per multiprocessor, where the fused kernels hold 255
    registers."""
    pm, pbh, b, hx, h, n, rows, rm, cols, bh64, rs, _, xrow, _, _ = \
        _query_block(X, X, X, T, H, Hx, D_HEAD, C, BM)
    rowoff = (b.to(tl.int64) * T * Hx + hx) * D_HEAD + rows.to(tl.int64) * rs   # x's, A's, G's
    # A in its dtype, and tiles loaded where used: fewer registers live across the loop
    a = tl.load(A + rowoff[:, None] + cols[None, :], mask=rm[:, None], other=0.0)
    bx = tl.load(Bg + bh64 * Tp + rows)
    if IS_Q:   # dq's A is dy / den: 1/den joins the row factor
        den = tl.load(DEN + pbh.to(tl.int64) * T + rows, mask=rm, other=1.0)
        fac = scale * scale * tl.exp(bx) / tl.where(den > 0, den, 1.0)
    else:
        fac = tl.exp(tl.load(Bg + bh64 * Tp + n * C + C - 1) - bx)
    g = tl.load(G32 + rowoff[:, None] + cols[None, :], mask=rm[:, None], other=0.0)
    g = _grad_rows(g, a, fac, xrow, rm, Sst + (bh64 * N + n) * DINT * D_HEAD, cols, D_HEAD,
                   DT, PREC)
    x = tl.load(xrow[:, None] + cols[None, :], mask=rm[:, None], other=0.0)
    _finish_rows(GO + rowoff, x, g, XDX + pbh.to(tl.int64) * T + rows, rm, cols)
