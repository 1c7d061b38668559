"""Internal feature layout of the Triton kernels and its map to the canonical layout.

Internal: the head dim is cut into 16-wide blocks; each block pair (I <= J) owns a 16x16 tile
of features x[I*16+a] * x[J*16+b] with weight sqrt(2) off the diagonal pairs and 1 on them
(full 16x16 tiles, so D_int = (d^2 + 16 d) / 2: 2560 at d=64 against the canonical 2080).
Tiles keep every matmul dense; the canonical layout (reference.feature_index) is used only
at the API boundary (initial state in, final state out).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

BLOCK = 16  # width of a head-dim block; a block pair owns BLOCK*BLOCK features


def block_pairs(d: int) -> list[tuple[int, int]]:
    """(I, J) block pairs with I <= J, in tile order."""
    nb = d // BLOCK
    return [(i, j) for i in range(nb) for j in range(i, nb)]


def internal_dim(d: int) -> int:
    return len(block_pairs(d)) * BLOCK * BLOCK


@lru_cache(maxsize=None)
def canonical_map(d: int) -> tuple[np.ndarray, np.ndarray]:
    """For each internal feature f: the canonical feature it maps to and a coefficient.

    internal -> canonical: S_c[idx[f]] += coef[f] * S_int[f]   (scatter-add)
    canonical -> internal: S_int[f] = coef[f] * S_c[idx[f]]     (gather)
    The two maps are transposes of each other, so the same pair also maps gradients.
    """
    from retention.reference import feature_index

    tuples, _ = feature_index(d, 2)
    where = {(int(i), int(j)): n for n, (i, j) in enumerate(tuples)}
    idx, coef = [], []
    for bi, bj in block_pairs(d):
        for a in range(BLOCK):
            for b in range(BLOCK):
                i, j = bi * BLOCK + a, bj * BLOCK + b
                idx.append(where[(min(i, j), max(i, j))])
                # Diagonal tiles hold (a,b) and (b,a) for one canonical sqrt(2)-feature.
                coef.append(1.0 / math.sqrt(2.0) if bi == bj and a != b else 1.0)
    return np.asarray(idx, dtype=np.int64), np.asarray(coef, dtype=np.float64)


def to_internal(S_BHDd, z_BHD):
    """Canonical (S [B,H,D,d], z [B,H,D]) -> internal float32 (S [B,H,Di,d], z [B,H,Di])."""
    import torch

    d = S_BHDd.shape[-1]
    idx_np, coef_np = canonical_map(d)
    idx = torch.as_tensor(idx_np, device=S_BHDd.device)
    coef = torch.as_tensor(coef_np, device=S_BHDd.device, dtype=torch.float32)
    S = S_BHDd.float().index_select(2, idx) * coef[:, None]
    z = z_BHD.float().index_select(2, idx) * coef
    return S, z


def to_canonical(S_BHDd, z_BHD):
    """Internal float32 (S [B,H,Di,d], z [B,H,Di]) -> canonical (S [B,H,D,d], z [B,H,D])."""
    import torch

    B, H, _, d = S_BHDd.shape
    idx_np, coef_np = canonical_map(d)
    D = math.comb(d + 1, 2)
    idx = torch.as_tensor(idx_np, device=S_BHDd.device)
    coef = torch.as_tensor(coef_np, device=S_BHDd.device, dtype=torch.float32)
    S = S_BHDd.new_zeros(B, H, D, d).index_add_(2, idx, S_BHDd * coef[:, None])
    z = z_BHD.new_zeros(B, H, D).index_add_(2, idx, z_BHD * coef)
    return S, z
