"""Can the state layout drop the diagonal blocks' duplicate features? A measured no, in Triton.

The kernels' row layout (kernels/triton/layout.py) holds x_a x_b for b in [16 I, d) in row a
of block I, so each diagonal 16-block holds both (a, b) and (b, a): D = 2560 at d=64 where the
canonical count is 2080. Two layouts keep 144 slots per diagonal block instead of 256
(D = 2112, 17.5% less state work in every state kernel):

- pairs: rows r and 15 - r of a block share one 16-wide tile of their 15 off-diagonal
  features (columns r+1.. scaled by x_r, then 16-r.. scaled by x_(15-r), one pad), the 16
  squares a ninth tile;
- cyclic: tile delta (0..8) is x_I * x_I rotated by delta, the edges (i, i + delta mod 16)
  of the complete graph on the block (delta 8: i < 8 only).

Each tile needs x's columns permuted per tile, where the row layout scales one loaded tile by
one column. This times the state read y = phi(x) . S (the forward's and dv's read) in the
three layouts, standalone kernels of one style, 65,536 tokens x 16 heads, d=64, bf16, a
state per 256-token chunk:

    python benchmarks/diagonal_layouts.py            # GPU: checks, then the table
    TRITON_INTERPRET=1 python benchmarks/diagonal_layouts.py --check   # CPU, float32

Result (H200, 2026-12-01, in docs/benchmarks.md): the fewer products do not pay for the
permuted tiles.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
import triton
import triton.language as tl

from retention.kernels.triton.layout import feature_map, internal_features
from retention.kernels.triton.testing import phi

SQRT2 = tl.constexpr(1.4142135623730951)
BM, CHUNK = 64, 256
FORMS = {"pairs (gathered loads)": 0, "cyclic (tl.gather)": 1, "cyclic (rotated loads)": 2}


def _off_diagonal_rows(d: int, I: int) -> list:
    return [(a, b, math.sqrt(2)) for a in range(16 * I, 16 * I + 16) for b in range(16 * I + 16, d)]


def pair_features(d: int) -> list:
    """(a, b, weight) per feature of the pair layout, None for a pad."""
    out = []
    for I in range(d // 16):
        out += _off_diagonal_rows(d, I)
        for r in range(8):
            for j in range(16):
                if j < 15 - r:
                    out.append((16 * I + r, 16 * I + r + 1 + j, math.sqrt(2)))
                else:
                    out.append((16 * I + 15 - r, 16 * I + j + 1, math.sqrt(2)) if j < 15 else None)
        out += [(16 * I + j, 16 * I + j, 1.0) for j in range(16)]
    return out


def cyclic_features(d: int) -> list:
    """(a, b, weight) per feature of the cyclic layout, None for a pad."""
    out = []
    for I in range(d // 16):
        out += _off_diagonal_rows(d, I)
        for delta in range(9):
            out += [None if delta == 8 and i >= 8 else
                    (16 * I + i, 16 * I + (i + delta) % 16, 1.0 if delta == 0 else math.sqrt(2))
                    for i in range(16)]
    return out


def layout_state(feats: list, S_NDd: torch.Tensor) -> torch.Tensor:
    """A canonical state [N, D, d] in a layout (layout.feature_map's gather)."""
    idx, coef = feature_map(S_NDd.shape[-1], feats)
    return S_NDd[:, torch.as_tensor(idx)] * torch.as_tensor(coef, dtype=S_NDd.dtype,
                                                             device=S_NDd.device)[None, :, None]


@triton.jit
def _scaled_dot(acc, xrow, xa, so, c0: tl.constexpr, P: tl.constexpr, s0: tl.constexpr,
                diag: tl.constexpr, I: tl.constexpr, cols, D_HEAD: tl.constexpr,
                DT: tl.constexpr):
    """acc += (x_a * w x[:, 16 I + c0 + (0..P)]) @ S rows s0..s0+P of a row at so."""
    c = 16 * I + c0 + tl.arange(0, P)
    xj = tl.load(xrow[:, None] + c[None, :]).to(tl.float32)
    xj = xj * (tl.where(c < 16 * I + 16, 1.0, SQRT2)[None, :] if diag else SQRT2)
    s = tl.load(so + (s0 + tl.arange(0, P))[:, None] * D_HEAD + cols[None, :])
    return tl.dot((xa[:, None] * xj).to(DT), s, acc)


@triton.jit
def _rows(acc, xrow, Sb, cols, I: tl.constexpr, c0: tl.constexpr, OFF: tl.constexpr,
          D_HEAD: tl.constexpr, DT: tl.constexpr):
    """The 16 rows a of block I over columns [16 I + c0, d), W wide, from S offset OFF."""
    W: tl.constexpr = D_HEAD - 16 * I - c0
    P1: tl.constexpr = W & (0 - W)
    R1: tl.constexpr = W - P1
    P2: tl.constexpr = R1 & (0 - R1)
    for al in range(16):
        xa = tl.load(xrow + 16 * I + al).to(tl.float32)
        so = Sb + (OFF + al * W) * D_HEAD
        acc = _scaled_dot(acc, xrow, xa, so, c0, P1, 0, c0 == 0, I, cols, D_HEAD, DT)
        if R1 > 0:
            acc = _scaled_dot(acc, xrow, xa, so, c0 + P1, P2, P1, False, I, cols, D_HEAD, DT)
    return acc


@triton.jit
def _diagonal_tiles(acc, xrow, Sb, cols, I: tl.constexpr, DB: tl.constexpr,
                    D_HEAD: tl.constexpr, DT: tl.constexpr, FORM: tl.constexpr):
    """The 9 tiles of diagonal block I at S offset DB, pair (FORM 0) or cyclic (1, 2)."""
    j = tl.arange(0, 16)
    xI = tl.load(xrow[:, None] + 16 * I + j[None, :]).to(tl.float32)
    sq = 128 if FORM == 0 else 0          # where the squares' tile sits
    s = tl.load(Sb + (DB + sq + j)[:, None] * D_HEAD + cols[None, :])
    acc = tl.dot((xI * xI).to(DT), s, acc)
    for t in tl.static_range(8):
        if FORM == 0:
            first = j < 15 - t
            g = tl.load(xrow[:, None] + 16 * I + tl.where(first, t + 1 + j, j + 1)[None, :],
                        mask=(j < 15)[None, :], other=0.0).to(tl.float32)
            xr = tl.load(xrow + 16 * I + t).to(tl.float32)
            xs = tl.load(xrow + 16 * I + 15 - t).to(tl.float32)
            A = g * tl.where(first[None, :], xr[:, None], xs[:, None]) * SQRT2
            row = t
        else:
            idx = (j + t + 1) % 16
            if FORM == 1:
                xr = tl.gather(xI, tl.broadcast_to(idx[None, :], xI.shape), 1)
            else:
                xr = tl.load(xrow[:, None] + 16 * I + idx[None, :]).to(tl.float32)
            A = xI * xr * SQRT2
            if t == 7:
                A = tl.where((j < 8)[None, :], A, 0.0)
            row = t + 1
        s = tl.load(Sb + (DB + 16 * row + j)[:, None] * D_HEAD + cols[None, :])
        acc = tl.dot(A.to(DT), s, acc)
    return acc


@triton.jit
def _diagonal_block(acc, xrow, Sb, cols, I: tl.constexpr, D_HEAD: tl.constexpr,
                    DT: tl.constexpr, FORM: tl.constexpr):
    WO: tl.constexpr = D_HEAD - 16 * I - 16
    OFF: tl.constexpr = 16 * (I * D_HEAD - 8 * I * (I - 1)) - 112 * I   # 144 - 256 per block
    if WO > 0:
        acc = _rows(acc, xrow, Sb, cols, I, 16, OFF, D_HEAD, DT)
    return _diagonal_tiles(acc, xrow, Sb, cols, I, OFF + 16 * WO, D_HEAD, DT, FORM)


@triton.jit
def _read(X, S, Y, DINT: tl.constexpr, D_HEAD: tl.constexpr, BM: tl.constexpr,
          C: tl.constexpr, DT: tl.constexpr, FORM: tl.constexpr):
    """y = phi(x) . S for one block of BM rows; FORM -1 is the row layout."""
    pm = tl.program_id(0)
    rows = pm * BM + tl.arange(0, BM)
    cols = tl.arange(0, D_HEAD)
    xrow = X + rows.to(tl.int64) * D_HEAD
    Sb = S + ((pm * BM) // C).to(tl.int64) * DINT * D_HEAD
    acc = tl.zeros([BM, D_HEAD], dtype=tl.float32)
    for I in tl.static_range(D_HEAD // 16):
        if FORM < 0:
            acc = _rows(acc, xrow, Sb, cols, I, 0, 16 * (I * D_HEAD - 8 * I * (I - 1)),
                        D_HEAD, DT)
        else:
            acc = _diagonal_block(acc, xrow, Sb, cols, I, D_HEAD, DT, FORM)
    tl.store(Y + rows[:, None].to(tl.int64) * D_HEAD + cols[None, :], acc)


def layouts(d: int) -> dict:
    """name -> (FORM, features)."""
    out = {"row (D=%d)" % len(internal_features(d)): (-1, internal_features(d))}
    for name, form in FORMS.items():
        feats = pair_features(d) if form == 0 else cyclic_features(d)
        out[f"{name} (D={len(feats)})"] = (form, feats)
    return out


def run_all(rows: int, d: int, dev: str, dt, DT, seed: int = 0, with_ref: bool = True):
    """(name, y, launch) per layout, on one canonical state per chunk, and the read in
    float32 torch when with_ref."""
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(rows, d, device=dev, generator=g).to(dt)
    S = torch.randn(rows // CHUNK, math.comb(d + 1, 2), d, device=dev, generator=g) * 0.05
    out = []
    for name, (form, feats) in layouts(d).items():
        Sl = layout_state(feats, S).to(dt).contiguous()
        y = torch.empty(rows, d, device=dev)
        launch = (lambda Sl=Sl, y=y, form=form, n=len(feats): _read[(rows // BM,)](
            x, Sl, y, DINT=n, D_HEAD=d, BM=BM, C=CHUNK, DT=DT, FORM=form, num_warps=4,
            num_stages=3))
        launch()
        out.append((name, y, launch))
    if not with_ref:
        return out, None
    ref = torch.einsum("ctD,cDe->cte", phi(x.float().view(-1, CHUNK, d)), S)
    return out, ref.reshape(rows, d)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="correctness only (the interpreter)")
    ap.add_argument("--rows", type=int, default=65536 * 16)
    args = ap.parse_args(argv)
    d = 64
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt, DT, tol = ((torch.bfloat16, tl.bfloat16, 1e-2) if dev == "cuda"
                   else (torch.float32, tl.float32, 1e-5))
    results, ref = run_all(2 * CHUNK if args.check else 1024, d, dev, dt, DT)
    ok = True
    for name, y, _ in results:
        e = ((y - ref).abs().max() / ref.abs().max()).item()
        ok &= e <= tol
        print(f"check {name}: relative error {e:.1e}{'' if e <= tol else ' FAIL'}")
    if args.check or not ok:
        return 0 if ok else 1
    results, _ = run_all(args.rows, d, dev, dt, DT, with_ref=False)
    flop = 2 * math.comb(d + 1, 2) * d * args.rows
    base = None
    print(f"\n{torch.cuda.get_device_name()} | triton {triton.__version__} | {args.rows} rows, "
          f"d={d}, bf16\n\n| layout | ms | canonical TFLOP/s | vs row |\n|---|---|---|---|")
    for name, _, launch in results:
        ms = triton.testing.do_bench(launch, warmup=50, rep=300)
        base = base or ms
        print(f"| {name} | {ms:.3f} | {flop / ms / 1e9:.0f} | {ms / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
