"""MLX checkpoints: round trips in every dtype, sharding, and each way a checkpoint can be bad."""
import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import retention
from retention import ModelConfig
from retention.backends.mlx import (build_model, from_numpy, load_model, named_parameters,
                                    save_model, to_numpy)
from retention.checkpoint import read_checkpoint
from retention.params import parameter_shapes

CONFIG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=8, chunk_size=16, mlp_hidden=48)
TOKENS = mx.array(np.random.default_rng(0).integers(0, 97, (2, 20)), dtype=mx.int32)


def assert_same_parameters(a, b):
    pa, pb = named_parameters(a), named_parameters(b)
    assert list(pa) == list(pb)
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        assert mx.array_equal(pa[name], pb[name]), name


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_float32(tmp_path, tie):
    model = build_model(CONFIG.replace(tie_embeddings=tie), seed=1)
    path = save_model(model, tmp_path / "ckpt")
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    loaded = load_model(path)
    assert loaded.config == model.config
    assert_same_parameters(model, loaded)
    assert mx.array_equal(model(TOKENS), loaded(TOKENS))


@pytest.mark.parametrize("dtype,name", [(mx.bfloat16, "BF16"), ("float16", "F16")])
def test_round_trip_low_precision(tmp_path, dtype, name):
    model = build_model(CONFIG, seed=2)
    path = save_model(model, tmp_path / "ckpt", dtype=dtype)
    assert set(read_checkpoint(path).dtypes.values()) == {name}
    loaded = load_model(path)
    for tensor in named_parameters(loaded).values():
        assert tensor.dtype == (mx.bfloat16 if name == "BF16" else mx.float16)
    resaved = load_model(save_model(loaded, tmp_path / "again"))
    assert_same_parameters(loaded, resaved)
    as32 = load_model(path, dtype="float32")
    original = named_parameters(model)
    for key, tensor in named_parameters(as32).items():
        assert tensor.dtype == mx.float32
        assert np.abs(np.array(tensor) - np.array(original[key])).max() <= \
            np.abs(np.array(original[key])).max() * 2 ** -7
    assert np.isfinite(np.array(loaded(TOKENS))).all()


def test_sharded_round_trip(tmp_path):
    model = build_model(CONFIG, seed=3)
    path = save_model(model, tmp_path / "ckpt", max_shard_bytes=20_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (path / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(parameter_shapes(CONFIG))
    assert_same_parameters(model, load_model(path))


def test_top_level_save_and_load(tmp_path):
    model = build_model(CONFIG, seed=4)
    path = retention.save_model(model, tmp_path / "ckpt")
    loaded = retention.load_model(path, backend="mlx")
    assert type(loaded).__module__.startswith("retention.backends.mlx")
    assert_same_parameters(model, loaded)


def test_numpy_conversions():
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert from_numpy(x).dtype == mx.float64
    assert from_numpy(x.astype(np.float32)).dtype == mx.float32
    assert from_numpy(np.arange(3)).dtype in (mx.int64, mx.int32)
    bf = mx.array(x, dtype=mx.float32).astype(mx.bfloat16)
    out = to_numpy(bf)
    assert out.dtype == np.float32 and np.array_equal(out, x.astype(np.float32))


# --- damaged checkpoints ----------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    return save_model(build_model(CONFIG, seed=5), tmp_path / "ckpt")


def rewrite_weights(path, change):
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file))


def test_missing_tensor(saved):
    rewrite_weights(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="missing.*model.layers.1.mlp.up_proj.weight"):
        load_model(saved)


def test_extra_tensor(saved):
    rewrite_weights(saved, lambda t: t.update({"model.layers.2.mlp.up_proj.weight":
                                               np.zeros((48, 32), np.float32)}))
    with pytest.raises(ValueError, match="unexpected.*model.layers.2.mlp.up_proj.weight"):
        load_model(saved)


def test_misshaped_tensor(saved):
    rewrite_weights(saved, lambda t: t.update({"model.norm.weight": np.ones(31, np.float32)}))
    with pytest.raises(ValueError, match="model.norm.weight.*shape"):
        load_model(saved)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file(saved, keep):
    file = saved / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(saved)


def test_corrupt_config(saved):
    (saved / "config.json").write_text('{"vocab_size": 97, "d_model": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(saved)


def test_config_that_does_not_match_the_weights(saved):
    config = json.loads((saved / "config.json").read_text())
    config["d_model"] = 48
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match the weights"):
        load_model(saved)
    config["d_model"], config["n_layers"] = 32, 3
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing tensors.*model.layers.2"):
        load_model(saved)


def test_missing_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_model(tmp_path / "nowhere")
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(saved)


def test_bad_dtype_argument(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        save_model(build_model(CONFIG), tmp_path / "ckpt", dtype="int8")
