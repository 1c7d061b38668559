"""Backend-neutral token sampling on host logits (NumPy).

Both backends hand the last position's float32 logits [B, V] to these functions, so a seeded
run draws the same tokens on MLX and torch. Order (as in Hugging Face's generate): repetition
penalty, then temperature, then top-k, top-p and min-p, then one uniform draw per row from a
seeded numpy Generator. temperature == 0 is greedy (argmax after the repetition penalty).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1) (0 = off), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), "
                             f"got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits_BV: np.ndarray, seen_BV: np.ndarray,
                             penalty: float) -> np.ndarray:
    """CTRL-style penalty on tokens already in the row (prompt and output): positive logits
    are divided by `penalty`, negative ones multiplied, so seen tokens always lose."""
    if penalty == 1.0:
        return logits_BV
    penalized = np.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return np.where(seen_BV, penalized, logits_BV)


def top_k_filter(logits_BV: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits of each row (ties at the k-th value are kept too)."""
    if k <= 0 or k >= logits_BV.shape[-1]:
        return logits_BV
    kth_B1 = np.partition(logits_BV, -k, axis=-1)[:, -k:].min(-1, keepdims=True)
    return np.where(logits_BV >= kth_B1, logits_BV, -np.inf)


def top_p_filter(logits_BV: np.ndarray, p: float) -> np.ndarray:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p
    (the most likely token always stays; ties are ordered by token id)."""
    if p >= 1.0:
        return logits_BV
    probs_BV = softmax(logits_BV)
    keep_BV = np.zeros(probs_BV.shape, dtype=bool)
    for b, probs in enumerate(probs_BV):
        order = _nucleus_candidates(probs, p)
        sorted_p = probs[order]
        before = np.cumsum(sorted_p) - sorted_p        # mass of strictly better tokens
        keep_BV[b, order[before < p]] = True
    return np.where(keep_BV, logits_BV, -np.inf)


def _nucleus_candidates(probs_V: np.ndarray, p: float) -> np.ndarray:
    """Token ids by falling probability, enough of them to hold the nucleus. A partial sort of
    the top 256, 1024, ... tokens instead of sorting the whole vocabulary each step."""
    V, k = len(probs_V), 256
    while k < V:
        top = np.argpartition(-probs_V, k - 1)[:k]
        if probs_V[top].sum() >= p + 1e-6:          # margin: summation order may differ
            # Every token tied with the last candidate, so ties go by id (argpartition takes
            # an arbitrary part of a tie); filtered tokens (p = 0) never join a nucleus.
            top = np.flatnonzero(probs_V >= max(probs_V[top].min(), np.finfo(float).tiny))
            break
        k *= 4
    else:
        top = np.arange(V)
    return top[np.lexsort((top, -probs_V[top]))]


def min_p_filter(logits_BV: np.ndarray, min_p: float) -> np.ndarray:
    """Keep tokens whose probability is at least min_p times the row's top probability."""
    if min_p <= 0.0:
        return logits_BV
    # p_i >= min_p * p_max  <=>  logit_i >= max_logit + log(min_p)
    threshold_B1 = logits_BV.max(-1, keepdims=True) + np.log(min_p)
    return np.where(logits_BV >= threshold_B1, logits_BV, -np.inf)


def softmax(logits_BV: np.ndarray) -> np.ndarray:
    x = logits_BV - logits_BV.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def filtered_logits(logits_BV: np.ndarray, params: SamplingParams,
                    seen_BV: np.ndarray | None = None) -> np.ndarray:
    """The float64 logits the draw is made from: penalty, temperature, then the filters."""
    logits_BV = np.asarray(logits_BV, dtype=np.float64)
    if logits_BV.ndim != 2:
        raise ValueError(f"logits must have shape [B, V], got {logits_BV.shape}")
    if seen_BV is not None:
        logits_BV = apply_repetition_penalty(logits_BV, seen_BV, params.repetition_penalty)
    if params.greedy:
        return logits_BV
    logits_BV = logits_BV / params.temperature
    logits_BV = top_k_filter(logits_BV, int(params.top_k))
    logits_BV = top_p_filter(logits_BV, params.top_p)
    return min_p_filter(logits_BV, params.min_p)


def sample_tokens(logits_BV: np.ndarray, params: SamplingParams, rng: np.random.Generator,
                  seen_BV: np.ndarray | None = None) -> np.ndarray:
    """One token id per row (int64 [B]): argmax when greedy, else one uniform per row mapped
    through the row's CDF (float64), so a seed fixes the tokens whatever produced the logits."""
    logits_BV = filtered_logits(logits_BV, params, seen_BV)
    if params.greedy:
        return logits_BV.argmax(-1).astype(np.int64)
    probs_BV = softmax(logits_BV)
    cdf_BV = np.cumsum(probs_BV, axis=-1)
    u_B1 = rng.random((logits_BV.shape[0], 1)) * cdf_BV[:, -1:]
    tokens_B = (cdf_BV <= u_B1).sum(-1)                # first index whose cdf exceeds u
    return np.minimum(tokens_B, logits_BV.shape[-1] - 1).astype(np.int64)


class Sampler:
    """Sampling params + a seeded RNG + which tokens each row has seen (for the penalty)."""

    def __init__(self, params: SamplingParams, vocab_size: int, batch: int,
                 seed: int | None = None):
        self.params = params
        self.rng = np.random.default_rng(seed)
        self.track = params.repetition_penalty != 1.0
        self.seen_BV = np.zeros((batch, vocab_size), dtype=bool) if self.track else None

    def observe(self, rows, tokens) -> None:
        """Mark tokens as seen: rows [n] with tokens [n], or one row with a token list."""
        if self.track:
            self.seen_BV[np.asarray(rows, np.int64), np.asarray(tokens, np.int64)] = True

    def __call__(self, logits_BV: np.ndarray, rows) -> np.ndarray:
        """Sample for `rows` (indices into the batch) from their logits [len(rows), V]."""
        seen = self.seen_BV[np.asarray(rows, np.int64)] if self.track else None
        tokens_B = sample_tokens(logits_BV, self.params, self.rng, seen)
        self.observe(rows, tokens_B)
        return tokens_B
