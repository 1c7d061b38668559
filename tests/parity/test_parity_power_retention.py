"""power_retention on both backends from the same inputs: forward, state and gradients.

Torch float64 autograd (exact exp, unlike MLX's float64) is the gradient gold; the float32
paths of both backends must match it to 1e-4 and each other."""
import mlx.core as mx
import numpy as np
import pytest
import torch

import retention
from retention.reference import power_retention as reference

MLX = retention.get_backend("mlx")
TORCH = retention.get_backend("torch")


pytestmark = pytest.mark.usefixtures("highest_float32_matmul")

def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def inputs(B=3, T=63, Hq=4, H=2, d=8, seed=0):
    r = np.random.default_rng(seed)
    return [r.standard_normal((B, T, Hq, d)), r.standard_normal((B, T, H, d)),
            r.standard_normal((B, T, H, d)), -r.uniform(0.01, 0.5, (B, T, H))]


def torch_grads(arrays, W, dtype, **kw):
    args = [torch.tensor(a, dtype=dtype, requires_grad=True) for a in arrays]
    y = TORCH.power_retention_ops(*args, **kw)
    (y * torch.tensor(W, dtype=dtype)).sum().backward()
    return y.detach().double().numpy(), [a.grad.double().numpy() for a in args]


def mlx_grads(arrays, W, **kw):
    args = [mx.array(a, dtype=mx.float32) for a in arrays]
    Wm = mx.array(W, dtype=mx.float32)

    def loss(*a):
        y = MLX.power_retention_ops(*a, **kw)
        return (y * Wm).sum(), y
    (_, y), grads = mx.value_and_grad(loss, argnums=(0, 1, 2, 3))(*args)
    return np.array(y), [np.array(g) for g in grads]


@pytest.mark.parametrize("degree,d", [(2, 8), (4, 4)])
def test_forward_and_gradients_agree(degree, d):
    arrays = inputs(d=d)
    W = np.random.default_rng(1).standard_normal(arrays[0].shape)
    kw = dict(degree=degree, chunk_size=16)
    y64, gold = torch_grads(arrays, W, torch.float64, **kw)
    y_t, g_t = torch_grads(arrays, W, torch.float32, **kw)
    y_m, g_m = mlx_grads(arrays, W, **kw)
    assert rel_err(y64, reference(*arrays, degree=degree)) <= 1e-10
    assert rel_err(y_m, y64) <= 1e-5 and rel_err(y_t, y64) <= 1e-5
    for i in range(4):
        assert rel_err(g_m[i], gold[i]) <= 1e-4, f"mlx gradient of input {i}"
        assert rel_err(g_m[i], g_t[i]) <= 1e-4, f"mlx vs torch float32 gradient of input {i}"


def test_states_agree():
    arrays = inputs()
    y_t, (S_t, z_t) = TORCH.power_retention_ops(*[torch.tensor(a, dtype=torch.float32)
                                                  for a in arrays], chunk_size=16,
                                                return_state=True)
    y_m, (S_m, z_m) = MLX.power_retention_ops(*[mx.array(a, dtype=mx.float32) for a in arrays],
                                              chunk_size=16, return_state=True)
    assert rel_err(np.array(y_m), y_t.numpy()) <= 1e-5
    assert rel_err(np.array(S_m), S_t.numpy()) <= 1e-5
    assert rel_err(np.array(z_m), z_t.numpy()) <= 1e-5
