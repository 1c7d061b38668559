"""Float64 NumPy reference of power retention (DESIGN section 1): the ground truth for every
backend and kernel. Three forms of one function: attention (quadratic), recurrent (one state
update per token) and chunked (attention inside a chunk, a carried state across chunks).

Shapes: q_BTQd [B,T,Hq,d], k_BTHd / v_BTHd [B,T,H,d], log_g_BTH [B,T,H] (<= 0).
State: S_BHDd [B,H,D,d] and z_BHD [B,H,D], D = C(d+p-1, p), in the canonical feature layout.
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np

from retention.shapes import check_retention_inputs, check_state_shapes

FORMS = ("attention", "recurrent", "chunked")


@lru_cache(maxsize=None)
def feature_index(d: int, degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing index tuples [D, p] and their sqrt(multinomial) weights [D]."""
    tuples = np.array(list(itertools.combinations_with_replacement(range(d), degree)),
                      dtype=np.int64).reshape(-1, degree)
    weights = np.empty(len(tuples))
    for n, t in enumerate(tuples):
        counts = np.bincount(t)
        multinomial = math.factorial(degree) / np.prod([math.factorial(c) for c in counts])
        weights[n] = math.sqrt(multinomial)
    return tuples, weights


def feature_dim(d: int, degree: int) -> int:
    return math.comb(d + degree - 1, degree)


def phi(x: np.ndarray, degree: int = 2) -> np.ndarray:
    """Symmetric power feature map over the last axis: phi(q) . phi(k) == (q . k) ** degree."""
    x = np.asarray(x, dtype=np.float64)
    tuples, weights = feature_index(x.shape[-1], degree)
    out = weights * x[..., tuples[:, 0]]
    for t in range(1, degree):
        out = out * x[..., tuples[:, t]]
    return out


def _prepare(q, k, v, log_g, scale):
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    log_g = None if log_g is None else np.asarray(log_g, dtype=np.float64)
    B, T, Hq, H, d = check_retention_inputs(q.shape, k.shape, v.shape,
                                            None if log_g is None else log_g.shape)
    if log_g is None:
        log_g = np.zeros((B, T, H))
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    # Grouped queries: query head i reads KV head i // (Hq // H); view q as [B,T,H,Hq/H,d].
    return q.reshape(B, T, H, Hq // H, d), k, v, log_g, scale


def _attention(q, k, v, log_g, degree, scale):
    B, T, H, R, d = q.shape
    G = np.cumsum(log_g, axis=1)                                     # [B,T,H]
    scores = np.einsum("bihrd,bjhd->bhrij", q, k) * scale
    decay = np.exp(G.transpose(0, 2, 1)[:, :, None, :, None] - G.transpose(0, 2, 1)[:, :, None, None, :])
    w = np.where(np.tril(np.ones((T, T), dtype=bool)), decay * scores ** degree, 0.0)
    y = np.einsum("bhrij,bjhd->bihrd", w, v) / w.sum(-1).transpose(0, 3, 1, 2)[..., None]
    return y


def _init_state(B, H, d, degree, initial_state):
    D = feature_dim(d, degree)
    if initial_state is None:
        return np.zeros((B, H, D, d)), np.zeros((B, H, D))
    S, z = (np.asarray(a, dtype=np.float64).copy() for a in initial_state)
    check_state_shapes(S.shape, z.shape, B, H, D, d)
    return S, z


def _recurrent(q, k, v, log_g, degree, scale, initial_state):
    B, T, H, R, d = q.shape
    S, z = _init_state(B, H, d, degree, initial_state)
    y = np.empty_like(q)
    for t in range(T):
        g = np.exp(log_g[:, t])[:, :, None]                          # [B,H,1]
        fk = phi(k[:, t], degree)                                    # [B,H,D]
        S = g[..., None] * S + fk[..., None] * v[:, t, :, None, :]
        z = g * z + fk
        fq = phi(q[:, t] * scale, degree)                            # [B,H,R,D]
        y[:, t] = np.einsum("bhrD,bhDd->bhrd", fq, S) / np.einsum("bhrD,bhD->bhr", fq, z)[..., None]
    return y, (S, z)


def _chunked(q, k, v, log_g, degree, scale, chunk_size, initial_state):
    B, T, H, R, d = q.shape
    S, z = _init_state(B, H, d, degree, initial_state)
    y = np.empty_like(q)
    for start in range(0, T, chunk_size):
        sl = slice(start, min(start + chunk_size, T))
        qc, kc, vc = q[:, sl], k[:, sl], v[:, sl]
        b = np.cumsum(log_g[:, sl], axis=1).transpose(0, 2, 1)       # [B,H,c] gate since chunk start
        c = b.shape[-1]
        # Inside the chunk: the attention form with gates relative to the chunk start.
        w = np.einsum("bihrd,bjhd->bhrij", qc, kc) * scale
        w = w ** degree * np.exp(b[:, :, None, :, None] - b[:, :, None, None, :])
        w = np.where(np.tril(np.ones((c, c), dtype=bool)), w, 0.0)
        num = np.einsum("bhrij,bjhd->bhrid", w, vc)
        den = w.sum(-1)
        # Across chunks: queries read the carried state, discounted from the chunk start.
        fq = phi(qc * scale, degree) * np.exp(b).transpose(0, 2, 1)[:, :, :, None, None]
        num += np.einsum("bihrD,bhDd->bhrid", fq, S)
        den += np.einsum("bihrD,bhD->bhri", fq, z)
        y[:, sl] = (num / den[..., None]).transpose(0, 3, 1, 2, 4)
        # Carry: keys discounted to the chunk end, the old state by the chunk's total gate.
        fk = phi(kc, degree) * np.exp(b[:, :, -1:] - b).transpose(0, 2, 1)[..., None]
        total = np.exp(b[:, :, -1])
        S = total[..., None, None] * S + np.einsum("bjhD,bjhd->bhDd", fk, vc)
        z = total[..., None] * z + fk.sum(1)
    return y, (S, z)


def power_retention(q, k, v, log_g=None, *, degree: int = 2, scale: float | None = None,
                    chunk_size: int | None = None, form: str = "attention",
                    initial_state=None, return_state: bool = False):
    """y [B,T,Hq,d] of gated power retention in float64.

    `initial_state` (S, z) and `return_state` are for the recurrent and chunked forms (the
    attention form has no state). `chunk_size` defaults to 64 for the chunked form.
    """
    if not isinstance(degree, int) or degree < 2 or degree % 2:
        raise ValueError(f"degree must be an even integer >= 2, got {degree!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    qg, k, v, log_g, scale = _prepare(q, k, v, log_g, scale)
    B, T, H, R, d = qg.shape
    if form == "attention":
        if initial_state is not None or return_state:
            raise ValueError("the attention form has no state; use form='recurrent' or 'chunked'")
        return _attention(qg, k, v, log_g, degree, scale).reshape(B, T, H * R, d)
    if form == "recurrent":
        y, state = _recurrent(qg, k, v, log_g, degree, scale, initial_state)
    else:
        y, state = _chunked(qg, k, v, log_g, degree, scale, chunk_size or 64, initial_state)
    y = y.reshape(B, T, H * R, d)
    return (y, state) if return_state else y
