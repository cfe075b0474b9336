"""A frozen ensemble of teachers that distils as one model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class TeacherEnsemble(nn.Module):
    """Several teachers whose logits are averaged: ``z = (1/K) sum_k z_k`` [ours].

    Multi-teacher distillation (You et al., KDD 2017) averages the teachers' soft targets; the mean
    of the logits used here is, at every temperature ``T``, the normalised geometric mean of the
    members' softened probabilities, ``softmax(z/T) ∝ prod_k softmax(z_k/T)^(1/K)``, so one
    ensemble serves logit KD at any ``T``. The members must share their class count (checked here
    for members that state ``num_classes``, as zoo models do, so the training step checks nothing), and
    the ensemble states it too.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 teachers, got {len(members)}")
        classes = sorted({m.num_classes for m in members if getattr(m, "num_classes", None) is not None})
        if len(classes) > 1:
            raise ValueError(f"the teachers have {classes} classes; an ensemble's teachers must share the classes")
        self.members = nn.ModuleList(members)
        self.num_classes: int | None = classes[0] if classes else None  # as a zoo model states it

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([member(x) for member in self.members]).mean(0)
