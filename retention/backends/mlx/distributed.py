"""Data-parallel MLX training over `mx.distributed` (docs/scaling.md): `mlx.launch -n N`
starts N processes (the ring backend over TCP; MPI/JACCL/NCCL where configured), each holds the
whole model, reads its slice of the global batch and takes the same AdamW step with gradients
averaged over the ranks. Rank 0 writes the (ordinary, canonical) checkpoints.
"""
from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from retention.config import ModelConfig, TrainConfig
from retention.distributed import Ranks
from retention.backends.mlx.trainer import Trainer


class MLXComm:
    """The loop's collectives over an mx.distributed group."""

    def __init__(self, group):
        self.group = group

    def any(self, flag: bool) -> bool:
        total = mx.distributed.all_sum(mx.array(1.0 if flag else 0.0), group=self.group)
        return total.item() > 0

    def barrier(self) -> None:
        mx.eval(mx.distributed.all_sum(mx.array(0.0), group=self.group))

    def close(self) -> None:
        pass


def init_ranks() -> Ranks:
    """Join the group that mlx.launch described (MLX_RANK, MLX_HOSTFILE, ...)."""
    group = mx.distributed.init(strict=True)
    return Ranks(group.rank(), group.size(), group.rank(), MLXComm(group))


class DistributedTrainer(Trainer):
    """The MLX Trainer with gradients, losses and validation losses averaged over the ranks."""

    def __init__(self, model_config: ModelConfig, config: TrainConfig, ranks: Ranks):
        super().__init__(model_config, config)
        self.ranks, self.group = ranks, ranks.comm.group

    def describe(self) -> str:
        return f"{super().describe()}; data parallel over {self.ranks.world} ranks"

    def _mean(self, x):
        return mx.distributed.all_sum(x, group=self.group) / self.ranks.world

    def _mean_loss_and_grads(self, micro_batches):
        total, grads = super()._mean_loss_and_grads(micro_batches)
        names = list(grads)  # a list keeps the canonical (dotted) names out of tree_unflatten
        averaged = nn.average_gradients([grads[n] for n in names], group=self.group)
        return self._mean(total), dict(zip(names, averaged))

    def eval_loss(self, batches) -> float:
        return self._mean(mx.array(super().eval_loss(batches))).item()

    def save_training_checkpoint(self, out_dir: Path, model_config: ModelConfig, state: dict,
                                 tokenizer, keep_last: int) -> Path:
        """Rank 0 writes the checkpoint (every rank holds the same weights); all ranks learn
        whether it worked."""
        from retention.train_checkpoint import checkpoints_dir, save_training_checkpoint
        path, error = checkpoints_dir(out_dir) / f"step_{state['step']:08d}", None
        if self.ranks.main:
            try:
                path = save_training_checkpoint(Path(out_dir), model_config, self, state,
                                                tokenizer, keep_last)
            except Exception as e:  # noqa: BLE001 - any failure must reach the vote below
                error = e
        if self.ranks.comm.any(error is not None):
            raise OSError(f"checkpoint failed on rank 0: {error or 'see rank 0'}")
        return path

    def close(self) -> None:
        self.ranks.comm.close()
