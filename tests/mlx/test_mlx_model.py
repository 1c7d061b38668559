"""RetentionLLM on MLX: canonical parameters, forward, prefill + recurrent steps."""
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from retention import ModelConfig
from retention.backends.mlx import ModelState, build_model
from retention.backends.mlx.model import RMSNorm, apply_rope
from retention.params import init_std, parameter_shapes

CONFIG = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=16, chunk_size=16, mlp_hidden=96)


def tokens(B=3, T=63, seed=0, vocab=97):
    return mx.array(np.random.default_rng(seed).integers(0, vocab, (B, T)), dtype=mx.int32)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_names_and_shapes_are_canonical(tie):
    config = CONFIG.replace(tie_embeddings=tie)
    model = build_model(config)
    flat = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
    assert flat == parameter_shapes(config)
    assert all(p.dtype == mx.float32 for _, p in tree_flatten(model.parameters()))
    assert ("lm_head.weight" in flat) == (not tie)


def test_init_follows_init_std_and_seed():
    config = CONFIG.replace(vocab_size=2000, mlp_hidden=256)
    params = dict(tree_flatten(build_model(config, seed=3).parameters()))
    for name, p in params.items():
        std = init_std(name, config)
        if std is None:
            assert np.all(np.array(p) == 1.0), name
        elif p.size >= 4096:
            assert abs(float(mx.std(p)) / std - 1) < 0.1, name
    again = dict(tree_flatten(build_model(config, seed=3).parameters()))
    other = dict(tree_flatten(build_model(config, seed=4).parameters()))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert mx.array_equal(params[name], again[name])
    assert not mx.array_equal(params[name], other[name])


def test_forward_shape_and_dtype():
    model = build_model(CONFIG)
    logits = model(tokens())
    assert logits.shape == (3, 63, 97) and logits.dtype == mx.float32
    assert np.isfinite(np.array(logits)).all()
    with pytest.raises(ValueError, match="tokens"):
        model(mx.zeros((63,), dtype=mx.int32))


def test_forward_is_causal():
    model = build_model(CONFIG)
    a, b = tokens(B=1), np.array(tokens(B=1))
    b[0, 40:] = (b[0, 40:] + 1) % 97
    la, lb = np.array(model(a)), np.array(model(mx.array(b)))
    assert np.abs(la[:, :40] - lb[:, :40]).max() < 1e-6
    assert np.abs(la[:, 40:] - lb[:, 40:]).max() > 1e-3


@pytest.mark.parametrize("tie", [True, False])
def test_prefill_then_steps_equal_full_forward(tie):
    model = build_model(CONFIG.replace(tie_embeddings=tie))
    toks = tokens()
    full = np.array(model(toks))
    logits, state = model.prefill(toks[:, :21])
    assert isinstance(state, ModelState) and state.offset == 21
    assert len(state.layers) == CONFIG.n_layers
    assert rel_err(logits, full[:, :21]) <= 1e-5
    for t in range(21, 63):
        step_logits, state = model.step(toks[:, t], state)
        assert step_logits.shape == (3, 97)
        assert rel_err(step_logits, full[:, t]) <= 1e-4, t
    assert state.offset == 63


def test_steps_from_empty_state_and_b1_tokens():
    model = build_model(CONFIG)
    toks = tokens(B=2, T=20)
    full = np.array(model(toks))
    state = None
    for t in range(20):
        step_logits, state = model.step(toks[:, t:t + 1], state)
        assert step_logits.shape == (2, 1, 97)
        assert rel_err(step_logits[:, 0], full[:, t]) <= 1e-4, t
    with pytest.raises(ValueError, match="prefill"):
        model.step(toks[:, :2], state)
    first, _ = model.step(toks[:, 0])              # no state: from nothing, as on torch
    assert rel_err(first, full[:, 0]) <= 1e-4


def test_prefill_in_pieces_equals_one_prefill():
    model = build_model(CONFIG)
    toks = tokens()
    whole, whole_state = model.prefill(toks)
    first, state = model.prefill(toks[:, :30])
    second, state = model.prefill(toks[:, 30:], state)
    assert rel_err(mx.concatenate([first, second], axis=1), whole) <= 1e-5
    for (S, z), (S2, z2) in zip(state.layers, whole_state.layers):
        assert S.dtype == mx.float32 and rel_err(S, S2) <= 1e-5 and rel_err(z, z2) <= 1e-5


def test_bfloat16_model_runs_close_to_float32():
    model = build_model(CONFIG)
    logits32 = np.array(model(tokens()))
    model.set_dtype(mx.bfloat16)
    logits16 = model(tokens())
    assert logits16.dtype == mx.float32
    assert rel_err(logits16, logits32) < 0.05


def test_loss_gradients_reach_every_parameter():
    model = build_model(CONFIG)
    toks = tokens(B=2, T=33)

    def loss_fn(m):
        logits = m(toks[:, :-1])
        return nn.losses.cross_entropy(logits, toks[:, 1:]).mean()
    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    assert abs(float(loss) - np.log(97)) < 0.5
    for name, g in tree_flatten(grads):
        assert np.isfinite(np.array(g)).all() and float(mx.abs(g).max()) > 0, name


def test_rmsnorm_and_rope_conventions():
    x = mx.array(np.random.default_rng(0).standard_normal((2, 5, 3, 8)), dtype=mx.float32)
    norm = RMSNorm(8, 1e-6)
    xn = np.array(x)
    want = xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-6)
    assert rel_err(norm(x), want) < 1e-6
    # rotate_half: pairs (i, i + d/2) rotate by position * theta^(-2i/d).
    y = np.array(apply_rope(x, offset=4, theta=100.0))
    pos = np.arange(4, 9)[:, None, None]
    inv = 100.0 ** (-np.arange(0, 8, 2) / 8)
    cos, sin = np.cos(pos * inv), np.sin(pos * inv)
    x1, x2 = xn[..., :4], xn[..., 4:]
    want = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    assert rel_err(y, want) < 1e-5
