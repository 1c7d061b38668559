"""Torch checkpoints: round trips in every dtype, shards, and each failure names its problem."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import retention
from retention import ModelConfig
from retention.backends.torch import (build_model, from_numpy, load_model, load_named_parameters,
                                      named_parameters, save_model, to_numpy)

torch.set_float32_matmul_precision("highest")

CONFIG = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=8, mlp_hidden=48, chunk_size=8)
TOKENS = torch.randint(0, 61, (2, 19), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return build_model(CONFIG, seed=7)


def assert_same_parameters(a, b, dtype=None):
    pa, pb = named_parameters(a), named_parameters(b)
    assert list(pa) == list(pb)
    for name in pa:
        want = pa[name].detach() if dtype is None else pa[name].detach().to(dtype)
        assert pb[name].dtype == want.dtype and torch.equal(pb[name].detach(), want), name


def test_round_trip_float32(model, tmp_path):
    path = save_model(model, tmp_path / "ckpt")
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    loaded = load_model(path)
    assert loaded.config == CONFIG
    assert_same_parameters(model, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), model(TOKENS))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bf16", "float16"])
def test_round_trip_low_precision(model, tmp_path, dtype):
    path = save_model(model, tmp_path / "ckpt", dtype=dtype)
    stored = load_file(str(path / "model.safetensors"))
    want_dtype = {"bf16": torch.bfloat16, "float16": torch.float16}.get(dtype, dtype)
    assert {t.dtype for t in stored.values()} == {want_dtype}
    kept = load_model(path)                                 # dtype kept as stored
    assert_same_parameters(model, kept, want_dtype)
    as_f32 = load_model(path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in as_f32.parameters())
    with torch.no_grad():
        want = model(TOKENS)
        for m in (kept, as_f32):
            got = m(TOKENS)
            assert got.dtype == torch.float32 and torch.isfinite(got).all()
            assert (got - want).abs().max() <= 0.05 * want.abs().max()


def test_round_trip_untied(tmp_path):
    config = CONFIG.replace(tie_embeddings=False)
    model = build_model(config, seed=1)
    loaded = load_model(save_model(model, tmp_path / "ckpt"))
    assert loaded.config == config
    assert_same_parameters(model, loaded)


def test_sharded_round_trip(model, tmp_path):
    path = save_model(model, tmp_path / "ckpt", max_shard_bytes=20_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (path / "model.safetensors").exists()
    assert_same_parameters(model, load_model(path))


def test_top_level_save_and_load(model, tmp_path):
    path = retention.save_model(model, tmp_path / "ckpt")
    loaded = retention.load_model(path, backend="torch")
    assert_same_parameters(model, loaded)


def test_load_named_parameters_copies_and_checks(model):
    other = build_model(CONFIG, seed=8)
    load_named_parameters(other, {n: p.detach().clone() for n, p in named_parameters(model).items()})
    assert_same_parameters(model, other)
    with pytest.raises(ValueError, match="missing.*model.norm.weight"):
        load_named_parameters(other, {n: p for n, p in named_parameters(model).items()
                                      if n != "model.norm.weight"})


def test_numpy_conversion():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = from_numpy(a)
    assert t.dtype == torch.float32 and np.array_equal(to_numpy(t), a)
    out = to_numpy(t.to(torch.bfloat16).requires_grad_())
    assert out.dtype == np.float32 and np.array_equal(out, a)


# --- failures ------------------------------------------------------------------------------

def tensors_of(model):
    return {n: p.detach().clone() for n, p in named_parameters(model).items()}


def write_raw(path, tensors, config=CONFIG):
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    config.save(path / "config.json")
    return path


def test_missing_tensor(model, tmp_path):
    ts = tensors_of(model)
    del ts["model.layers.1.self_attn.g_proj.weight"]
    with pytest.raises(ValueError, match="missing tensors.*layers.1.self_attn.g_proj"):
        load_model(write_raw(tmp_path / "c", ts))


def test_extra_tensor(model, tmp_path):
    ts = tensors_of(model)
    ts["lm_head.weight"] = torch.zeros(61, 32)
    with pytest.raises(ValueError, match="unexpected tensors.*lm_head.weight"):
        load_model(write_raw(tmp_path / "c", ts))


def test_misshaped_tensor(model, tmp_path):
    ts = tensors_of(model)
    ts["model.layers.0.mlp.up_proj.weight"] = torch.zeros(40, 32)
    with pytest.raises(ValueError, match="up_proj.*shape"):
        load_model(write_raw(tmp_path / "c", ts))


def test_truncated_file(model, tmp_path):
    path = save_model(model, tmp_path / "ckpt")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(path)


def test_corrupt_config(model, tmp_path):
    path = save_model(model, tmp_path / "ckpt")
    (path / "config.json").write_text('{"d_model": 32,')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(path)
    (path / "config.json").write_text('{"d_model": 32, "heads": 4}')
    with pytest.raises(ValueError, match="unknown ModelConfig keys.*heads"):
        load_model(path)


def test_config_that_does_not_match_weights(model, tmp_path):
    path = save_model(model, tmp_path / "ckpt")
    CONFIG.replace(d_model=48).save(path / "config.json")
    with pytest.raises(ValueError, match="config does not match the weights"):
        load_model(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config"):
        load_model(tmp_path / "empty")


def test_bad_dtype(model, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        save_model(model, tmp_path / "ckpt", dtype="int8")
