"""Learning-rate schedule as a pure function of the optimizer step (paper sec. 4; DESIGN 5).

Linear warmup then cosine decay to ``min_lr``. Being a pure function of the step, it needs no
state in checkpoints and a resumed run gets exactly the same rates. ``set_lr`` multiplies the
rate by each parameter group's ``lr_scale`` (layer-wise lr decay for fine-tuning), so a
per-group factor stays in force after every step instead of being overwritten by the schedule.
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int,
          min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    * warmup: ``base_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``, so the first
      step already moves and the last warmup step runs at ``base_lr``;
    * cosine: from ``base_lr`` at ``step == warmup_steps`` down to ``min_lr`` at the last step
      ``total_steps - 1`` (and ``min_lr`` for any later step).
    A warmup longer than the run simply never reaches ``base_lr``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr * group["lr_scale"]`` (scale 1 when a group has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
