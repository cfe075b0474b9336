"""k-bit quantizers (2..8 and 16 bits): DoReFa, PACT and LSQ."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Quantizer, WeightQuantizer, channel_dims, check_bits, round_ste
from .oscillation import OscillationState, apply_frozen


def _check_kbit(bits: int, name: str) -> int:
    check_bits(bits)
    if not 2 <= bits <= 16:
        raise ValueError(f"{name} quantizes to 2..16 bits, got bits={bits}; use 'sign'/'xnor'/'imb' for 1 bit")
    return bits


def dorefa_levels(x01: Tensor, bits: int) -> Tensor:
    """``q_b(x) = round((2^b - 1) x) / (2^b - 1)`` with an identity STE (Zhou et al., DoReFa-Net 2016)."""
    levels = 2**bits - 1
    return round_ste(x01 * levels) / levels


class DoReFaWeight(WeightQuantizer):
    """DoReFa weights (Zhou et al. 2016; as in Zhuang et al., CVPR 2018, official code):
    ``w~ = tanh(w) / (2 max|tanh(w)|) + 1/2``, ``Q_w = 2 q_b(w~) - 1``."""

    name = "dorefa"

    def __init__(self, bits: int = 4) -> None:
        super().__init__(_check_kbit(bits, "dorefa"))

    def _normalized(self, w: Tensor) -> Tensor:
        t = torch.tanh(w)
        return t / (2 * t.abs().max()) + 0.5

    def quantize(self, w: Tensor) -> Tensor:
        return 2 * dorefa_levels(self._normalized(w), self.bits) - 1

    @torch.no_grad()
    def encode(self, w: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        codes = torch.round(self._normalized(w) * (2**self.bits - 1))
        return codes.to(torch.int32), {}

    def decode(self, codes: Tensor, params: dict[str, Tensor]) -> Tensor:
        return 2 * (codes.to(torch.float32) / (2**self.bits - 1)) - 1


class DoReFaAct(Quantizer):
    """DoReFa activations: ``Q_a(x) = q_b(clip(x, 0, 1))``, identity STE inside the range."""

    name = "dorefa"

    def __init__(self, bits: int = 4) -> None:
        super().__init__(_check_kbit(bits, "dorefa"))

    def forward(self, x: Tensor) -> Tensor:
        return dorefa_levels(torch.clamp(x, 0, 1), self.bits)


class PACT(Quantizer):
    """PACT (Choi et al. 2018): ``y = clip(x, 0, alpha)`` with learnable ``alpha``,
    ``Q(x) = round(y (2^b-1) / alpha) alpha / (2^b-1)``; STE through rounding so that
    ``dQ/dalpha = 1[x >= alpha]`` and ``dQ/dx = 1[0 <= x < alpha]`` (the paper's gradients)."""

    name = "pact"

    def __init__(self, bits: int = 4, alpha: float = 10.0) -> None:
        super().__init__(_check_kbit(bits, "pact"))
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.minimum(torch.relu(x), self.alpha)
        levels = 2**self.bits - 1
        alpha = self.alpha.detach()
        q = torch.round(y.detach() * (levels / alpha)) * (alpha / levels)
        return y + (q - y).detach()


class _LSQFunction(torch.autograd.Function):
    """LSQ's forward and its gradients in one node (fewer passes and saved tensors than autograd
    through clamp/round/grad-scale): ``v_hat = round(clip(v/s, -Q_N, Q_P)) s``,
    ``dv_hat/dv = 1[-Q_N <= v/s <= Q_P]``, ``dv_hat/ds = q - (v/s) 1[inside]`` (= ``round(v/s) - v/s``
    inside, ``-Q_N`` below, ``Q_P`` above), the step gradient times ``g``. Frozen weights keep
    their frozen integer and get no gradient."""

    @staticmethod
    def forward(ctx, v: Tensor, step: Tensor, g: float, q_n: int, q_p: int, frozen, frozen_int):
        x = v / step
        clipped = torch.clamp(x, -q_n, q_p)
        inside = clipped == x
        q = torch.round(clipped)
        if frozen is not None:
            q = torch.where(frozen, frozen_int, q)
            inside &= ~frozen
        ctx.save_for_backward(x, q, inside, step)
        ctx.g = g
        return q * step

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, q, inside, step = ctx.saved_tensors
        mask = inside.to(grad.dtype)
        grad_v = grad * mask
        dq_ds = grad * (q - x * mask)
        dims = [d for d in range(x.dim()) if step.shape[d] == 1] if step.dim() == x.dim() else list(range(x.dim()))
        grad_s = dq_ds.sum(dim=dims, keepdim=step.dim() == x.dim()).reshape(step.shape) * ctx.g
        return grad_v, grad_s, None, None, None, None, None


class LSQ(WeightQuantizer):
    """LSQ, Learned Step size Quantization (Esser et al., ICLR 2020).

    ``v_bar = round(clip(v/s, -Q_N, Q_P))``, ``v_hat = v_bar * s``; signed
    (weights) ``Q_N = 2^(b-1), Q_P = 2^(b-1) - 1``; unsigned (activations after
    ReLU) ``Q_N = 0, Q_P = 2^b - 1``. STE for ``v`` inside the range, 0 outside;
    ``d v_hat/d s = -v/s + round(v/s)`` inside, ``-Q_N`` below, ``Q_P`` above,
    times the gradient scale ``g = 1/sqrt(N Q_P)`` (``N`` elements per sample).
    ``per_channel=True`` gives weights one step per output channel; ``N`` then counts the
    weights of one channel, those that share a step [ours: the paper's per-tensor rule applied
    per step, so a channel's step moves as fast, relative to its size, as a per-tensor one].
    The step is initialized on the first forward as ``s = 2 mean|v| / sqrt(Q_P)``.
    Weights are signed; activations (``activation=True``) unsigned unless
    ``signed=True`` (inputs after hardtanh). Under DDP the initial step is
    averaged across ranks so that every replica starts from the same value.
    """

    name = "lsq"

    def __init__(
        self,
        bits: int = 4,
        activation: bool = False,
        signed: bool | None = None,
        per_channel: bool = False,
        channels: int = 1,
    ) -> None:
        super().__init__(_check_kbit(bits, "lsq"))
        if per_channel and activation:
            raise ValueError(
                "per_channel LSQ gives weights one step per output channel; activations take one step per "
                "tensor, so drop per_channel from the act_quantizer spec"
            )
        self.activation = activation
        signed = not activation if signed is None else signed
        self.signed = signed
        self.per_channel = per_channel
        self.q_n = 2 ** (bits - 1) if signed else 0
        self.q_p = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        self.step = nn.Parameter(torch.ones(channels if per_channel else 1))
        self.register_buffer("initialized", torch.tensor(False))
        self.oscillation: OscillationState | None = None

    def track_oscillations(self, shape: torch.Size, momentum: float = 1e-3) -> OscillationState:
        """Attach (once) the per-weight oscillation state used for tracking and freezing."""
        if self.oscillation is None:
            self.oscillation = OscillationState(shape, momentum).to(self.step.device)
        return self.oscillation

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Accept a per-tensor step for a per-channel quantizer: every channel starts at that step,
        so a per-channel model loaded from a per-tensor one computes the same function."""
        step = state_dict.get(prefix + "step")
        if step is not None and step.shape != self.step.shape:
            if step.numel() == 1:
                state_dict[prefix + "step"] = step.reshape(()).expand_as(self.step).clone()
            elif self.step.numel() == 1:
                raise ValueError(
                    f"{prefix}step has {step.numel()} values where this model has one: the weights were trained "
                    "with per-channel quantizer parameters; build the model with the same quantizer spec, "
                    "e.g. weight_quantizer {name: lsq, per_channel: true}"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _step(self, v: Tensor) -> Tensor:
        if self.per_channel:
            return self.step.view(-1, *([1] * (v.dim() - 1)))
        return self.step

    def _set_range(self) -> None:
        self.q_n = 2 ** (self.bits - 1) if self.signed else 0
        self.q_p = 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def set_bits(self, bits: int, reinitialize: bool = True) -> None:
        """Change the bit-width; the step is re-initialized from the data on the next forward."""
        super().set_bits(bits)
        self._set_range()
        if reinitialize:
            self.initialized.fill_(False)

    @torch.no_grad()
    def initialize(self, v: Tensor) -> None:
        """``s = 2 mean|v| / sqrt(Q_P)`` (per channel when ``per_channel``)."""
        mean_abs = v.abs().mean(dim=channel_dims(v, 0)) if self.per_channel else v.abs().mean().view(1)
        step = (2 * mean_abs / math.sqrt(self.q_p)).clamp_min(1e-8)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(step)
            step /= torch.distributed.get_world_size()
        self.step.copy_(step)
        self.initialized.fill_(True)

    @torch.no_grad()
    def integer(self, v: Tensor, frozen: bool = True) -> Tensor:
        """``round(clip(v/s, -Q_N, Q_P))``, frozen weights at their frozen value unless ``frozen=False``."""
        x_int = torch.round(torch.clamp(v / self._step(v), -self.q_n, self.q_p))
        return apply_frozen(x_int, self.oscillation) if frozen else x_int

    def quantize(self, v: Tensor) -> Tensor:
        if not self.initialized:
            self.initialize(v.detach())
        sharing_a_step = v[0].numel() if self.activation or self.per_channel else v.numel()
        g = 1.0 / math.sqrt(sharing_a_step * self.q_p)
        state = self.oscillation
        frozen = state.frozen if state is not None and bool(state.frozen.any()) else None
        frozen_int = state.frozen_int if frozen is not None else None
        return _LSQFunction.apply(v, self._step(v), g, self.q_n, self.q_p, frozen, frozen_int)

    @torch.no_grad()
    def encode(self, w: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if not self.initialized:
            self.initialize(w)
        return (self.integer(w) + self.q_n).to(torch.int32), {"step": self.step.detach().clone()}

    def decode(self, codes: Tensor, params: dict[str, Tensor]) -> Tensor:
        step = params["step"]
        if self.per_channel:
            step = step.view(-1, *([1] * (codes.dim() - 1)))
        return (codes.to(step.dtype) - self.q_n) * step

    def config(self) -> dict:
        cfg = {"name": self.name, "bits": self.bits, "activation": self.activation, "signed": self.signed}
        if self.per_channel:
            cfg["per_channel"] = True
        return cfg
