"""A differentiable attention-form twin of reference.power_retention in torch, with initial and
final state, for checking the kernels' gradients (float64 on CPU or GPU). Quadratic in T:
for tests and the GPU grid check only.
"""
from __future__ import annotations

import math

import torch

from retention.reference import feature_index


def phi(x: torch.Tensor) -> torch.Tensor:
    """Canonical degree-2 features over the last axis."""
    tuples, weights = feature_index(x.shape[-1], 2)
    t = torch.as_tensor(tuples, device=x.device)
    w = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
    return w * x[..., t[:, 0]] * x[..., t[:, 1]]


def attention_form(q, k, v, log_g=None, scale=None, initial_state=None):
    """y [B,T,Hq,d] and the final state (S [B,H,D,d], z [B,H,D]), in q's dtype."""
    B, T, Hq, d = q.shape
    H = k.shape[2]
    R = Hq // H
    scale = 1 / math.sqrt(d) if scale is None else scale
    if log_g is None:
        log_g = q.new_zeros(B, T, H)
    G = log_g.to(q.dtype).cumsum(1)
    qg = q.reshape(B, T, H, R, d)
    s = torch.einsum("bihrd,bjhd->bhrij", qg, k) * scale
    Gt = G.transpose(1, 2)
    tril = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    diff = torch.where(tril, Gt[:, :, :, None] - Gt[:, :, None, :], float("-inf"))
    w = s ** 2 * torch.exp(diff)[:, :, None]
    num = torch.einsum("bhrij,bjhd->bhrid", w, v)
    den = w.sum(-1)
    if initial_state is not None:
        S0, z0 = (a.to(q.dtype) for a in initial_state)
        fq = phi(qg * scale) * torch.exp(G)[..., None, None]
        num = num + torch.einsum("bihrD,bhDd->bhrid", fq, S0)
        den = den + torch.einsum("bihrD,bhD->bhri", fq, z0)
    y = (num / den[..., None]).permute(0, 3, 1, 2, 4).reshape(B, T, Hq, d)
    fk = phi(k) * torch.exp(G[:, -1:] - G)[..., None]
    S = torch.einsum("bjhD,bjhd->bhDd", fk, v)
    z = fk.sum(1)
    if initial_state is not None:
        S = S + torch.exp(G[:, -1])[..., None, None] * S0
        z = z + torch.exp(G[:, -1])[..., None] * z0
    return y, (S, z)
