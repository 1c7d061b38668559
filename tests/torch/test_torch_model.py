"""RetentionLLM on torch: canonical parameters, determinism, and decoding self-consistency."""
import math

import numpy as np
import pytest
import torch

import retention
from retention import ModelConfig
from retention.backends.torch import ModelState, RetentionLLM, build_model, named_parameters
from retention.backends.torch.model import apply_rope, rope_cos_sin
from retention.params import init_std, parameter_shapes
from retention.reference import feature_dim

torch.set_float32_matmul_precision("highest")

CONFIG = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=8, mlp_hidden=48, chunk_size=8)


def rel_err(got, want):
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_names_and_shapes_are_canonical(tie):
    config = CONFIG.replace(tie_embeddings=tie)
    model = build_model(config)
    got = {n: tuple(p.shape) for n, p in named_parameters(model).items()}
    assert got == parameter_shapes(config)
    assert list(got) == list(parameter_shapes(config))
    assert {n for n, _ in model.named_parameters()} == set(parameter_shapes(config))
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_init_follows_params_and_seed_is_deterministic():
    big = CONFIG.replace(d_model=64, mlp_hidden=256, vocab_size=500)
    a, b, c = build_model(big, seed=3), build_model(big, seed=3), build_model(big, seed=4)
    pa, pb, pc = named_parameters(a), named_parameters(b), named_parameters(c)
    for name, p in pa.items():
        assert torch.equal(p, pb[name])
        std = init_std(name, big)
        if std is None:
            assert torch.equal(p, torch.ones_like(p))
        else:
            assert not torch.equal(p, pc[name])
            assert abs(p.std().item() - std) < 0.25 * std, name
            assert abs(p.mean().item()) < 0.25 * std


def test_forward_shapes_and_dtype():
    model = build_model(CONFIG)
    logits = model(torch.randint(0, 61, (3, 21)))
    assert logits.shape == (3, 21, 61) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="tokens"):
        model(torch.randint(0, 61, (21,)))


def test_prefill_then_steps_equal_full_forward_at_every_position():
    model = build_model(CONFIG, seed=1)
    tokens = torch.randint(0, 61, (3, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        # prefill 13 tokens (one full chunk and a partial one), then one step per token
        logits, state = model.prefill(tokens[:, :13])
        assert rel_err(logits, full[:, :13]) <= 1e-5
        assert isinstance(state, ModelState) and state.offset == 13
        D = feature_dim(CONFIG.head_dim, CONFIG.degree)
        S, z = state.layers[0]
        assert S.shape == (3, CONFIG.n_kv_heads, D, CONFIG.head_dim) and z.shape == (3, 2, D)
        for t in range(13, 29):
            step_logits, state = model.step(tokens[:, t], state)
            assert step_logits.shape == (3, 61)
            assert rel_err(step_logits, full[:, t]) <= 1e-5, t
        assert state.offset == 29


def test_prefill_in_pieces_and_step_from_nothing():
    model = build_model(CONFIG, seed=2)
    tokens = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        first, state = model.step(tokens[:, :1])          # [B,1] in, [B,1,V] out
        assert first.shape == (2, 1, 61)
        assert rel_err(first[:, 0], full[:, 0]) <= 1e-5
        middle, state = model.prefill(tokens[:, 1:20], state)
        last, state = model.prefill(tokens[:, 20:], state)
        assert rel_err(torch.cat([first, middle, last], 1), full) <= 1e-5
        with pytest.raises(ValueError, match="prefill"):
            model.step(tokens[:, :2], state)


def test_gradients_flow_to_every_parameter():
    model = build_model(CONFIG)
    tokens = torch.randint(0, 61, (2, 17))
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 61),
                                             tokens[:, 1:].reshape(-1))
    loss.backward()
    assert math.isfinite(loss.item())
    for name, p in named_parameters(model).items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_rope_is_hf_rotate_half():
    # HF Llama: x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1), theta^(-2i/hd).
    cos, sin = rope_cos_sin(5, 3, 8, 10000.0, "cpu")
    x = torch.randn(1, 3, 2, 8)
    inv = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    want = np.empty((1, 3, 2, 8))
    for t in range(3):
        ang = (5 + t) * inv
        x1, x2 = x[0, t, :, :4].numpy(), x[0, t, :, 4:].numpy()
        want[0, t, :, :4] = x1 * np.cos(ang) - x2 * np.sin(ang)
        want[0, t, :, 4:] = x2 * np.cos(ang) + x1 * np.sin(ang)
    assert np.allclose(apply_rope(x, cos, sin).numpy(), want, atol=1e-5)


def test_backend_registry_builds_this_model():
    backend = retention.get_backend("torch")
    assert backend.name == "torch"
    model = backend.build_model(CONFIG)
    assert isinstance(model, RetentionLLM)
    assert retention.backends.backend_of(model) == "torch"
    for attr in ("build_model", "save_model", "load_model", "from_numpy", "to_numpy",
                 "power_retention", "power_retention_step", "named_parameters"):
        assert callable(getattr(backend, attr)), attr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_model_auto_path_matches_ops_path_and_decodes():
    # head_dim and chunk a multiple of 16, so "auto" can pick the Triton kernel on CUDA.
    config = CONFIG.replace(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, chunk_size=16)
    model = build_model(config, seed=3, device="cuda")
    assert next(model.parameters()).device.type == "cuda"
    tokens = torch.randint(0, 61, (3, 45), device="cuda")
    with torch.no_grad():
        auto = model(tokens)
        model.impl = "ops"
        ops = model(tokens)
        model.impl = "auto"
        assert rel_err(auto, ops) <= 1e-4
        _, state = model.prefill(tokens[:, :30])
        for t in range(30, 45):
            logits, state = model.step(tokens[:, t], state)
            assert rel_err(logits, ops[:, t]) <= 1e-4, t
