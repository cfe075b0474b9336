"""Binary (1-bit) quantizers: activations ``sign``/``RSign``, weights XNOR and IMB."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Quantizer, WeightQuantizer, channel_dims
from .estimators import Estimator, TanhEstimator, fused_imb, make_estimator, sign


class Sign(Quantizer):
    """Binary activation ``Q_a(x) = sign(x)`` in {-1, +1}, no scale.

    The backward is the estimator's: ``ste`` (BinaryConnect), ``clipped`` (BNN),
    ``approx`` (Bi-Real Net), ``ede`` (IR-Net) or ``dte`` (DIR-Net, [ours]).
    """

    name = "sign"
    channel_dim = 1

    def __init__(self, bits: int = 1, estimator: str | Estimator | None = "clipped") -> None:
        super().__init__(1)
        self.estimator = make_estimator(estimator)

    def forward(self, x: Tensor) -> Tensor:
        return sign(x, self.estimator, self.channel_dim)

    def fusable_sign_estimator(self) -> TanhEstimator | None:
        return self.estimator if isinstance(self.estimator, TanhEstimator) else None

    def config(self) -> dict:
        return {"name": self.name, "estimator": self.estimator.name}

    def extra_repr(self) -> str:
        return "bits=1"


class RSign(Sign):
    """ReActNet's RSign (Liu et al., ECCV 2020): ``sign(x - a_c)``, learnable threshold ``a_c``
    per input channel, ApproxSign backward by default (official code)."""

    name = "rsign"

    def __init__(self, bits: int = 1, estimator: str | Estimator | None = "approx", channels: int = 1) -> None:
        super().__init__(1, estimator)
        self.threshold = nn.Parameter(torch.zeros(channels))

    def fusable_sign_estimator(self) -> None:
        return None  # sign(x - a_c): not the plain sign of the hardtanh output

    def forward(self, x: Tensor) -> Tensor:
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return sign(x - self.threshold.view(shape), self.estimator, self.channel_dim)


class _BinaryWeight(WeightQuantizer):
    """Shared part of binary weight quantizers: ``Q(w) = sign(u) * scale`` per output channel."""

    def __init__(self, bits: int = 1, estimator: str | Estimator | None = "ste") -> None:
        super().__init__(1)
        self.estimator = make_estimator(estimator)

    def signed_input_and_scale(self, w: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover
        """The tensor whose sign is taken, and the detached per-channel scale."""
        raise NotImplementedError

    def quantize(self, w: Tensor) -> Tensor:
        u, scale = self.signed_input_and_scale(w)
        return sign(u, self.estimator, self.channel_dim) * scale

    @torch.no_grad()
    def encode(self, w: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        u, scale = self.signed_input_and_scale(w)
        return (u >= 0).to(torch.uint8), {"scale": scale}

    def decode(self, codes: Tensor, params: dict[str, Tensor]) -> Tensor:
        signs = codes.to(params["scale"].dtype) * 2 - 1
        return signs * params["scale"]

    def config(self) -> dict:
        return {"name": self.name, "estimator": self.estimator.name}

    def extra_repr(self) -> str:
        return "bits=1"


class XNORWeight(_BinaryWeight):
    """XNOR-Net weight binarization (Rastegari et al., ECCV 2016):
    ``Q(w) = mean_j(|w|) * sign(w)`` per output channel ``j``, scale detached."""

    name = "xnor"

    def signed_input_and_scale(self, w: Tensor) -> tuple[Tensor, Tensor]:
        scale = w.detach().abs().mean(dim=channel_dims(w, 0), keepdim=True)
        return w, scale


class IMBWeight(_BinaryWeight):
    """IMB, Information Maximized Binarization (IR-Net's Libra-PB, Qin et al. CVPR 2020; DIR-Net).

    Per output channel ``j``: ``w_hat = (w - mean_j w) / std_j w`` (unbiased std,
    gradients flow through mean and std), ``s_j = 2**round(log2(mean_j |w_hat|))``
    (detached, a bit shift at deployment), ``Q(w) = sign(w_hat) * s_j``.
    The estimator (EDE/DTE in DIR-Net) is applied to ``w_hat``.
    """

    name = "imb"

    def __init__(self, bits: int = 1, estimator: str | Estimator | None = "dte") -> None:
        super().__init__(bits, estimator)

    def quantize(self, w: Tensor) -> Tensor:
        fused = fused_imb(w, self.estimator)  # the C++ kernels, when in use
        return super().quantize(w) if fused is None else fused

    def signed_input_and_scale(self, w: Tensor) -> tuple[Tensor, Tensor]:
        dims = channel_dims(w, 0)
        mean = w.mean(dim=dims, keepdim=True)
        std = w.std(dim=dims, keepdim=True).clamp_min(1e-12)
        w_hat = (w - mean) / std
        scale = torch.pow(2.0, torch.round(torch.log2(w_hat.detach().abs().mean(dim=dims, keepdim=True))))
        return w_hat, scale
