"""Training checkpoints (docs/training.md): `<out>/checkpoints/step_N/` with the model
(config.json, model.safetensors), the AdamW moments (optimizer.safetensors, `exp_avg.<name>`
and `exp_avg_sq.<name>`), trainer_state.json and the tokenizer; a `latest` pointer; keep-last
pruning; and the checks that make a resume safe. Everything is NumPy, so any backend reads
what any backend wrote.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from retention.checkpoint import (CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, _fsync_tree,
                                  atomic_directory, fsync_dir, read_checkpoint, save_checkpoint,
                                  write_model_files)
from retention.config import ModelConfig

DCP_DIR = "dcp"  # torch.distributed.checkpoint files of a sharded (FSDP) run
OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "trainer_state.json"
TOKENIZER_NAME = "tokenizer.json"
LATEST = "latest"
CHECKPOINTS = "checkpoints"


def checkpoints_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint that `<out>/checkpoints/latest` names (else the newest), or None."""
    folder = checkpoints_dir(out_dir)
    pointer = folder / LATEST
    if pointer.exists():
        target = folder / pointer.read_text().strip()
        if (target / STATE_NAME).exists():
            return target
    # No pointer, or it names a deleted checkpoint: the newest complete one (a step_* directory
    # only appears by an atomic rename), so a run directory never looks empty while it is not.
    found = sorted(p for p in folder.glob("step_*") if (p / STATE_NAME).exists())
    return found[-1] if found else None


def resolve_resume(resume: str, out_dir: str | Path) -> Path:
    """`latest`, a run directory or a checkpoint directory -> a checkpoint directory."""
    if resume == LATEST:
        found = latest_checkpoint(out_dir)
        if found is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint under "
                                    f"{checkpoints_dir(out_dir)}; train first or pass a path")
        return found
    path = Path(resume)
    if (path / STATE_NAME).exists():
        return path
    if path.is_file() and path.name == LATEST:  # the pointer file itself
        path = path.parent
    for run_dir in (path, path.parent):  # a run directory or its checkpoints/ folder
        found = latest_checkpoint(run_dir)
        if found is not None:
            return found
    raise FileNotFoundError(f"--resume {resume}: not a training checkpoint (no {STATE_NAME}) "
                            f"and no {CHECKPOINTS}/{LATEST} under it")


def _write_pointer(out_dir: Path, name: str) -> None:
    folder = checkpoints_dir(out_dir)
    tmp = folder / f".{LATEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / LATEST)
    fsync_dir(folder)


def _prune(out_dir: Path, keep_last: int, keep: Path) -> None:
    if keep_last <= 0:
        return
    steps = sorted(p for p in checkpoints_dir(out_dir).glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(out_dir: Path) -> None:
    """Temporary directories and pointer files of a process that was killed mid-write."""
    folder = checkpoints_dir(out_dir)
    if folder.is_dir():
        for p in folder.glob(".*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def tokenizer_json_of(tokenizer) -> str | None:
    """The tokenizer's tokenizer.json text (what travels with the checkpoint)."""
    if tokenizer is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        return (Path(tmp) / TOKENIZER_NAME).read_text()


def save_training_checkpoint(out_dir: Path, model_config: ModelConfig, trainer, state: dict,
                             tokenizer, keep_last: int) -> Path:
    """Write `<out>/checkpoints/step_N` atomically, then point `latest` at it, then prune."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file as save_numpy

    def save_file(tensors: dict, file: str, metadata: dict) -> None:
        try:
            save_numpy(tensors, file, metadata=metadata)
        except SafetensorError as e:  # a failed write (disk full): an OSError to the loop
            raise OSError(str(e)) from e

    path = checkpoints_dir(out_dir) / f"step_{state['step']:08d}"
    params = trainer.parameters_numpy()
    moments = trainer.optimizer_state_numpy()

    def extra(tmp: Path) -> None:
        save_file(moments, str(tmp / OPTIMIZER_NAME), metadata={"format": "np"})
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)  # tokenizer.json + tokenizer_config.json

    save_checkpoint(path, model_config, params,
                    write_shard=lambda shard, file: save_file(shard, str(file),
                                                              metadata={"format": "np"}),
                    nbytes=lambda a: a.nbytes, extra=extra)
    _write_pointer(out_dir, path.name)
    _prune(out_dir, keep_last, path)
    return path


def is_sharded_checkpoint(path: Path) -> bool:
    """A checkpoint of a torch FSDP run: its tensors are in `dcp/` (torch.distributed.checkpoint),
    and model.safetensors is there only once it has been exported (`retention export`)."""
    return (Path(path) / DCP_DIR).is_dir() and not (Path(path) / WEIGHTS_NAME).exists() \
        and not (Path(path) / INDEX_NAME).exists()


def read_training_state(path: Path) -> tuple[ModelConfig, dict]:
    """(model config, trainer state) without reading any tensor."""
    try:
        state = json.loads((Path(path) / STATE_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{Path(path) / STATE_NAME} is corrupt ({e})") from None
    if is_sharded_checkpoint(path):
        return ModelConfig.load(Path(path) / CONFIG_NAME), state
    if not (Path(path) / OPTIMIZER_NAME).exists():
        raise FileNotFoundError(f"{path} has no {OPTIMIZER_NAME}: it is a model checkpoint, not "
                                "a training checkpoint; it cannot be resumed")
    return read_checkpoint(path).config, state


def saved_train_config(resume: str, out_dir: str | Path) -> dict:
    """The TrainConfig (as a dict) that the checkpoint `resume` names was written with, less
    the device: that belongs to the machine (a CUDA run resumed on a Mac picks the Mac's)."""
    _, state = read_training_state(resolve_resume(resume, out_dir))
    saved = dict(state.get("train_config", {}))
    saved.pop("resume", None)
    saved.pop("device", None)
    return saved


def read_tensors_numpy(path: Path) -> tuple[dict, dict]:
    """(parameters, optimizer moments) as full float32 NumPy arrays, from the safetensors files
    or, for a sharded (FSDP) checkpoint, from its `dcp/` folder (needs torch)."""
    if is_sharded_checkpoint(path):
        from retention.backends.torch.fsdp import read_dcp_numpy
        return read_dcp_numpy(Path(path) / DCP_DIR)
    _, params, moments, _ = load_training_checkpoint(path)
    return params, moments


def load_checkpoint_tensors(trainer, path: Path, optimizer_step: int) -> None:
    """Put a checkpoint's parameters and moments into `trainer`; a distributed trainer reads
    only its own shards (`load_checkpoint`)."""
    if hasattr(trainer, "load_checkpoint"):
        trainer.load_checkpoint(path, optimizer_step)
        return
    params, moments = read_tensors_numpy(path)
    trainer.load_parameters_numpy(params)
    trainer.load_optimizer_state_numpy(moments, optimizer_step)


def export_checkpoint(path: Path, out: Path | None = None) -> Path:
    """Write the canonical files (model.safetensors, optimizer.safetensors) of a sharded
    checkpoint beside its dcp/ folder, or a complete canonical checkpoint into `out`, so any
    backend (MLX included) loads and resumes it. `path`: a checkpoint or a run directory."""
    from safetensors.numpy import save_file
    path = Path(path)
    if not (path / STATE_NAME).exists():
        path = resolve_resume(str(path), path)
    if not is_sharded_checkpoint(path) and out is None:
        return path  # already canonical
    params, moments = read_tensors_numpy(path)
    config = ModelConfig.load(path / CONFIG_NAME)

    def fill(tmp: Path) -> None:
        write_model_files(tmp, config, params,
                          lambda shard, file: save_file(shard, str(file),
                                                        metadata={"format": "np"}),
                          lambda a: a.nbytes)
        save_file(moments, str(tmp / OPTIMIZER_NAME), metadata={"format": "np"})
        for f in path.iterdir():  # trainer state, tokenizer
            if f.is_file() and not (tmp / f.name).exists() and f.suffix != ".safetensors":
                shutil.copy2(f, tmp / f.name)

    if out is not None:
        return atomic_directory(out, fill)
    # In place: the weights (or their index) move in last, so until then the checkpoint still
    # reads as sharded and a reader never sees half an export.
    staging = Path(tempfile.mkdtemp(prefix=".export.tmp-", dir=path))
    try:
        fill(staging)
        _fsync_tree(staging)
        last = [n for n in (INDEX_NAME, WEIGHTS_NAME) if (staging / n).exists()]
        for f in sorted(staging.iterdir(), key=lambda f: f.name in last):
            if not (path / f.name).exists() or f.name in last or f.suffix == ".safetensors":
                os.replace(f, path / f.name)
        fsync_dir(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def load_training_checkpoint(path: Path) -> tuple[ModelConfig, dict, dict, dict]:
    """(model config, parameters, optimizer moments, trainer state) as NumPy, validated."""
    from safetensors.numpy import load_file

    if is_sharded_checkpoint(path):
        config, state = read_training_state(path)
        params, moments = read_tensors_numpy(path)
        return config, params, moments, state
    manifest = read_checkpoint(path)
    params: dict[str, np.ndarray] = {}
    for file, names in manifest.shards().items():
        shard = load_file(str(file))
        params.update({n: shard[n].astype(np.float32) for n in names})
    opt_file = path / OPTIMIZER_NAME
    if not opt_file.exists():
        raise FileNotFoundError(f"{path} has no {OPTIMIZER_NAME}: it is a model checkpoint, not "
                                "a training checkpoint; it cannot be resumed")
    moments = load_file(str(opt_file))
    try:
        state = json.loads((path / STATE_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / STATE_NAME} is corrupt ({e})") from None
    return manifest.config, params, moments, state


def _config_diff(a: ModelConfig, b: ModelConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k}: checkpoint {da[k]!r} vs run {db.get(k)!r}"
                     for k in da if da[k] != db.get(k))


def check_resume_compatible(path: Path, ckpt_config: ModelConfig, run_config: ModelConfig,
                            tokenizer_json: str | None) -> None:
    saved = path / TOKENIZER_NAME
    saved_json = saved.read_text() if saved.exists() else None
    if saved_json is not None and tokenizer_json is not None:
        if json.loads(saved_json) != json.loads(tokenizer_json):
            raise ValueError(f"cannot resume {path}: it was trained with a different tokenizer "
                             f"than this run's ({saved}); pass --tokenizer {saved} or the "
                             "tokenizer of the original run")
    elif (saved_json is None) != (tokenizer_json is None):
        raise ValueError(f"cannot resume {path}: it was trained "
                         f"{'without' if saved_json is None else 'with'} a tokenizer and this "
                         f"run's data {'uses' if saved_json is None else 'does not use'} one; "
                         "resume with the same --data as the original run")
    # After the tokenizer: a preset's vocab_size follows it, and the tokenizer is the cause.
    if ckpt_config != run_config:
        raise ValueError(f"cannot resume {path}: its model config differs from this run's "
                         f"({_config_diff(ckpt_config, run_config)}); pass the same --model as "
                         "the checkpoint's run, or start a new run in another --out directory")
