"""Single-token decode step of power retention, degree 2, on the canonical state layout.

One program per (batch x KV head, value tile): it streams the state once, writes the decayed
and updated state, and reads it with every query head of its group (GQA) on the way.
"""
import triton
import triton.language as tl


@triton.jit
def _step(Q, K, V, LG, S, Z, SN, ZN, Y, IDX_I, IDX_J, WT, scale,
          H, Hq, D,
          D_HEAD: tl.constexpr, RGP: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr):
    bh = tl.program_id(0)
    pv = tl.program_id(1)
    b = bh // H
    h = bh % H
    RG = Hq // H
    bh64 = bh.to(tl.int64)
    vc = pv * BV + tl.arange(0, BV)
    r = tl.arange(0, RGP)
    rmask = r < RG
    qrow = (b * Hq + h * RG + r).to(tl.int64) * D_HEAD            # [RGP]
    g = tl.exp(tl.load(LG + bh64))
    v = tl.load(V + bh64 * D_HEAD + vc).to(tl.float32)
    num = tl.zeros([RGP, BV], dtype=tl.float32)
    den = tl.zeros([RGP], dtype=tl.float32)
    for f0 in range(0, D, BF):
        fi = f0 + tl.arange(0, BF)
        fm = fi < D
        ii = tl.load(IDX_I + fi, mask=fm, other=0)
        jj = tl.load(IDX_J + fi, mask=fm, other=0)
        wt = tl.load(WT + fi, mask=fm, other=0.0)
        ki = tl.load(K + bh64 * D_HEAD + ii).to(tl.float32)
        kj = tl.load(K + bh64 * D_HEAD + jj).to(tl.float32)
        phik = wt * ki * kj
        s_old = tl.load(S + (bh64 * D + fi[:, None]) * D_HEAD + vc[None, :], mask=fm[:, None],
                        other=0.0)
        s_new = g * s_old + phik[:, None] * v[None, :]
        tl.store(SN + (bh64 * D + fi[:, None]) * D_HEAD + vc[None, :], s_new, mask=fm[:, None])
        z_new = g * tl.load(Z + bh64 * D + fi, mask=fm, other=0.0) + phik
        tl.store(ZN + bh64 * D + fi, z_new, mask=fm & (fi < tl.where(pv == 0, D, 0)))
        m2 = rmask[:, None] & fm[None, :]
        qi = tl.load(Q + qrow[:, None] + ii[None, :], mask=m2, other=0.0).to(tl.float32)
        qj = tl.load(Q + qrow[:, None] + jj[None, :], mask=m2, other=0.0).to(tl.float32)
        phiq = qi * qj * (wt * scale * scale)[None, :]               # [RGP, BF]
        num += tl.sum(phiq[:, :, None] * s_new[None, :, :], axis=1)
        den += tl.sum(phiq * z_new[None, :], axis=1)
    y = num / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(Y + qrow[:, None] + vc[None, :], y.to(Y.dtype.element_ty), mask=rmask[:, None])
