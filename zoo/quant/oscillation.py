"""Weight oscillations in QAT (Nagel et al., "Overcoming Oscillations in Quantization-Aware
Training", ICML 2022; official code qualcomm-ai-research/oscillations-qat).

Latent weights near a rounding threshold flip between two integer values from
step to step. :class:`OscillationState` counts those flips per weight (EMA
frequency), can *freeze* a weight at its EMA integer value, and
:func:`dampening_loss` pulls latent weights toward their bin centers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class OscillationState(nn.Module):
    """Per-weight oscillation statistics of one quantizer, in the integer domain.

    Each step, with ``x_int = round(clip(w/s))`` and ``d = x_int(t) - x_int(t-1)``,
    an oscillation is a move opposite to the last non-zero move:
    ``o = [d != 0 and sign(d) = -sign(last non-zero d)]``; the frequency is the
    EMA ``f = m o + (1 - m) f`` and ``ema_int = m x_int + (1 - m) ema_int``.
    A frozen weight stays at ``round(ema_int)`` for good (the quantizer returns
    that value and passes no gradient to it). All state is buffers, so it is
    saved in checkpoints and restored on resume.
    """

    def __init__(self, shape: torch.Size | tuple[int, ...], momentum: float = 1e-3) -> None:
        super().__init__()
        self.momentum = momentum
        for name in ("prev_int", "last_dir", "freq", "ema_int", "frozen_int"):
            self.register_buffer(name, torch.zeros(shape))
        self.register_buffer("frozen", torch.zeros(shape, dtype=torch.bool))
        self.register_buffer("started", torch.tensor(False))

    @torch.no_grad()
    def update(self, x_int: Tensor) -> Tensor:
        """Record this step's integer weights; returns the mask of weights that oscillated."""
        if not self.started:
            self.prev_int.copy_(x_int)
            self.ema_int.copy_(x_int)
            self.started.fill_(True)
            return torch.zeros_like(self.frozen)
        m = self.momentum
        direction = torch.sign(x_int - self.prev_int)
        oscillated = (direction != 0) & (self.last_dir != 0) & (direction != self.last_dir)
        self.last_dir.copy_(torch.where(direction != 0, direction, self.last_dir))
        self.freq.mul_(1 - m).add_(oscillated.to(self.freq.dtype), alpha=m)
        self.ema_int.mul_(1 - m).add_(x_int, alpha=m)
        self.prev_int.copy_(x_int)
        return oscillated

    @torch.no_grad()
    def freeze(self, threshold: float) -> int:
        """Freeze the weights whose frequency exceeds ``threshold``; returns how many were new."""
        new = (self.freq > threshold) & ~self.frozen
        self.frozen_int.copy_(torch.where(new, torch.round(self.ema_int), self.frozen_int))
        self.frozen |= new
        return int(new.sum())

    def oscillating_fraction(self, threshold: float) -> float:
        """Fraction of weights whose oscillation frequency exceeds ``threshold``."""
        return float((self.freq > threshold).float().mean())

    def frozen_fraction(self) -> float:
        return float(self.frozen.float().mean())

    def extra_repr(self) -> str:
        return f"shape={tuple(self.freq.shape)}, momentum={self.momentum}"


def apply_frozen(x_int: Tensor, state: OscillationState | None) -> Tensor:
    """Replace frozen entries of ``x_int`` by their frozen values (no gradient reaches them)."""
    if state is None or not bool(state.frozen.any()):
        return x_int
    return torch.where(state.frozen, state.frozen_int, x_int)


def dampening_loss(weight: Tensor, quantized: Tensor, step: Tensor, q_n: int, q_p: int) -> Tensor:
    """``mean_over_rest(sum_over_out_channels((q(w).detach() - clip(w, -Q_N s, Q_P s))^2))``
    for one layer (Nagel et al. 2022, official code); step size detached [ours]."""
    s = step.detach()
    if s.numel() > 1:
        s = s.view(-1, *([1] * (weight.dim() - 1)))
    clipped = torch.maximum(torch.minimum(weight, q_p * s), -q_n * s)
    return (quantized.detach() - clipped).pow(2).sum(0).mean()


@torch.no_grad()
def dampening_grad(weight: Tensor, quantized: Tensor, step: Tensor, q_n: int, q_p: int) -> Tensor:
    """Analytic gradient of :func:`dampening_loss` w.r.t. ``weight``: ``2 (clip(w) - q(w)) 1[inside] / n``
    with ``n`` elements per output channel. Added straight to ``weight.grad`` so that no second
    backward pass runs through a DDP-wrapped model."""
    s = step.detach()
    if s.numel() > 1:
        s = s.view(-1, *([1] * (weight.dim() - 1)))
    lo, hi = -q_n * s, q_p * s
    clipped = torch.maximum(torch.minimum(weight, hi), lo)
    inside = (weight > lo) & (weight < hi)
    return 2 * (clipped - quantized) * inside / (weight.numel() // weight.shape[0])


def freeze_threshold(progress: float, f_start: float, f_end: float, warmup: float = 0.25) -> float | None:
    """Freezing threshold at training progress in [0, 1]: off (None) for the first ``warmup``
    fraction, then cosine from ``f_start`` to ``f_end``."""
    if progress < warmup:
        return None
    tau = min((progress - warmup) / (1 - warmup), 1.0)
    return f_end + 0.5 * (f_start - f_end) * (1 + math.cos(math.pi * tau))


def dampening_weight(progress: float, lam_max: float, warmup: float = 0.25) -> float:
    """Dampening ``lambda``: 0 for the first ``warmup`` fraction, then cosine-increased to ``lam_max``."""
    if progress < warmup:
        return 0.0
    tau = min((progress - warmup) / (1 - warmup), 1.0)
    return lam_max * 0.5 * (1 - math.cos(math.pi * tau))
