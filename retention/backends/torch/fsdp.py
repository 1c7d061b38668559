"""Multi-process torch training (docs/scaling.md): the process group that torchrun or
`accelerate launch` sets up, the model sharded with FSDP2 (`fully_shard` per decoder layer,
then the root), our AdamW on the local shards, and torch.distributed.checkpoint (DCP)
checkpoints that reshard on load (so a run resumes on another number of ranks).

FSDP2 turns each parameter into a DTensor sharded on dim 0. AdamW is elementwise, so it runs
on the local shards (`to_local()`, which _update_views hands to the explicit or the fused
step); only the global gradient norm needs an all-reduce (of the squared local norms). FSDP
averages gradients over the ranks in its reduce-scatter, so with each rank's loss a mean over
its rows the gradient is the single-process one of the global batch. Precision: bfloat16
parameters for compute with float32 reduction (MixedPrecisionPolicy) when precision is
bfloat16 (the default on CUDA); the sharded master weights, gradients and moments stay
float32.
"""
from __future__ import annotations

import gc
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor

from retention.checkpoint import publish_directory
from retention.config import ModelConfig, TrainConfig
from retention.distributed import Ranks
from retention.params import init_std, parameter_shapes
from retention.backends.torch.checkpoint_io import named_parameters
from retention.backends.torch.model import RetentionLLM
from retention.backends.torch.trainer import (Trainer, global_grad_norm_squared,
                                               resolve_precision)


# --- process group ---------------------------------------------------------------------------

class TorchComm:
    """The few collectives the training loop needs, over the default process group."""

    def __init__(self, device: torch.device):
        self.device = device

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        # Gloo's threads may still hold the last collectives' tensors; dropping them before
        # the group goes avoids an abort at interpreter exit.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def init_ranks(device: str | None = None) -> Ranks:
    """Join the process group of torchrun/accelerate (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*):
    NCCL with one GPU per local rank when CUDA is there (and --device is not cpu), else gloo."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not str(device or "").startswith("cpu")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} but only {torch.cuda.device_count()} "
                             "GPUs are visible; lower --nproc_per_node")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        # RETENTION_DIST_INIT (e.g. file:///shared/rendezvous): rendezvous through a file on a
        # shared filesystem instead of torchrun's TCP store (MASTER_ADDR/MASTER_PORT).
        init = os.environ.get("RETENTION_DIST_INIT")
        where = dict(init_method=init, rank=rank, world_size=world) if init else {}
        if use_cuda:
            dist.init_process_group("nccl", device_id=dev, **where)
        else:
            dist.init_process_group("gloo", **where)
    return Ranks(rank, world, local_rank, TorchComm(dev))


# --- per-layer wrappers (also used by the single-process trainer) ----------------------------

def wrap_layers(model: RetentionLLM, activation_checkpointing: bool, compile: bool) -> None:
    """Activation checkpointing (recompute each decoder layer in the backward) and/or
    torch.compile per layer, as torchtitan does; names and parameters stay canonical."""
    from torch.utils.checkpoint import checkpoint
    for layer in model.model.layers:
        if activation_checkpointing:
            forward = layer.forward

            def recomputed(*args, _forward=forward, **kwargs):
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            layer.forward = recomputed
        if compile:
            layer.compile()


# --- the trainer -----------------------------------------------------------------------------

class DistributedTrainer(Trainer):
    """The torch Trainer with the model sharded over the ranks by FSDP2."""

    def __init__(self, model_config: ModelConfig, config: TrainConfig, ranks: Ranks):
        self.config, self.ranks = config, ranks
        self.device = ranks.comm.device
        self.precision = resolve_precision(config.precision, self.device)
        if self.device.type == "cpu":
            torch.set_float32_matmul_precision("highest")
        model = RetentionLLM(model_config, device=torch.device("meta"), init=False)
        wrap_layers(model, config.activation_checkpointing, config.compile)
        # cast_forward_inputs=False: RoPE cos/sin stay float32, as under autocast.
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                   cast_forward_inputs=False)
              if self.precision == "bfloat16" else MixedPrecisionPolicy())
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)  # the root: embedding (tied head), final norm
        model.to_empty(device=self.device)
        self.model = model
        self.model.train()
        self.params = named_parameters(model)  # DTensors, sharded on dim 0
        self._init_weights(model_config, config.seed)
        self.exp_avg = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.optimizer_step = 0

    def describe(self) -> str:
        return (f"{super().describe()}; FSDP2 over {self.ranks.world} ranks "
                f"({dist.get_backend()})")

    # --- full tensors <-> local shards ------------------------------------------------------
    @torch.no_grad()
    def _set_full(self, target, full) -> None:
        """Copy this rank's shard of the full tensor `full` into the DTensor `target`."""
        full = torch.as_tensor(full).to(self.device, torch.float32)
        shard = distribute_tensor(full, target.device_mesh, target.placements,
                                  src_data_rank=None)  # every rank holds `full`: no traffic
        target.to_local().copy_(shard.to_local())

    @torch.no_grad()
    def _init_weights(self, config: ModelConfig, seed: int) -> None:
        """RetentionLLM.init_weights drawn the same way (full tensors on the CPU in canonical
        order), so a seed gives the single-process weights whatever the number of ranks."""
        generator = torch.Generator().manual_seed(seed)
        for name, shape in parameter_shapes(config).items():
            std = init_std(name, config)
            full = (torch.ones(shape) if std is None
                    else torch.empty(shape).normal_(0.0, std, generator=generator))
            self._set_full(self.params[name], full)

    def _gather_numpy(self, tensors: dict) -> dict[str, np.ndarray]:
        """Full tensors on rank 0 (an all-gather per tensor; other ranks get {})."""
        out = {}
        for name, t in tensors.items():
            full = t.full_tensor()
            if self.ranks.main:
                out[name] = full.cpu().numpy().copy()
            del full
        return out

    # --- the step ---------------------------------------------------------------------------
    def forward_backward(self, micro_batches) -> tuple[float, float]:
        """Mean loss over the micro-batches and ranks, and the global gradient norm."""
        mean = self._accumulate(micro_batches)  # FSDP reduce-scatters into the sharded grads
        squares = global_grad_norm_squared(p.grad.to_local() for p in self.params.values())
        stats = torch.stack([mean, squares.to(self.device)])
        dist.all_reduce(stats)
        loss, sq = stats.tolist()
        return loss / self.ranks.world, math.sqrt(sq) if sq >= 0 else float("nan")

    def _update_views(self):
        for name, p in self.params.items():
            yield (name, p.to_local(), p.grad.to_local(), self.exp_avg[name].to_local(),
                   self.exp_avg_sq[name].to_local())

    @torch.no_grad()
    def eval_loss(self, batches) -> float:
        self.model.eval()
        try:
            mean = torch.stack([self._loss(x, y) for x, y in batches]).mean()
        finally:
            self.model.train()
        dist.all_reduce(mean)
        return mean.item() / self.ranks.world

    # --- state in and out -------------------------------------------------------------------
    def parameters_numpy(self) -> dict[str, np.ndarray]:
        return self._gather_numpy(self.params)

    def optimizer_state_numpy(self) -> dict[str, np.ndarray]:
        out = self._gather_numpy({f"exp_avg.{n}": m for n, m in self.exp_avg.items()})
        out.update(self._gather_numpy({f"exp_avg_sq.{n}": v for n, v in self.exp_avg_sq.items()}))
        return out

    def load_parameters_numpy(self, tensors: dict) -> None:
        for name, p in self.params.items():
            self._set_full(p, np.asarray(tensors[name], np.float32))

    def load_optimizer_state_numpy(self, tensors: dict, optimizer_step: int) -> None:
        for n in self.params:
            self._set_full(self.exp_avg[n], np.asarray(tensors[f"exp_avg.{n}"], np.float32))
            self._set_full(self.exp_avg_sq[n], np.asarray(tensors[f"exp_avg_sq.{n}"],
                                                          np.float32))
        self.optimizer_step = int(optimizer_step)

    def _state_dict(self) -> dict:
        """What DCP saves: the canonical names of optimizer.safetensors and model.safetensors."""
        out = dict(self.params)
        out.update({f"exp_avg.{n}": m for n, m in self.exp_avg.items()})
        out.update({f"exp_avg_sq.{n}": v for n, v in self.exp_avg_sq.items()})
        return out

    def load_checkpoint(self, path: Path, optimizer_step: int) -> None:
        """A sharded checkpoint: DCP reads this rank's part (any number of ranks wrote it).
        A canonical one: each rank reads the tensors one at a time and keeps its shard."""
        from retention.train_checkpoint import DCP_DIR, OPTIMIZER_NAME, is_sharded_checkpoint
        path = Path(path)
        if is_sharded_checkpoint(path):
            dcp.load(self._state_dict(), checkpoint_id=str(path / DCP_DIR))
        else:
            from safetensors import safe_open
            from retention.checkpoint import read_checkpoint
            targets = self._state_dict()
            for file, names in read_checkpoint(path).shards().items():
                with safe_open(str(file), framework="pt") as f:
                    for name in names:
                        self._set_full(targets[name], f.get_tensor(name).float())
            with safe_open(str(path / OPTIMIZER_NAME), framework="pt") as f:
                for name in targets:
                    if name.startswith("exp_avg"):
                        self._set_full(targets[name], f.get_tensor(name).float())
        self.optimizer_step = int(optimizer_step)

    def save_training_checkpoint(self, out_dir: Path, model_config: ModelConfig, state: dict,
                                 tokenizer, keep_last: int) -> Path:
        """Collective. Every rank writes its shards with DCP into a temporary directory that
        rank 0 made; rank 0 adds config.json, trainer_state.json and the tokenizer, renames
        the directory into place and moves `latest`. A failure on any rank fails all."""
        from retention.train_checkpoint import (DCP_DIR, STATE_NAME, _prune, _write_pointer,
                                                checkpoints_dir)
        folder = checkpoints_dir(out_dir)
        path = folder / f"step_{state['step']:08d}"
        box = [None]
        if self.ranks.main:
            folder.mkdir(parents=True, exist_ok=True)
            box = [tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=folder)]
        dist.broadcast_object_list(box, src=0)
        tmp = Path(box[0])
        error = None
        try:
            dcp.save(self._state_dict(), checkpoint_id=str(tmp / DCP_DIR))
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = e
        if not self.ranks.comm.any(error is not None) and self.ranks.main:
            try:
                (tmp / "config.json").write_text(model_config.to_json() + "\n")
                (tmp / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
                if tokenizer is not None:
                    tokenizer.save(tmp)
                publish_directory(tmp, path)
                _write_pointer(Path(out_dir), path.name)
                _prune(Path(out_dir), keep_last, path)
            except Exception as e:  # noqa: BLE001
                error = e
        if self.ranks.comm.any(error is not None):
            if self.ranks.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(f"sharded checkpoint failed: {error or 'on another rank'}")
        return path

    def close(self) -> None:
        self.model = self.params = self.exp_avg = self.exp_avg_sq = None
        self.ranks.comm.close()


# --- reading a sharded checkpoint in one process (export, single-process resume) -------------

def read_dcp_numpy(dcp_dir: Path) -> tuple[dict, dict]:
    """(parameters, moments) as full float32 NumPy arrays from a DCP folder, in this process
    (no process group needed): `retention export` and a resume on one rank or on MLX."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    metadata = FileSystemReader(str(dcp_dir)).read_metadata()
    tensors = {key: torch.empty(m.size, dtype=m.properties.dtype)
               for key, m in metadata.state_dict_metadata.items()
               if isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(tensors, checkpoint_id=str(dcp_dir), no_dist=True)
    params, moments = {}, {}
    for key, t in tensors.items():
        (moments if key.startswith("exp_avg") else params)[key] = t.float().numpy()
    return params, moments
