"""The checkpoint directory protocol, independent of any backend (NumPy tensors)."""
import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from retention import ModelConfig
from retention.checkpoint import read_checkpoint, save_checkpoint
from retention.params import parameter_shapes

CONFIG = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                     head_dim=8, mlp_hidden=32, chunk_size=8)


def tensors(config=CONFIG):
    r = np.random.default_rng(0)
    return {n: r.normal(size=s).astype(np.float32) for n, s in parameter_shapes(config).items()}


def save(path, ts=None, config=CONFIG, **kw):
    return save_checkpoint(path, config, ts if ts is not None else tensors(config),
                           write_shard=lambda d, f: save_file(d, str(f)),
                           nbytes=lambda t: t.nbytes, **kw)


def test_round_trip_single_file(tmp_path):
    path = save(tmp_path / "ckpt")
    m = read_checkpoint(path)
    assert m.config == CONFIG
    assert set(m.files) == set(parameter_shapes(CONFIG))
    assert set(m.shards()) == {path / "model.safetensors"}
    assert not list(tmp_path.glob(".ckpt.tmp-*"))


def test_sharded_with_index(tmp_path):
    path = save(tmp_path / "ckpt", max_shard_bytes=4000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    m = read_checkpoint(path)
    assert len(m.shards()) == len(set(index["weight_map"].values()))


def test_overwrite_is_atomic_and_failure_keeps_old(tmp_path):
    path = save(tmp_path / "ckpt")
    before = (path / "model.safetensors").read_bytes()

    def failing(tmp):
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path / "ckpt", extra=failing)
    assert (path / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_tensor(tmp_path):
    ts = tensors()
    ts.pop("model.norm.weight")
    (tmp_path / "c").mkdir()
    save_file(ts, str(tmp_path / "c" / "model.safetensors"))
    CONFIG.save(tmp_path / "c" / "config.json")
    with pytest.raises(ValueError, match="missing tensors.*model.norm.weight"):
        read_checkpoint(tmp_path / "c")


def test_extra_tensor(tmp_path):
    ts = tensors()
    ts["lm_head.weight"] = np.zeros((50, 16), np.float32)
    (tmp_path / "c").mkdir()
    save_file(ts, str(tmp_path / "c" / "model.safetensors"))
    CONFIG.save(tmp_path / "c" / "config.json")
    with pytest.raises(ValueError, match="unexpected tensors.*lm_head.weight"):
        read_checkpoint(tmp_path / "c")


def test_config_that_does_not_match_weights(tmp_path):
    path = save(tmp_path / "ckpt")
    CONFIG.replace(mlp_hidden=48).save(path / "config.json")
    with pytest.raises(ValueError, match="mlp.*shape.*config does not match"):
        read_checkpoint(path)


def test_truncated_weights(tmp_path):
    path = save(tmp_path / "ckpt")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_checkpoint(path)


def test_corrupt_config(tmp_path):
    path = save(tmp_path / "ckpt")
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_checkpoint(path)


def test_missing_directory_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        read_checkpoint(tmp_path / "nope")
    path = save(tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        read_checkpoint(path)


def test_missing_shard(tmp_path):
    path = save(tmp_path / "ckpt", max_shard_bytes=4000)
    sorted(path.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(FileNotFoundError, match="shard"):
        read_checkpoint(path)


def test_resolve_checkpoint_from_run_dir_and_pointer(tmp_path):
    from retention.checkpoint import resolve_checkpoint
    ckpt = save(tmp_path / "run" / "checkpoints" / "step_00000010")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000010\n")
    for given in (ckpt, tmp_path / "run", tmp_path / "run" / "checkpoints",
                  tmp_path / "run" / "checkpoints" / "latest"):
        assert resolve_checkpoint(given) == ckpt
        assert read_checkpoint(given).path == ckpt
    with pytest.raises(FileNotFoundError, match="training run directory"):
        resolve_checkpoint(tmp_path)
