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
    ensemble serves logit KD at any ``T``. The members must share their class count.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 teachers, got {len(members)}")
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        logits = [member(x) for member in self.members]
        shapes = {tuple(z.shape) for z in logits}
        if len(shapes) > 1:
            raise ValueError(f"the teachers' logits differ in shape: {sorted(shapes)}; they must share the classes")
        return torch.stack(logits).mean(0)
