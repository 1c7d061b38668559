"""Tier 2: the torch ops path of power retention against the float64 reference (DESIGN 5)."""
import numpy as np
import pytest
import torch

from retention.backends.torch.power_retention import (phi, power_retention_ops,
                                                      power_retention_step_ops)
from retention.reference import feature_dim
from retention.reference import phi as ref_phi
from retention.reference import power_retention as reference

torch.set_float32_matmul_precision("highest")


def make_inputs(B=3, T=63, Hq=4, H=2, d=8, gated=True, seed=0):
    r = np.random.default_rng(seed)
    q, k, v = r.normal(size=(B, T, Hq, d)), r.normal(size=(B, T, H, d)), r.normal(size=(B, T, H, d))
    log_g = np.log(r.uniform(0.7, 1.0, size=(B, T, H))) if gated else None
    return q, k, v, log_g


def make_state(B, H, d, degree=2, seed=1):
    r = np.random.default_rng(seed)
    D = feature_dim(d, degree)
    # A genuine state: the keys/values of 10 earlier tokens, so phi(q).z > 0 like in real use.
    k, v = r.normal(size=(B, 10, H, d)), r.normal(size=(B, 10, H, d))
    fk = ref_phi(k, degree)                                         # [B,10,H,D]
    S, z = np.einsum("bjhD,bjhd->bhDd", fk, v), fk.sum(1)
    assert S.shape == (B, H, D, d)
    return S, z


def t32(a):
    return None if a is None else torch.tensor(a, dtype=torch.float32)


def rel_err(got, want):
    got = got.detach().double().numpy() if isinstance(got, torch.Tensor) else got
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("Hq,H", [(2, 2), (4, 2)])
@pytest.mark.parametrize("T,chunk", [(63, 16), (64, 16), (5, 16), (40, 64)])
def test_forward_matches_reference(gated, Hq, H, T, chunk):
    q, k, v, log_g = make_inputs(T=T, Hq=Hq, H=H, gated=gated)
    want = reference(q, k, v, log_g)
    got = power_retention_ops(t32(q), t32(k), t32(v), t32(log_g), chunk_size=chunk)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel_err(got, want) <= 1e-5


def test_state_in_and_out_match_reference_chunked():
    q, k, v, log_g = make_inputs(T=63, Hq=4, H=2)
    S0, z0 = make_state(3, 2, 8)
    want, (S, z) = reference(q, k, v, log_g, form="chunked", chunk_size=16,
                             initial_state=(S0, z0), return_state=True)
    got, (gS, gz) = power_retention_ops(t32(q), t32(k), t32(v), t32(log_g), chunk_size=16,
                                        initial_state=(t32(S0), t32(z0)), return_state=True)
    assert gS.dtype == gz.dtype == torch.float32
    assert gS.shape == (3, 2, 36, 8) and gz.shape == (3, 2, 36)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(gS, S) <= 1e-5 and rel_err(gz, z) <= 1e-5


@pytest.mark.parametrize("T", [1, 16, 23])
def test_state_out_without_initial_state(T):
    q, k, v, log_g = make_inputs(T=T)
    _, (S, z) = reference(q, k, v, log_g, form="recurrent", return_state=True)
    _, (gS, gz) = power_retention_ops(t32(q), t32(k), t32(v), t32(log_g), chunk_size=8,
                                      return_state=True)
    assert rel_err(gS, S) <= 1e-5 and rel_err(gz, z) <= 1e-5


def test_degree_four():
    q, k, v, log_g = make_inputs(B=2, T=21, Hq=2, H=1, d=4)
    want = reference(q, k, v, log_g, degree=4, scale=0.3)
    got = power_retention_ops(t32(q), t32(k), t32(v), t32(log_g), degree=4, scale=0.3,
                              chunk_size=8)
    assert rel_err(got, want) <= 1e-5


def test_feature_map_matches_reference():
    x = np.random.default_rng(2).normal(size=(5, 6))
    for degree in (2, 4):
        assert np.allclose(phi(torch.tensor(x), degree).numpy(), ref_phi(x, degree), atol=1e-12)


def test_scores_that_overflow_float32_when_raised_to_p():
    # (scale q.k)^4 ~ 1e48 here; y is invariant to scaling q, so it must still equal the
    # reference at the unscaled q: only the log-space form gets this right in float32.
    q, k, v, log_g = make_inputs(B=2, T=37, Hq=2, H=1, d=4)
    want = reference(q, k, v, log_g, degree=4)
    got = power_retention_ops(t32(q * 1e6), t32(k), t32(v), t32(log_g), degree=4, chunk_size=8)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) <= 1e-5


def test_strong_gates():
    q, k, v, _ = make_inputs(T=50)
    log_g = np.random.default_rng(3).uniform(-30.0, 0.0, size=(3, 50, 2))
    want = reference(q, k, v, log_g, form="recurrent")  # the attention form overflows here
    got = power_retention_ops(t32(q), t32(k), t32(v), t32(log_g), chunk_size=16)
    assert rel_err(got, want) <= 1e-5


def test_low_precision_inputs_compute_in_float32():
    q, k, v, log_g = make_inputs(T=40)
    want = reference(q, k, v, log_g)
    for dtype in (torch.bfloat16, torch.float16):
        got = power_retention_ops(*(torch.tensor(a, dtype=dtype) for a in (q, k, v)),
                                  t32(log_g), chunk_size=16)
        assert got.dtype == dtype
        assert rel_err(got.float(), want) <= 2e-2


def test_step_matches_reference_recurrent():
    q, k, v, log_g = make_inputs(T=9)
    want, (S, z) = reference(q, k, v, log_g, form="recurrent", return_state=True)
    state = None
    for t in range(9):
        y, state = power_retention_step_ops(t32(q[:, t]), t32(k[:, t]), t32(v[:, t]),
                                            t32(log_g[:, t]), state)
        assert rel_err(y, want[:, t]) <= 1e-5
    assert rel_err(state[0], S) <= 1e-5 and rel_err(state[1], z) <= 1e-5


def test_step_with_scores_that_overflow_float32():
    q, k, v, log_g = make_inputs(B=2, T=6, Hq=2, H=1, d=4)
    want = reference(q, k, v, log_g, degree=4, form="recurrent")
    state = None
    for t in range(6):
        y, state = power_retention_step_ops(t32(q[:, t] * 1e6), t32(k[:, t]), t32(v[:, t]),
                                            t32(log_g[:, t]), state, degree=4)
        assert rel_err(y, want[:, t]) <= 1e-5


def test_step_gradcheck_float64():
    q, k, v, log_g = (torch.tensor(a[:, 0], requires_grad=True)
                      for a in make_inputs(B=2, T=1, Hq=2, H=1, d=3))
    S0, z0 = (torch.tensor(a, requires_grad=True) for a in make_state(2, 1, 3))

    def f(q, k, v, log_g, S0, z0):
        y, (S, z) = power_retention_step_ops(q, k, v, log_g, (S0, z0))
        return y, S, z
    assert torch.autograd.gradcheck(f, (q, k, v, log_g, S0, z0), eps=1e-6, atol=1e-7)


def test_chunked_then_steps_equal_one_pass():
    q, k, v, log_g = make_inputs(T=30)
    full = power_retention_ops(t32(q), t32(k), t32(v), t32(log_g), chunk_size=8)
    y, state = power_retention_ops(t32(q[:, :21]), t32(k[:, :21]), t32(v[:, :21]),
                                   t32(log_g[:, :21]), chunk_size=8, return_state=True)
    for t in range(21, 30):
        yt, state = power_retention_step_ops(t32(q[:, t]), t32(k[:, t]), t32(v[:, t]),
                                             t32(log_g[:, t]), state)
        assert rel_err(yt, full[:, t].double().numpy()) <= 1e-5
    assert rel_err(y, full[:, :21].double().numpy()) <= 1e-5


# --- gradients ---------------------------------------------------------------------------

def test_gradcheck_float64():
    q, k, v, log_g = (torch.tensor(a, requires_grad=True)
                      for a in make_inputs(B=1, T=11, Hq=2, H=1, d=3))
    S0, z0 = (torch.tensor(a, requires_grad=True) for a in make_state(1, 1, 3))

    def f(q, k, v, log_g, S0, z0):
        y, (S, z) = power_retention_ops(q, k, v, log_g, chunk_size=4, initial_state=(S0, z0),
                                        return_state=True)
        return y, S, z
    assert torch.autograd.gradcheck(f, (q, k, v, log_g, S0, z0), eps=1e-6, atol=1e-7)


def test_float64_ops_path_is_the_reference():
    q, k, v, log_g = make_inputs(T=63)
    got = power_retention_ops(*(torch.tensor(a) for a in (q, k, v, log_g)), chunk_size=16)
    assert got.dtype == torch.float64
    assert np.abs(got.numpy() - reference(q, k, v, log_g)).max() < 1e-12


@pytest.mark.parametrize("gated", [True, False])
def test_float32_gradients_match_reference_finite_differences(gated):
    # Directional derivatives of sum(r * y) of the float64 reference (central differences)
    # against the float32 autograd gradient dotted with the same directions.
    q, k, v, log_g = make_inputs(B=2, T=37, Hq=4, H=2, d=4, gated=gated)
    inputs = [q, k, v] + ([log_g] if gated else [])
    r = np.random.default_rng(5)
    weights = r.normal(size=q.shape)

    def loss64(arrays):
        return float((reference(*arrays[:3], arrays[3] if gated else None) * weights).sum())

    leaves = [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in inputs]
    y = power_retention_ops(*leaves[:3], leaves[3] if gated else None, chunk_size=16)
    (y * torch.tensor(weights, dtype=torch.float32)).sum().backward()
    for _ in range(3):
        dirs = [r.normal(size=a.shape) for a in inputs]
        eps = 1e-5
        plus = loss64([a + eps * u for a, u in zip(inputs, dirs)])
        minus = loss64([a - eps * u for a, u in zip(inputs, dirs)])
        fd = (plus - minus) / (2 * eps)
        ad = sum(float((leaf.grad.double().numpy() * u).sum()) for leaf, u in zip(leaves, dirs))
        assert abs(ad - fd) <= 1e-4 * abs(fd) + 1e-6, (ad, fd)


def test_float32_gradients_match_float64():
    arrays = make_inputs(B=3, T=63, Hq=4, H=2, d=8)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        leaves = [torch.tensor(a, dtype=dtype, requires_grad=True) for a in arrays]
        y = power_retention_ops(*leaves, chunk_size=16)
        (y * torch.linspace(-1, 1, y.shape[-1], dtype=dtype)).sum().backward()
        grads[dtype] = [leaf.grad.double().numpy() for leaf in leaves]
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64]):
        assert np.abs(g32 - g64).max() <= 1e-4 * np.abs(g64).max()


def test_zero_queries_and_zero_scores_give_finite_gradients():
    q, k, v, log_g = make_inputs(B=1, T=20, Hq=2, H=1, d=4)
    q[0, 3] = 0.0                  # a query that sees nothing at all (0/0 in the math)
    q[0, 7, :, :2], k[0, 5, :, 2:] = 0.0, 0.0
    q[0, 7, :, 2:], k[0, 5, :, :2] = 1.0, 1.0   # q_7 . k_5 == 0 exactly
    leaves = [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in (q, k, v, log_g)]
    y = power_retention_ops(*leaves, chunk_size=8)
    y[:, torch.arange(20) != 3].sum().backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()


def test_inference_mode_first_then_autograd():
    # Cached feature-index tensors made under inference_mode must not poison later backward.
    x = torch.randn(2, 7)
    with torch.inference_mode():
        phi(x, 6)
    leaf = torch.randn(2, 7, requires_grad=True)
    phi(leaf, 6).sum().backward()
    assert torch.isfinite(leaf.grad).all()


def test_empty_sequence_passes_the_state_through():
    S0, z0 = (t32(a) for a in make_state(3, 2, 8))
    q, k, v, log_g = (t32(a)[:, :0] for a in make_inputs(T=4))
    y, (S, z) = power_retention_ops(q, k, v, log_g, initial_state=(S0, z0), return_state=True)
    assert y.shape == (3, 0, 4, 8) and torch.equal(S, S0) and torch.equal(z, z0)


# --- input errors ------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    q, k, v, log_g = (t32(a) for a in make_inputs(T=10))
    with pytest.raises(ValueError, match="degree"):
        power_retention_ops(q, k, v, log_g, degree=3)
    with pytest.raises(ValueError, match="multiple"):
        power_retention_ops(q[:, :, :3], k, v, log_g)
    with pytest.raises(ValueError, match="log_g"):
        power_retention_ops(q, k, v, log_g[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        power_retention_ops(q, k, v, log_g, chunk_size=0)
    with pytest.raises(ValueError, match="state"):
        power_retention_ops(q, k, v, log_g, initial_state=(torch.zeros(3, 2, 5, 8),
                                                           torch.zeros(3, 2, 5)))
