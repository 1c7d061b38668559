"""Learning-rate schedule: linear warmup from 0, then cosine decay to min_lr (or constant)."""
from __future__ import annotations

import math


def learning_rate(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
                  schedule: str = "cosine") -> float:
    """The learning rate for optimizer step `step` (0-based: the first update uses step 0).

    Warmup reaches `lr` at the end of step warmup_steps - 1 ((step + 1) / warmup_steps) so the
    first update is not wasted at lr 0; the cosine then runs from lr to min_lr at the last step.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def schedule_for(config) -> dict:
    """The schedule's parameters for a TrainConfig (stored in trainer_state.json)."""
    return dict(lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps,
                total_steps=config.total_steps, schedule=config.schedule)
