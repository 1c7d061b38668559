"""Tier 1: the three forms of the float64 reference agree (DESIGN section 5)."""
import math

import numpy as np
import pytest

from retention.reference import feature_dim, feature_index, phi, power_retention


def make_inputs(B=2, T=37, Hq=4, H=2, d=8, gated=True, seed=0):
    r = np.random.default_rng(seed)
    q, k, v = r.normal(size=(B, T, Hq, d)), r.normal(size=(B, T, H, d)), r.normal(size=(B, T, H, d))
    log_g = np.log(r.uniform(0.7, 1.0, size=(B, T, H))) if gated else None
    return q, k, v, log_g


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("Hq,H", [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("T,chunk", [(37, 8), (16, 16), (63, 16), (5, 64)])
def test_forms_agree(gated, Hq, H, T, chunk):
    q, k, v, log_g = make_inputs(T=T, Hq=Hq, H=H, gated=gated)
    y_att = power_retention(q, k, v, log_g)
    y_rec = power_retention(q, k, v, log_g, form="recurrent")
    y_chk = power_retention(q, k, v, log_g, form="chunked", chunk_size=chunk)
    np.testing.assert_allclose(y_rec, y_att, rtol=0, atol=1e-10)
    np.testing.assert_allclose(y_chk, y_att, rtol=0, atol=1e-10)


def test_degree_four_and_scale():
    q, k, v, log_g = make_inputs(T=21, d=4)
    y_att = power_retention(q, k, v, log_g, degree=4, scale=0.3)
    y_chk = power_retention(q, k, v, log_g, degree=4, scale=0.3, form="chunked", chunk_size=5)
    y_rec = power_retention(q, k, v, log_g, degree=4, scale=0.3, form="recurrent")
    np.testing.assert_allclose(y_chk, y_att, atol=1e-10)
    np.testing.assert_allclose(y_rec, y_att, atol=1e-10)


def test_states_chain_across_calls():
    q, k, v, log_g = make_inputs(T=40)
    full = power_retention(q, k, v, log_g)
    y1, state = power_retention(q[:, :23], k[:, :23], v[:, :23], log_g[:, :23], form="chunked",
                                chunk_size=8, return_state=True)
    y2, state2 = power_retention(q[:, 23:], k[:, 23:], v[:, 23:], log_g[:, 23:], form="recurrent",
                                 initial_state=state, return_state=True)
    np.testing.assert_allclose(np.concatenate([y1, y2], axis=1), full, atol=1e-10)
    _, state_c = power_retention(q, k, v, log_g, form="chunked", chunk_size=16, return_state=True)
    for a, b in zip(state2, state_c):
        np.testing.assert_allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("d,p", [(8, 2), (5, 4), (64, 2), (3, 6)])
def test_feature_map(d, p):
    r = np.random.default_rng(1)
    x, y = r.normal(size=d), r.normal(size=d)
    assert phi(x, p).shape == (feature_dim(d, p),) == (math.comb(d + p - 1, p),)
    assert abs(phi(x, p) @ phi(y, p) - (x @ y) ** p) < 1e-9 * max(1, abs(x @ y) ** p)
    tuples, _ = feature_index(d, p)
    assert np.all(np.diff(tuples, axis=1) >= 0)


def test_d64_feature_dim_is_2080():
    assert feature_dim(64, 2) == 2080


def test_bad_inputs():
    q, k, v, log_g = make_inputs(Hq=3, H=2)
    with pytest.raises(ValueError, match="multiple"):
        power_retention(q, k, v, log_g)
    q, k, v, log_g = make_inputs()
    with pytest.raises(ValueError, match="degree"):
        power_retention(q, k, v, log_g, degree=3)
    with pytest.raises(ValueError, match="log_g"):
        power_retention(q, k, v, log_g[:, :-1])
    with pytest.raises(ValueError, match="form"):
        power_retention(q, k, v, form="fast")
