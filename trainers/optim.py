"""Optimizers and learning-rate schedules shared by the LightningModules."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import torch
from torch import nn

SCHEDULERS = ("cosine", "step", "linear", "constant")
OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass
class Schedule:
    """Per-step LR multiplier: linear warmup over ``warmup_epochs``, then ``cosine`` (to
    ``min_lr_ratio``), ``linear``, ``step`` (x ``gamma`` at each epoch in ``milestones``) or
    ``constant``. ``restarts`` (epochs) start the warmup + schedule again, one cycle per
    segment (progressive quantization restarts it at every stage)."""

    scheduler: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: Sequence[float] | None = None
    gamma: float = 0.1
    min_lr_ratio: float = 0.0
    restarts: Sequence[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")

    def factor(self, step: int, total_steps: int, steps_per_epoch: float) -> float:
        bounds = [0.0, *(r * steps_per_epoch for r in self.restarts), float(total_steps)]
        start, end = next((a, b) for a, b in pairwise(bounds) if step < b or b == bounds[-1])
        step, total = step - start, end - start
        warmup = self.warmup_epochs * steps_per_epoch
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        if self.scheduler == "cosine":
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.scheduler == "linear":
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * (1 - progress)
        if self.scheduler == "step":
            return self.gamma ** sum(step / steps_per_epoch >= m for m in (self.milestones or []))
        return 1.0


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only; BN, biases and quantizer parameters are exempt."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or "quantizer" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(name: str, groups: list[dict], lr: float, momentum: float = 0.9, nesterov: bool = False):
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def per_step_scheduler(optimizer, schedule: Schedule, trainer) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping every optimizer step over the trainer's whole run."""
    total = max(int(trainer.estimated_stepping_batches), 1)
    per_epoch = total / max(trainer.max_epochs or 1, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule.factor(s, total, per_epoch))
