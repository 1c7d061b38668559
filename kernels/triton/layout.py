"""Internal state layout of the Triton kernels and its map to the canonical layout.

S (numerator state): row-major by head-dim row a. With I = a // 16 the 16-wide block of a,
row a holds the features x[a] * x[b] for b in [16 I, d) (so a diagonal block holds both (a, b)
and (b, a)): S[a, b] = sum_t k_a k_b v_t, the full-square entry, unweighted. A read weighs
each by its multiplicity m = w^2 (1 for b in block I, 2 for b in a later block, whose (b, a)
is not stored), with w the feature weight of internal_features, so that phi_int(q).phi_int(k)
= (q.k)^2; the gradients gather whole rows of the square (chunked._grad_rows). Row a starts
at off(a) = OFF_I + (a - 16 I) * W_I, W_I = d - 16 I, OFF_I = 16 (I d - 8 I (I - 1)); in all
D_int = (d^2 + 16 d) / 2 features: 2560 at d=64 against the canonical 2080 (768 at 32, 9216 at
128). Every kernel matmul over features is then x[:, a] times a [rows, W_I] column range.
z (denominator state): the d x d Gram matrix Z = sum_t k_t k_t^T (symmetric), since
phi(q).z = q^T Z q; canonical z[(i, j)] = sqrt(2) Z[i, j] for i < j and Z[i, i] on the diagonal.
The canonical layout (reference.feature_index) is used only at the API boundary.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

BLOCK = 16  # width of a head-dim block


def row_offsets(d: int) -> list[tuple[int, int]]:
    """(offset, width) of each row a of the internal state."""
    out = []
    for a in range(d):
        i = a // BLOCK
        w = d - BLOCK * i
        out.append((BLOCK * (i * d - 8 * i * (i - 1)) + (a - BLOCK * i) * w, w))
    return out


def internal_dim(d: int) -> int:
    off, w = row_offsets(d)[-1]
    return off + w


def internal_features(d: int) -> list[tuple[int, int, float]]:
    """(a, b, weight) of each internal feature, in order."""
    out = []
    for a in range(d):
        i = a // BLOCK
        for b in range(BLOCK * i, d):
            out.append((a, b, 1.0 if b < BLOCK * (i + 1) else math.sqrt(2.0)))
    return out


@lru_cache(maxsize=None)
def canonical_map(d: int) -> tuple[np.ndarray, np.ndarray]:
    """For each weighted internal feature f (internal_features): the canonical feature it
    maps to and a coefficient.

    internal -> canonical: S_c[idx[f]] += coef[f] * S_w[f]   (scatter-add)
    canonical -> internal: S_w[f] = coef[f] * S_c[idx[f]]     (gather)
    The two maps are transposes of each other. The kernels store S_w / w (to_internal).
    """
    return feature_map(d, internal_features(d))


def feature_map(d: int, features: list) -> tuple[np.ndarray, np.ndarray]:
    """canonical_map for any list of (a, b, weight) features, None for a pad (coefficient 0).
    A feature of weight 1 off the diagonal is one of a pair, (a, b) and (b, a), that share
    one canonical sqrt(2)-feature, so each takes 1/sqrt(2) of it."""
    from retention.reference import feature_index

    tuples, _ = feature_index(d, 2)
    where = {(int(i), int(j)): n for n, (i, j) in enumerate(tuples)}
    idx, coef = [], []
    for f in features:
        a, b, w = f if f is not None else (0, 0, 0.0)
        idx.append(where[(min(a, b), max(a, b))])
        coef.append(0.0 if f is None else 1.0 / math.sqrt(2.0) if (w == 1.0 and a != b) else 1.0)
    return np.asarray(idx, dtype=np.int64), np.asarray(coef, dtype=np.float64)


@lru_cache(maxsize=None)
def gram_map(d: int) -> tuple[np.ndarray, np.ndarray]:
    """The same pair for z and the Gram matrix Z (flattened d*d, row-major)."""
    from retention.reference import feature_index

    tuples, _ = feature_index(d, 2)
    where = {(int(i), int(j)): n for n, (i, j) in enumerate(tuples)}
    idx = [where[(min(a, b), max(a, b))] for a in range(d) for b in range(d)]
    coef = [1.0 if a == b else 1.0 / math.sqrt(2.0) for a in range(d) for b in range(d)]
    return np.asarray(idx, dtype=np.int64), np.asarray(coef, dtype=np.float64)


def _maps(d, device):
    """canonical_map's index with its coefficient for the stored rows, which hold the
    weighted features' values divided by w: gather coef / w, scatter coef * w."""
    import torch

    idx_np, coef_np = canonical_map(d)
    w_np = np.asarray([w for _, _, w in internal_features(d)])
    gidx_np, gcoef_np = gram_map(d)
    f32 = torch.float32
    as_f32 = lambda a: torch.as_tensor(a, device=device, dtype=f32)  # noqa: E731
    return (torch.as_tensor(idx_np, device=device), as_f32(coef_np / w_np),
            as_f32(coef_np * w_np), torch.as_tensor(gidx_np, device=device), as_f32(gcoef_np))


def to_internal(S_BHDd, z_BHD):
    """Canonical (S [B,H,D,d], z [B,H,D]) -> internal float32 (S [B,H,Di,d], Z [B,H,d,d]).
    Also maps a canonical state gradient to the one the kernels carry, which is likewise
    per full-square entry (the gradient of sum_{a,b} over the whole square)."""
    B, H, _, d = S_BHDd.shape
    idx, gather, _, gidx, gcoef = _maps(d, S_BHDd.device)
    S = S_BHDd.float().index_select(2, idx) * gather[:, None]
    Z = (z_BHD.float().index_select(2, gidx) * gcoef).reshape(B, H, d, d)
    return S, Z


def to_canonical(S_BHDd, Z_BHdd):
    """Internal float32 (S [B,H,Di,d], Z [B,H,d,d]) -> canonical (S [B,H,D,d], z [B,H,D]):
    to_internal's inverse on states, and on the kernels' state gradients the canonical
    gradient (to_internal's transpose with each row weighed by its multiplicity)."""
    B, H, _, d = S_BHDd.shape
    idx, _, scatter, gidx, gcoef = _maps(d, S_BHDd.device)
    D = math.comb(d + 1, 2)
    S = S_BHDd.new_zeros(B, H, D, d).index_add_(2, idx, S_BHDd * scatter[:, None])
    z = Z_BHdd.new_zeros(B, H, D).index_add_(2, gidx, Z_BHdd.reshape(B, H, d * d) * gcoef)
    return S, z
