"""Multi-process runs (docs/scaling.md): which rank this process is, how many there are, and
how the training loop shards each global batch between them. No torch or mlx here: a
backend's module (backends/torch/fsdp.py, backends/mlx/distributed.py) starts its process
group and supplies the collectives.

Launchers: torchrun and `accelerate launch` set WORLD_SIZE/RANK/LOCAL_RANK (torch);
`mlx.launch` sets MLX_RANK and MLX_HOSTFILE (mlx). A process started by neither is rank 0 of 1
and runs the plain single-process trainer.
"""
from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass, field


class SingleProcess:
    """The collectives of a world of one: nothing to agree with."""

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    comm: object = field(default_factory=SingleProcess)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def torch_launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def mlx_launched() -> bool:
    return "MLX_RANK" in os.environ


def init_ranks(backend: str, device: str | None = None) -> Ranks:
    """Join the launcher's process group (torchrun/accelerate for torch, mlx.launch for mlx);
    a process that no launcher started gets Ranks() and imports nothing."""
    if backend == "mlx" and torch_launched():
        raise ValueError("this process was started by torchrun/accelerate (WORLD_SIZE > 1) but "
                         "asks for the mlx backend; launch MLX runs with `mlx.launch -n N`, or "
                         "pass --backend torch")
    if backend == "torch" and mlx_launched() and not torch_launched():
        raise ValueError("this process was started by mlx.launch but asks for the torch "
                         "backend; launch torch runs with `torchrun --nproc_per_node N`")
    if backend == "torch" and torch_launched():
        return importlib.import_module("retention.backends.torch.fsdp").init_ranks(device)
    if backend == "mlx" and mlx_launched():
        return importlib.import_module("retention.backends.mlx.distributed").init_ranks()
    return Ranks()


def distributed_trainer_class(backend: str):
    module = {"torch": "retention.backends.torch.fsdp",
              "mlx": "retention.backends.mlx.distributed"}[backend]
    return importlib.import_module(module).DistributedTrainer


class RankShard:
    """Rows [rank*B, (rank+1)*B) of each batch of a stream built with the global batch
    (B x world rows): every rank reads the same global batch, so the position (and a resume
    with another number of ranks, at the same global batch) is the single-process one."""

    def __init__(self, stream, rank: int, world: int):
        self.stream, self.rank, self.world = stream, rank, world

    def next_batch(self):
        inputs, targets = self.stream.next_batch()
        rows = inputs.shape[0]
        if rows % self.world:
            raise AssertionError(f"global batch of {rows} rows does not split over "
                                 f"{self.world} ranks")
        b = rows // self.world
        rows_of_rank = slice(self.rank * b, (self.rank + 1) * b)
        return inputs[rows_of_rank], targets[rows_of_rank]

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


def shard_data(data, ranks: Ranks):
    """Wrap a retention.train_data.Data built with the global batch so this rank reads its
    slice of every training and validation batch."""
    if not ranks.distributed:
        return data
    make_validation = data.make_validation
    data.train = RankShard(data.train, ranks.rank, ranks.world)
    data.make_validation = lambda: RankShard(make_validation(), ranks.rank, ranks.world)
    return data


class QuietLogger:
    """The logger of ranks other than 0: prints and writes nothing, keeps the losses for the
    summary (the same numbers as rank 0's: losses are averaged over ranks)."""

    def __init__(self):
        self.losses: list[float] = []

    def log(self, step: int, metrics: dict) -> None:
        loss = metrics.get("loss")
        if isinstance(loss, float) and math.isfinite(loss):
            self.losses.append(loss)

    def write(self, line: str) -> None:
        pass

    def close(self) -> None:
        pass

    def get_summary(self) -> dict:
        from retention.metrics import TrainingLogger
        return TrainingLogger.get_summary(self)
