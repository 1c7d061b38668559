"""MLX power retention (ops twin and recurrent step) against the float64 NumPy reference.

Note: MLX 0.32 runs float64 on the CPU, but its exp is only float32-accurate (~1e-7 relative),
so float64 MLX results are checked at 1e-5, not 1e-10.
"""
import math

import mlx.core as mx
import numpy as np
import pytest

from retention.backends.mlx.power_retention import (phi, power_retention_ops,
                                                    power_retention_step_ops)
from retention.reference import feature_dim
from retention.reference import phi as phi_ref
from retention.reference import power_retention as reference


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def inputs(B=3, T=63, Hq=4, H=2, d=8, seed=0, gate=True):
    r = np.random.default_rng(seed)
    q = r.standard_normal((B, T, Hq, d))
    k = r.standard_normal((B, T, H, d))
    v = r.standard_normal((B, T, H, d))
    log_g = -r.uniform(0.01, 0.5, (B, T, H)) if gate else None
    return q, k, v, log_g


def mlx_arrays(*arrays, dtype=mx.float32):
    return [None if a is None else mx.array(a, dtype=dtype) for a in arrays]


def test_phi_matches_reference_and_kernel_identity():
    x = np.random.default_rng(1).standard_normal((5, 6))
    for degree in (2, 4):
        f = np.array(phi(mx.array(x, dtype=mx.float32), degree))
        assert f.shape == (5, feature_dim(6, degree))
        assert rel_err(f, phi_ref(x, degree)) < 1e-6
        assert np.allclose(f[0] @ f[1], (x[0] @ x[1]) ** degree, rtol=1e-5)


@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("Hq,H", [(4, 2), (2, 2)])
def test_forward_matches_reference(gate, Hq, H):
    q, k, v, log_g = inputs(Hq=Hq, H=H, gate=gate)
    y = power_retention_ops(*mlx_arrays(q, k, v, log_g), chunk_size=16)
    assert y.shape == q.shape and y.dtype == mx.float32
    assert rel_err(y, reference(q, k, v, log_g)) <= 1e-5


@pytest.mark.parametrize("T,chunk", [(1, 16), (16, 16), (17, 16), (63, 64), (40, 128)])
def test_any_length(T, chunk):
    q, k, v, log_g = inputs(B=2, T=T)
    y = power_retention_ops(*mlx_arrays(q, k, v, log_g), chunk_size=chunk)
    assert rel_err(y, reference(q, k, v, log_g)) <= 1e-5


def test_scale_argument():
    q, k, v, log_g = inputs(B=1, T=20)
    y = power_retention_ops(*mlx_arrays(q, k, v, log_g), scale=0.7, chunk_size=8)
    assert rel_err(y, reference(q, k, v, log_g, scale=0.7)) <= 1e-5


def test_state_in_and_out_match_chunked_reference():
    q, k, v, log_g = inputs()
    _, first = reference(q[:, :21], k[:, :21], v[:, :21], log_g[:, :21], form="chunked",
                         chunk_size=16, return_state=True)
    want, (S_ref, z_ref) = reference(q[:, 21:], k[:, 21:], v[:, 21:], log_g[:, 21:],
                                     form="chunked", chunk_size=16, initial_state=first,
                                     return_state=True)
    y, (S, z) = power_retention_ops(*mlx_arrays(q[:, 21:], k[:, 21:], v[:, 21:], log_g[:, 21:]),
                                    chunk_size=16, initial_state=tuple(mlx_arrays(*first)),
                                    return_state=True)
    D = feature_dim(8, 2)
    assert S.shape == (3, 2, D, 8) and z.shape == (3, 2, D)
    assert S.dtype == mx.float32 and z.dtype == mx.float32
    assert rel_err(y, want) <= 1e-5
    assert rel_err(S, S_ref) <= 1e-5 and rel_err(z, z_ref) <= 1e-5


def test_degree_four():
    q, k, v, log_g = inputs(B=2, T=37, d=4)
    y, (S, z) = power_retention_ops(*mlx_arrays(q, k, v, log_g), degree=4, chunk_size=16,
                                    return_state=True)
    want, (S_ref, z_ref) = reference(q, k, v, log_g, degree=4, form="chunked", chunk_size=16,
                                     return_state=True)
    assert S.shape == (2, 2, feature_dim(4, 4), 4)
    assert rel_err(y, want) <= 1e-5
    assert rel_err(S, S_ref) <= 1e-5 and rel_err(z, z_ref) <= 1e-5


@pytest.mark.parametrize("degree,tol", [(2, 1e-5), (4, 1e-4)])
def test_stabilized_under_strong_gates_and_large_scores(degree, tol):
    # Gate sums reach -1900 (exp(-G) overflows any float) and scores (q.k)^p reach ~1e12.
    # Degree 4 gets 1e-4: float32 rounding of a small q.k is amplified 4x by the power.
    q, k, v, _ = inputs(B=2, T=63)
    log_g = np.full((2, 63, 2), -30.0)
    y = power_retention_ops(*mlx_arrays(5 * q, 5 * k, v, log_g), degree=degree, chunk_size=16)
    assert np.isfinite(np.array(y)).all()
    want = reference(5 * q, 5 * k, v, log_g, degree=degree, form="chunked", chunk_size=16)
    assert rel_err(y, want) <= tol


def test_low_precision_inputs_return_their_dtype():
    q, k, v, log_g = inputs(B=1, T=20)
    for dtype in (mx.bfloat16, mx.float16):
        y, (S, z) = power_retention_ops(*mlx_arrays(q, k, v, dtype=dtype),
                                        mx.array(log_g, dtype=mx.float32), chunk_size=8,
                                        return_state=True)
        assert y.dtype == dtype and S.dtype == mx.float32 and z.dtype == mx.float32
        rounded = [np.array(mx.array(a, dtype=dtype).astype(mx.float32)) for a in (q, k, v)]
        assert rel_err(y.astype(mx.float32), reference(*rounded, log_g)) <= 1e-2


def test_recurrent_step_matches_reference():
    # 1e-4, not 1e-5: phi(q).S sums D products of mixed sign, so float32 cancellation shows.
    q, k, v, log_g = inputs(B=3, T=20)
    state, ys = None, []
    for t in range(20):
        y_t, state = power_retention_step_ops(*mlx_arrays(q[:, t], k[:, t], v[:, t],
                                                          log_g[:, t]), state)
        ys.append(np.array(y_t))
    want, (S_ref, z_ref) = reference(q, k, v, log_g, form="recurrent", return_state=True)
    assert rel_err(np.stack(ys, 1), want) <= 1e-4
    assert rel_err(state[0], S_ref) <= 1e-5 and rel_err(state[1], z_ref) <= 1e-5


def test_step_continues_the_chunked_state():
    q, k, v, log_g = inputs(B=2, T=30)
    _, state = power_retention_ops(*mlx_arrays(q[:, :29], k[:, :29], v[:, :29], log_g[:, :29]),
                                   chunk_size=8, return_state=True)
    y_last, _ = power_retention_step_ops(*mlx_arrays(q[:, 29], k[:, 29], v[:, 29],
                                                     log_g[:, 29]), state)
    assert rel_err(y_last, reference(q, k, v, log_g)[:, 29]) <= 1e-5


def test_bad_inputs_raise_value_error():
    q, k, v, log_g = mlx_arrays(*inputs(B=1, T=8, Hq=3, H=2))
    with pytest.raises(ValueError, match="multiple"):
        power_retention_ops(q, k, v, log_g)
    q, k, v, log_g = mlx_arrays(*inputs(B=1, T=8))
    with pytest.raises(ValueError, match="log_g"):
        power_retention_ops(q, k, v, log_g[:, :4])
    with pytest.raises(ValueError, match="degree"):
        power_retention_ops(q, k, v, log_g, degree=3)
    with pytest.raises(ValueError, match="state must be"):
        power_retention_ops(q, k, v, log_g, initial_state=(mx.zeros((1, 2, 3, 8)),
                                                           mx.zeros((1, 2, 3))))


# --- gradients -----------------------------------------------------------------------------

def _mlx_grads(arrays, dtype, W, **kw):
    args = mlx_arrays(*arrays, dtype=dtype)
    W = mx.array(W, dtype=dtype)

    def loss(q, k, v, log_g):
        return (power_retention_ops(q, k, v, log_g, **kw) * W).sum()
    grads = mx.grad(loss, argnums=(0, 1, 2, 3))(*args)
    return [np.array(g).astype(np.float64) for g in grads]


def test_gradients_match_reference_finite_differences():
    # Every coordinate, central differences of the float64 reference, on a tiny GQA problem
    # whose length (7) is not a multiple of the chunk (3).
    arrays = list(inputs(B=2, T=7, Hq=2, H=1, d=3, seed=2))
    W = np.random.default_rng(3).standard_normal(arrays[0].shape)
    grads = _mlx_grads(arrays, mx.float64, W, chunk_size=3)
    h = 1e-6
    for i, (x, g) in enumerate(zip(arrays, grads)):
        fd = np.empty_like(x)
        for idx in np.ndindex(x.shape):
            plus, minus = [a.copy() for a in arrays], [a.copy() for a in arrays]
            plus[i][idx] += h
            minus[i][idx] -= h
            fd[idx] = ((reference(*plus) * W).sum() - (reference(*minus) * W).sum()) / (2 * h)
        assert rel_err(g, fd) <= 1e-5, f"gradient of input {i}"


def test_float32_gradients_match_float64_on_odd_sizes():
    arrays = list(inputs(B=3, T=63, Hq=4, H=2, d=8, seed=4))
    W = np.random.default_rng(5).standard_normal(arrays[0].shape)
    g64 = _mlx_grads(arrays, mx.float64, W, chunk_size=16)
    g32 = _mlx_grads(arrays, mx.float32, W, chunk_size=16)
    for i, (a, b) in enumerate(zip(g32, g64)):
        assert rel_err(a, b) <= 1e-4, f"gradient of input {i}"
    # Directional derivatives of the float64 reference pin the float64 gradients themselves.
    r = np.random.default_rng(6)
    for i, g in enumerate(g64):
        u = r.standard_normal(g.shape)
        h = 1e-5
        plus = [a + h * u if j == i else a for j, a in enumerate(arrays)]
        minus = [a - h * u if j == i else a for j, a in enumerate(arrays)]
        fd = ((reference(*plus) - reference(*minus)) * W).sum() / (2 * h)
        assert math.isclose((g * u).sum(), fd, rel_tol=1e-5), f"gradient of input {i}"


def test_gradients_with_state_in_and_out():
    arrays = list(inputs(B=1, T=20, Hq=2, H=1, d=4, seed=7))
    S0 = np.abs(np.random.default_rng(8).standard_normal((1, 1, feature_dim(4, 2), 4)))
    z0 = np.abs(np.random.default_rng(9).standard_normal((1, 1, feature_dim(4, 2))))
    W = np.random.default_rng(10).standard_normal(arrays[0].shape)
    WS = np.random.default_rng(11).standard_normal(S0.shape)

    def ref_loss(S_init):
        y, (S, _) = reference(*arrays, form="chunked", chunk_size=8, return_state=True,
                              initial_state=(S_init, z0))
        return (y * W).sum() + (S * WS).sum()

    def loss(S_init):
        y, (S, _) = power_retention_ops(*mlx_arrays(*arrays, dtype=mx.float64), chunk_size=8,
                                        initial_state=(S_init, mx.array(z0, dtype=mx.float64)),
                                        return_state=True)
        return (y * mx.array(W)).sum() + (S * mx.array(WS)).sum()
    g = np.array(mx.grad(loss)(mx.array(S0, dtype=mx.float64)))
    u = np.random.default_rng(12).standard_normal(S0.shape)
    h = 1e-5
    fd = (ref_loss(S0 + h * u) - ref_loss(S0 - h * u)) / (2 * h)
    assert math.isclose((g * u).sum(), fd, rel_tol=1e-5)
