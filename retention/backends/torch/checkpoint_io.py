"""Torch side of checkpoints: canonical named tensors in and out of a RetentionLLM, and the
safetensors reader/writer that retention.checkpoint drives (layout and validation live there).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from retention.checkpoint import MAX_SHARD_BYTES, read_checkpoint, save_checkpoint
from retention.params import parameter_shapes
from retention.backends.torch.model import RetentionLLM

DTYPES = {"float32": torch.float32, "f32": torch.float32, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "f16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype | None:
    """None, a torch dtype, or a name such as "bf16" -> torch dtype (float types only)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")


def named_parameters(model: RetentionLLM) -> dict[str, torch.Tensor]:
    """Canonical name -> parameter, in the order of retention.params.parameter_shapes."""
    params = dict(model.named_parameters())
    expected = parameter_shapes(model.config)
    assert set(params) == set(expected), (sorted(set(params) ^ set(expected)))
    return {name: params[name] for name in expected}


def load_named_parameters(model: RetentionLLM, tensors: dict, *, assign: bool = False) -> None:
    """Fill `model` from canonical name -> tensor. assign=False copies into the existing
    parameters (their dtype and device win); assign=True adopts the given tensors' dtype."""
    expected = parameter_shapes(model.config)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"parameters do not match the model config: missing {missing[:8]}, "
                         f"unexpected {extra[:8]}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(tensors[name].shape)}, "
                             f"the model expects {shape}")
    if assign:
        model.load_state_dict(dict(tensors), strict=True, assign=True)
        return
    with torch.no_grad():
        for name, p in named_parameters(model).items():
            p.copy_(tensors[name])


def _write_shard(tensors: dict, file: Path) -> None:
    from safetensors.torch import save_file
    save_file(tensors, str(file), metadata={"format": "pt"})


def save_model(model: RetentionLLM, path, dtype=None, *, max_shard_bytes: int = MAX_SHARD_BYTES,
               extra=None) -> Path:
    """Write a canonical checkpoint directory (dtype kept unless `dtype` is given)."""
    dtype = resolve_dtype(dtype)
    tensors = {name: p.detach().to("cpu", dtype=dtype or p.dtype).contiguous()
               for name, p in named_parameters(model).items()}
    return save_checkpoint(path, model.config, tensors, write_shard=_write_shard,
                           nbytes=lambda t: t.numel() * t.element_size(), extra=extra,
                           max_shard_bytes=max_shard_bytes)


def load_model(path, *, dtype=None, device=None) -> RetentionLLM:
    """Load a checkpoint written by either backend onto `device` (CPU by default).
    dtype None keeps the stored dtypes; "float32", "bfloat16", "float16" cast."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    dtype = resolve_dtype(dtype)
    manifest = read_checkpoint(path)
    tensors: dict[str, torch.Tensor] = {}
    for file, names in manifest.shards().items():
        try:
            shard = load_file(str(file))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file} is truncated or corrupt ({e}); re-save or re-download it")
        for name in names:
            tensors[name] = shard[name]
    if dtype is not None:
        tensors = {n: t.to(dtype) for n, t in tensors.items()}
    model = RetentionLLM(manifest.config, device="cpu", init=False)
    load_named_parameters(model, tensors, assign=True)
    return model if device is None else model.to(device)


def from_numpy(array, device=None) -> torch.Tensor:
    """A torch tensor with the array's dtype (on `device` if given)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t if device is None else t.to(device)


def to_numpy(tensor) -> np.ndarray:
    """A NumPy copy on the host; bfloat16 (which NumPy lacks) becomes float32."""
    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()
