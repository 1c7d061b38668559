"""Checkpoint directories (DESIGN section 4): config.json + model.safetensors (canonical names,
sharded with an index above `max_shard_bytes`) + optional extras, written atomically.

Backends pass their tensors and a function that writes one shard with their own safetensors
writer; this module owns the layout, the atomic rename and the validation on load, so both
backends read and write the same directory.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from retention.config import ModelConfig
from retention.params import parameter_shapes

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
MAX_SHARD_BYTES = 5 * 1024**3
SUPPORTED_DTYPES = ("F32", "BF16", "F16")


@dataclass
class CheckpointManifest:
    """A validated checkpoint: its config and which file holds each tensor."""
    path: Path
    config: ModelConfig
    files: dict[str, Path]          # tensor name -> shard file
    dtypes: dict[str, str]          # tensor name -> safetensors dtype ("F32", "BF16", "F16")

    def shards(self) -> dict[Path, list[str]]:
        out: dict[Path, list[str]] = {}
        for name, file in self.files.items():
            out.setdefault(file, []).append(name)
        return out


def fsync_dir(path: Path) -> None:
    """Make a rename or new file in `path` durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def publish_directory(tmp: Path, path: Path) -> None:
    """fsync the files of a finished `tmp`, then rename it to `path`, replacing an old `path`
    only once the new one is complete."""
    _fsync_tree(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_directory(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Call fill(tmp_dir), then move tmp_dir to `path` so readers never see half a directory.

    An existing `path` is replaced only after the new one is complete; on failure the old one
    stays as it was and the temporary directory is removed.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        fill(tmp)
        publish_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _plan_shards(tensors: Mapping[str, Any], nbytes: Callable[[Any], int],
                 max_shard_bytes: int) -> list[dict[str, Any]]:
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = nbytes(t)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def write_model_files(directory: Path, config: ModelConfig, tensors: Mapping[str, Any],
                      write_shard: Callable[[dict[str, Any], Path], None],
                      nbytes: Callable[[Any], int],
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write config.json and the weights (one file, or shards plus an index) into `directory`."""
    expected = parameter_shapes(config)
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise AssertionError(f"model tensors do not match the config: missing {missing}, "
                             f"extra {extra}")
    (directory / CONFIG_NAME).write_text(config.to_json() + "\n")
    shards = _plan_shards(tensors, nbytes, max_shard_bytes)
    if len(shards) == 1:
        write_shard(shards[0], directory / WEIGHTS_NAME)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(shard, directory / fname)
        for name, t in shard.items():
            weight_map[name] = fname
            total += nbytes(t)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def save_checkpoint(path: str | Path, config: ModelConfig, tensors: Mapping[str, Any], *,
                    write_shard: Callable[[dict[str, Any], Path], None],
                    nbytes: Callable[[Any], int],
                    extra: Callable[[Path], None] | None = None,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Atomically write a checkpoint directory; `extra(tmp_dir)` may add more files."""
    def fill(tmp: Path) -> None:
        write_model_files(tmp, config, tensors, write_shard, nbytes, max_shard_bytes)
        if extra is not None:
            extra(tmp)
    return atomic_directory(path, fill)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from what a user types: the directory itself, a `latest` pointer
    file, a training run's directory, or its `checkpoints/` folder (both via `latest`)."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return path
    if path.is_file() and path.name == "latest":
        target = path.parent / path.read_text().strip()
        if (target / CONFIG_NAME).is_file():
            return target
    for folder in (path / "checkpoints", path):
        pointer = folder / "latest"
        if pointer.is_file():
            target = folder / pointer.read_text().strip()
            if (target / CONFIG_NAME).is_file():
                return target
    raise FileNotFoundError(f"no checkpoint at {path}: expected a directory with {CONFIG_NAME}, "
                            "a training run directory, or a 'latest' pointer")


def _read_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(file), framework="numpy") as f:
            return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
                    for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is truncated or corrupt ({e}); re-save or re-download it")


def read_checkpoint(path: str | Path) -> CheckpointManifest:
    """Validate a checkpoint directory against its config; return where each tensor lives."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    if not (path / CONFIG_NAME).exists():
        path = resolve_checkpoint(path)
    config = ModelConfig.load(path / CONFIG_NAME)
    index_file, single = path / INDEX_NAME, path / WEIGHTS_NAME
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index_file} is corrupt ({e})") from None
        shard_names = sorted(set(weight_map.values()))
    elif single.exists():
        weight_map, shard_names = None, [WEIGHTS_NAME]
    else:
        if (path / "dcp").is_dir():  # a multi-process torch run's sharded checkpoint
            raise FileNotFoundError(f"{path} is a sharded (FSDP) checkpoint; write its "
                                    f"{WEIGHTS_NAME} with `retention export {path}`")
        raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME} or {INDEX_NAME}")

    found: dict[str, tuple[tuple[int, ...], str]] = {}
    files: dict[str, Path] = {}
    for shard in shard_names:
        file = path / shard
        if not file.exists():
            raise FileNotFoundError(f"shard {file} named in {INDEX_NAME} is missing")
        for name, info in _read_header(file).items():
            if weight_map is not None and weight_map.get(name) != shard:
                raise ValueError(f"{file} holds {name!r}, which {INDEX_NAME} places elsewhere")
            found[name], files[name] = info, file

    expected = parameter_shapes(config)
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise ValueError(f"checkpoint {path} does not match its config.json: "
                         f"missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected tensors {extra[:8]}{'...' if len(extra) > 8 else ''}")
    for name, shape in expected.items():
        got_shape, dtype = found[name]
        if got_shape != shape:
            raise ValueError(f"tensor {name!r} in {files[name]} has shape {got_shape}, but "
                             f"config.json implies {shape}: the config does not match the weights")
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}; supported: {SUPPORTED_DTYPES}")
    return CheckpointManifest(path, config, files, {n: found[n][1] for n in expected})
