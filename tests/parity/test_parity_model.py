"""MLX vs torch on the same checkpoint (DESIGN section 5, tier 4): logits, cross-entropy loss,
every parameter gradient (float32, <= 1e-4 relative), and prefill + recurrent steps."""
import mlx.core as mx
import mlx.nn as mnn
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlx.utils import tree_flatten

import retention
from retention import ModelConfig
from retention.params import parameter_shapes

MLX = retention.get_backend("mlx")
TORCH = retention.get_backend("torch")
CONFIG = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=16, chunk_size=16, mlp_hidden=96)
B, T = 3, 63
TOKENS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (B, T + 1))
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("highest_float32_matmul")

def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def model_pair(tmp_path, source: str, config=CONFIG):
    """(torch model, mlx model) holding the same weights: built on `source`, saved, loaded
    on the other backend."""
    if source == "torch":
        torch_model = TORCH.build_model(config, seed=11)
        mlx_model = MLX.load_model(TORCH.save_model(torch_model, tmp_path / "ckpt"))
    else:
        mlx_model = MLX.build_model(config, seed=11)
        torch_model = TORCH.load_model(MLX.save_model(mlx_model, tmp_path / "ckpt"))
    return torch_model, mlx_model


def torch_loss_and_grads(model, tokens):
    model.zero_grad()
    tokens = torch.tensor(tokens, dtype=torch.long)
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    grads = {name: TORCH.to_numpy(p.grad) for name, p in TORCH.named_parameters(model).items()}
    return TORCH.to_numpy(logits.detach()), float(loss.detach()), grads


def mlx_loss_and_grads(model, tokens):
    tokens = mx.array(tokens, dtype=mx.int32)

    def loss_fn(m):
        logits = m(tokens[:, :-1])
        return mnn.losses.cross_entropy(logits, tokens[:, 1:]).mean(), logits
    (loss, logits), grads = mnn.value_and_grad(model, loss_fn)(model)
    # The gradient tree mirrors the parameter tree, so it flattens to the canonical names.
    named = {name: MLX.to_numpy(g) for name, g in tree_flatten(grads)}
    return MLX.to_numpy(logits), float(loss), named


@pytest.mark.parametrize("source,tie", [("torch", True), ("mlx", True), ("torch", False)])
def test_logits_loss_and_every_gradient_agree(tmp_path, source, tie):
    torch_model, mlx_model = model_pair(tmp_path, source, CONFIG.replace(tie_embeddings=tie))
    mlx_params = MLX.named_parameters(mlx_model)
    for name, p in TORCH.named_parameters(torch_model).items():
        assert np.array_equal(TORCH.to_numpy(p), MLX.to_numpy(mlx_params[name])), name
    t_logits, t_loss, t_grads = torch_loss_and_grads(torch_model, TOKENS)
    m_logits, m_loss, m_grads = mlx_loss_and_grads(mlx_model, TOKENS)
    assert t_logits.shape == m_logits.shape == (B, T, CONFIG.vocab_size)
    assert rel_err(m_logits, t_logits) <= TOL
    assert abs(m_loss - t_loss) <= TOL * abs(t_loss)
    assert set(m_grads) == set(t_grads) == set(parameter_shapes(torch_model.config))
    for name in t_grads:
        assert rel_err(m_grads[name], t_grads[name]) <= TOL, name


@pytest.mark.parametrize("source", ["torch", "mlx"])
def test_prefill_and_steps_agree_across_backends(tmp_path, source):
    torch_model, mlx_model = model_pair(tmp_path, source)
    prompt, rest = TOKENS[:, :21], TOKENS[:, 21:T]
    with torch.no_grad():
        t_full = TORCH.to_numpy(torch_model(torch.tensor(TOKENS[:, :T])))
        t_logits, t_state = torch_model.prefill(torch.tensor(prompt))
        t_steps = [TORCH.to_numpy(t_logits)]
        for t in range(rest.shape[1]):
            logits, t_state = torch_model.step(torch.tensor(rest[:, t]), t_state)
            t_steps.append(TORCH.to_numpy(logits)[:, None])
    m_logits, m_state = mlx_model.prefill(mx.array(prompt))
    m_steps = [MLX.to_numpy(m_logits)]
    for t in range(rest.shape[1]):
        logits, m_state = mlx_model.step(mx.array(rest[:, t]), m_state)
        m_steps.append(MLX.to_numpy(logits)[:, None])
    t_steps, m_steps = np.concatenate(t_steps, 1), np.concatenate(m_steps, 1)
    # Each backend's prefill + steps reproduces its own full forward, and the other backend's.
    assert rel_err(t_steps, t_full) <= TOL
    assert rel_err(m_steps, t_full) <= TOL
    assert rel_err(m_steps, t_steps) <= TOL
    assert t_state.offset == m_state.offset == T
    for (tS, tz), (mS, mz) in zip(t_state.layers, m_state.layers):
        assert rel_err(MLX.to_numpy(mS), TORCH.to_numpy(tS)) <= TOL
        assert rel_err(MLX.to_numpy(mz), TORCH.to_numpy(tz)) <= TOL


def test_state_from_one_backend_continues_on_the_other(tmp_path):
    torch_model, mlx_model = model_pair(tmp_path, "torch")
    with torch.no_grad():
        t_full = TORCH.to_numpy(torch_model(torch.tensor(TOKENS[:, :T])))
        _, t_state = torch_model.prefill(torch.tensor(TOKENS[:, :40]))
    layers = [(MLX.from_numpy(TORCH.to_numpy(S)), MLX.from_numpy(TORCH.to_numpy(z)))
              for S, z in t_state.layers]
    state = MLX.ModelState(layers, t_state.offset)
    m_logits, _ = mlx_model.prefill(mx.array(TOKENS[:, 40:T]), state)
    assert rel_err(MLX.to_numpy(m_logits), t_full[:, 40:]) <= TOL
