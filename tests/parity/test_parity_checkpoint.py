"""Checkpoints cross backends: float32/bfloat16/float16, single file and sharded, either way."""
import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import retention
from retention import ModelConfig
from retention.checkpoint import read_checkpoint

MLX = retention.get_backend("mlx")
TORCH = retention.get_backend("torch")
CONFIG = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=16, chunk_size=16, mlp_hidden=96)
TOKENS = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (3, 63))
DTYPES = {"float32": (torch.float32, mx.float32, "F32"),
          "bfloat16": (torch.bfloat16, mx.bfloat16, "BF16"),
          "float16": (torch.float16, mx.float16, "F16")}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def torch_logits(model):
    with torch.no_grad():
        return TORCH.to_numpy(model(torch.tensor(TOKENS)))


def mlx_logits(model):
    return MLX.to_numpy(model(mx.array(TOKENS)))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_torch_checkpoint_loads_on_mlx(tmp_path, dtype):
    torch_dtype, mlx_dtype, stored = DTYPES[dtype]
    path = TORCH.save_model(TORCH.build_model(CONFIG, seed=5), tmp_path / "ckpt",
                            dtype=torch_dtype)
    assert set(read_checkpoint(path).dtypes.values()) == {stored}
    torch_model, mlx_model = TORCH.load_model(path), MLX.load_model(path)
    t_params, m_params = TORCH.named_parameters(torch_model), MLX.named_parameters(mlx_model)
    assert list(t_params) == list(m_params)
    for name in t_params:
        assert t_params[name].dtype == torch_dtype and m_params[name].dtype == mlx_dtype
        assert np.array_equal(TORCH.to_numpy(t_params[name]), MLX.to_numpy(m_params[name])), name
    # Upcast on both sides: identical float32 weights must give the same logits.
    t32, m32 = TORCH.load_model(path, dtype="float32"), MLX.load_model(path, dtype="float32")
    assert rel_err(mlx_logits(m32), torch_logits(t32)) <= 1e-4
    # And each runs in the stored dtype (logits stay float32).
    assert rel_err(mlx_logits(mlx_model), torch_logits(t32)) < 0.05


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_mlx_checkpoint_loads_on_torch(tmp_path, dtype):
    torch_dtype, mlx_dtype, stored = DTYPES[dtype]
    path = MLX.save_model(MLX.build_model(CONFIG, seed=6), tmp_path / "ckpt", dtype=mlx_dtype)
    assert set(read_checkpoint(path).dtypes.values()) == {stored}
    torch_model, mlx_model = TORCH.load_model(path), MLX.load_model(path)
    t_params, m_params = TORCH.named_parameters(torch_model), MLX.named_parameters(mlx_model)
    for name in m_params:
        assert t_params[name].dtype == torch_dtype
        assert np.array_equal(TORCH.to_numpy(t_params[name]), MLX.to_numpy(m_params[name])), name
    t32, m32 = TORCH.load_model(path, dtype="float32"), MLX.load_model(path, dtype="float32")
    assert rel_err(torch_logits(t32), mlx_logits(m32)) <= 1e-4
    assert np.isfinite(torch_logits(torch_model)).all()


@pytest.mark.parametrize("source", ["torch", "mlx"])
def test_sharded_checkpoints_cross_load(tmp_path, source):
    config = CONFIG.replace(tie_embeddings=False)
    writer, reader = (TORCH, MLX) if source == "torch" else (MLX, TORCH)
    path = writer.save_model(writer.build_model(config, seed=7), tmp_path / "ckpt",
                             max_shard_bytes=30_000)
    assert (path / "model.safetensors.index.json").exists()
    assert len(read_checkpoint(path).shards()) > 2
    a = writer.named_parameters(writer.load_model(path))
    b = reader.named_parameters(reader.load_model(path))
    for name in a:
        assert np.array_equal(writer.to_numpy(a[name]), reader.to_numpy(b[name])), name


def test_resaving_on_the_other_backend_keeps_every_tensor_exactly(tmp_path):
    first = TORCH.save_model(TORCH.build_model(CONFIG, seed=8), tmp_path / "a")
    second = MLX.save_model(MLX.load_model(first), tmp_path / "b")
    a = load_file(str(first / "model.safetensors"))
    b = load_file(str(second / "model.safetensors"))
    assert set(a) == set(b)  # each writer orders the file its own way
    assert all(np.array_equal(a[n], b[n]) and a[n].dtype == b[n].dtype for n in a)
    assert (first / "config.json").read_text() == (second / "config.json").read_text()
