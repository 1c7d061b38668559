"""MLX side of checkpoints: canonical named parameters, and save/load through
retention.checkpoint (which owns the directory layout, atomic writes and validation)."""
from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from retention.checkpoint import MAX_SHARD_BYTES, read_checkpoint, save_checkpoint
from retention.params import parameter_shapes
from retention.backends.mlx.model import RetentionLLM

_DTYPES = {
    "float32": mx.float32, "fp32": mx.float32, "f32": mx.float32,
    "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
    "float16": mx.float16, "fp16": mx.float16, "f16": mx.float16, "half": mx.float16,
}


def as_dtype(dtype) -> mx.Dtype:
    """An mx.Dtype from an mx.Dtype or a name such as "bfloat16" / "bf16"."""
    if isinstance(dtype, mx.Dtype):
        if dtype not in (mx.float32, mx.bfloat16, mx.float16):
            raise ValueError(f"checkpoint dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    key = str(dtype).lower().removeprefix("mlx.core.").removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return _DTYPES[key]


def from_numpy(array):
    """An mx.array with the NumPy array's dtype (float64 stays float64: CPU only in MLX)."""
    array = np.asarray(array)
    # mx.array alone would turn float64 into float32; keep the dtype, as torch.from_numpy does.
    if array.dtype == np.float64:
        return mx.array(array, dtype=mx.float64)
    return mx.array(array)


def to_numpy(array) -> np.ndarray:
    """A NumPy copy; bfloat16 (which NumPy lacks) becomes float32."""
    if array.dtype == mx.bfloat16:
        array = array.astype(mx.float32)
    return np.array(array)


def named_parameters(model: RetentionLLM) -> dict:
    """name -> array, exactly the names and order of retention.params.parameter_shapes."""
    flat = dict(tree_flatten(model.parameters()))
    expected = parameter_shapes(model.config)
    assert set(flat) == set(expected), (sorted(set(flat) ^ set(expected)))
    return {name: flat[name] for name in expected}


def load_named_parameters(model: RetentionLLM, tensors: dict) -> None:
    """Replace the model's parameters by `tensors` (canonical names), checking names and shapes."""
    expected = parameter_shapes(model.config)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"parameters do not match the model config: missing {missing[:8]}, "
                         f"unexpected {extra[:8]}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(tensors[name].shape)}, "
                             f"the model expects {shape}")
    model.update(tree_unflatten([(name, tensors[name]) for name in expected]))


def _write_shard(shard: dict, file: Path) -> None:
    mx.save_safetensors(str(file), shard, metadata={"format": "mlx"})


def save_model(model: RetentionLLM, path, dtype=None, *, max_shard_bytes: int = MAX_SHARD_BYTES,
               extra=None) -> Path:
    """Write a checkpoint directory; parameters keep their dtype unless `dtype` is given."""
    tensors = named_parameters(model)
    if dtype is not None:
        target = as_dtype(dtype)
        tensors = {name: t.astype(target) for name, t in tensors.items()}
    mx.eval(tensors)
    return save_checkpoint(path, model.config, tensors, write_shard=_write_shard,
                           nbytes=lambda t: t.nbytes, extra=extra,
                           max_shard_bytes=max_shard_bytes)


def load_model(path, dtype=None) -> RetentionLLM:
    """Load a checkpoint written by either backend; dtype kept unless `dtype` is given."""
    manifest = read_checkpoint(path)
    # MLX is lazy: the random init of the fresh model is replaced before it is ever computed.
    model = RetentionLLM(manifest.config)
    tensors = {}
    for file, names in manifest.shards().items():
        try:
            arrays = mx.load(str(file), format="safetensors")
        except Exception as e:  # mlx raises RuntimeError/ValueError for damaged files
            raise ValueError(f"{file} is truncated or corrupt ({e}); re-save or re-download "
                             "it") from None
        for name in names:
            tensors[name] = arrays[name]
    if dtype is not None:
        target = as_dtype(dtype)
        tensors = {name: t.astype(target) for name, t in tensors.items()}
    load_named_parameters(model, tensors)
    try:
        mx.eval(model.parameters())
    except Exception as e:
        raise ValueError(f"checkpoint {path} could not be read ({e}); re-save or re-download "
                         "it") from None
    return model
