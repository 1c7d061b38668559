"""The Triton kernels' internal feature layout against the canonical one, and the package's
availability report; plain torch, no triton needed."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from retention.kernels.triton.layout import (canonical_map, internal_dim,  # noqa: E402
                                             internal_features, row_offsets, to_canonical,
                                             to_internal)
from retention.reference import phi  # noqa: E402


def _phi_internal(x: np.ndarray, power: int = 1) -> np.ndarray:
    """Internal features: row a holds w^power x_a x_b for b from a's 16-block on (layout.py):
    power 1 the symmetric feature map, 0 what the kernels store, 2 what their reads weigh."""
    feats = internal_features(x.shape[-1])
    return np.stack([w ** power * x[..., a] * x[..., b] for a, b, w in feats], -1)


@pytest.mark.parametrize("d", [16, 32, 64])
def test_internal_features_give_the_same_kernel(d):
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 5, d))
    assert _phi_internal(q).shape[-1] == internal_dim(d) == (d * d + 16 * d) // 2
    np.testing.assert_allclose(_phi_internal(q) @ _phi_internal(k).T, (q @ k.T) ** 2, rtol=1e-10)
    np.testing.assert_allclose(_phi_internal(q, 2) @ _phi_internal(k, 0).T, (q @ k.T) ** 2,
                               rtol=1e-10)


@pytest.mark.parametrize("d", [32, 128])
def test_row_offsets_match_the_feature_order(d):
    feats = internal_features(d)
    for a, (off, w) in enumerate(row_offsets(d)):
        assert [f[:2] for f in feats[off:off + w]] == [(a, b) for b in range(d - w, d)]


@pytest.mark.parametrize("d", [16, 32, 64])
def test_state_maps_between_layouts(d):
    """A state built in the internal layout (S unweighted, as the kernels store it, and the
    Gram matrix Z) maps to the canonical state of the same keys, both layouts read the same
    outputs, and canonical -> internal -> canonical is the identity."""
    rng = np.random.default_rng(1)
    k, v, q = rng.standard_normal((7, d)), rng.standard_normal((7, d)), rng.standard_normal((3, d))
    S_int = torch.tensor(_phi_internal(k, 0).T @ v, dtype=torch.float32)[None, None]
    Z_int = torch.tensor(k.T @ k, dtype=torch.float32)[None, None]
    S_c, z_c = to_canonical(S_int, Z_int)
    np.testing.assert_allclose(S_c[0, 0].numpy(), phi(k).T @ v, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(z_c[0, 0].numpy(), phi(k).sum(0), rtol=1e-4, atol=1e-4)
    S_back, Z_back = to_internal(S_c, z_c)
    np.testing.assert_allclose(_phi_internal(q, 2) @ S_back[0, 0].numpy(), phi(q) @ S_c[0, 0].numpy(),
                               rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.einsum("ta,ab,tb->t", q, Z_back[0, 0].numpy(), q),
                               phi(q) @ z_c[0, 0].numpy(), rtol=1e-4, atol=1e-3)
    S_again, z_again = to_canonical(S_back, Z_back)
    torch.testing.assert_close(S_again, S_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_again, z_c, rtol=1e-5, atol=1e-5)
    idx, _ = canonical_map(d)
    assert set(idx.tolist()) == set(range(math.comb(d + 1, 2)))


def test_available_says_why_not(monkeypatch):
    import retention.kernels.triton as kt

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, why = kt.available()
    if not torch.cuda.is_available():
        assert not ok and why
