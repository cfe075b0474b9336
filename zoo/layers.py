"""Quantized layers: ``nn.Conv2d``/``nn.Linear`` subclasses that take quantizer objects.

``QConv2d(..., weight_quantizer=IMBWeight(), input_quantizer=Sign())`` computes
``conv(input_quantizer(x), weight_quantizer(w))``. Binary convolutions zero-pad
*after* the sign, so border taps contribute 0 (the {-1, 0, +1} semantics of
``F.conv2d`` on a signed input); the deployed XNOR kernels reproduce that.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .quant import Identity, Quantizer
from .quant.estimators import TanhEstimator, hardtanh_sign


class _QuantizedMixin:
    weight_quantizer: Quantizer
    input_quantizer: Quantizer
    quantize: bool = True  # False: this layer runs real for now (stochastic precision)

    @property
    def weight_bits(self) -> int:
        return self.weight_quantizer.bits

    @property
    def act_bits(self) -> int:
        return self.input_quantizer.bits

    def quantized_weight(self) -> Tensor:
        """The weight the layer computes with (fake-quantized unless its quantizer is disabled)."""
        use = self.quantize and self.weight_quantizer.enabled
        return self.weight_quantizer(self.weight) if use else self.weight

    _input_sign: tuple[Tensor, Tensor] | None = None  # (x, sign(x)) handed over by a HardtanhSign

    def quantized_input(self, x: Tensor) -> Tensor:
        handed, self._input_sign = self._input_sign, None
        if handed is not None and handed[0] is x and self.fused_sign_estimator() is not None:
            return handed[1]  # computed with x by the HardtanhSign before this layer
        return self.input_quantizer(x) if self.quantize and self.input_quantizer.enabled else x

    def fused_sign_estimator(self) -> TanhEstimator | None:
        """The tanh estimator (EDE/DTE) of this layer's plain ``Sign`` input quantizer, if it is on:
        then the :class:`HardtanhSign` before the layer may compute the sign for it."""
        q = self.input_quantizer
        return q.fusable_sign_estimator() if self.quantize and q.enabled else None

    def take_input_sign(self, x: Tensor, values: Tensor) -> None:
        """``values = sign(x)`` (with this layer's estimator) for the next call with input ``x``."""
        self._input_sign = (x, values)

    def set_quantized(self, weight: bool = True, inputs: bool = True) -> None:
        """Switch weight and input quantization on or off (the latent tensors are kept)."""
        self.weight_quantizer.enabled = weight
        self.input_quantizer.enabled = inputs

    def _bits_repr(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}"


class QConv2d(_QuantizedMixin, nn.Conv2d):
    """``nn.Conv2d`` on quantized inputs and weights."""

    def __init__(
        self,
        *args,
        weight_quantizer: Quantizer | None = None,
        input_quantizer: Quantizer | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quantizer = weight_quantizer or Identity()
        self.input_quantizer = input_quantizer or Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._bits_repr()}"

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quantizer: Quantizer, input_quantizer: Quantizer) -> QConv2d:
        """A QConv2d with ``conv``'s hyper-parameters and a copy of its weights."""
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            weight_quantizer=weight_quantizer,
            input_quantizer=input_quantizer,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        q.load_state_dict(conv.state_dict(), strict=False)
        return q


class QLinear(_QuantizedMixin, nn.Linear):
    """``nn.Linear`` on quantized inputs and weights."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_quantizer: Quantizer | None = None,
        input_quantizer: Quantizer | None = None,
        **kwargs,
    ) -> None:
        super().__init__(in_features, out_features, bias, **kwargs)
        self.weight_quantizer = weight_quantizer or Identity()
        self.input_quantizer = input_quantizer or Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._bits_repr()}"

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quantizer: Quantizer, input_quantizer: Quantizer) -> QLinear:
        q = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            weight_quantizer=weight_quantizer,
            input_quantizer=input_quantizer,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        q.load_state_dict(linear.state_dict(), strict=False)
        return q


QUANTIZED_LAYERS = (QConv2d, QLinear)


class HardtanhSign(nn.Hardtanh):
    """``hardtanh(x)`` (-1, 1) that, in training, also computes the sign its binary consumer takes
    of the output, in one fused pass forward and backward (:func:`zoo.quant.estimators.hardtanh_sign`).

    The model links it to the layer its output feeds (:meth:`feeds`); that layer uses the handed
    sign only when its input *is* this output and its quantizer is a plain ``Sign`` with EDE/DTE,
    and quantizes its input itself otherwise, so values and gradients are those of the unfused ops.
    """

    def __init__(self) -> None:
        super().__init__(-1.0, 1.0)
        self._consumer: list[nn.Module] = []  # a list: not a submodule (no second path to its state)

    def feeds(self, layer: nn.Module | None) -> None:
        """Link this activation to the quantized layer its output feeds (anything else unlinks it)."""
        self._consumer = [layer] if isinstance(layer, QUANTIZED_LAYERS) else []

    def forward(self, x: Tensor) -> Tensor:
        layer = self._consumer[0] if self._consumer else None
        if layer is None or not (self.training and torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        estimator = layer.fused_sign_estimator()
        if estimator is None:
            return super().forward(x)
        out, values = hardtanh_sign(x, estimator, layer.input_quantizer.channel_dim)
        layer.take_input_sign(out, values)
        return out


class GlobalAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d(1)`` whose gradient keeps a channels_last input's layout.

    ``AdaptiveAvgPool2d(1)`` is a ``mean``, whose gradient comes back NCHW; an NCHW gradient
    meeting NHWC activations sends every BatchNorm backward and hardtanh behind it down PyTorch's
    slow mixed-layout path (``--model.init_args.channels_last``). So in training the mean is
    ``avg_pool2d`` with the whole map as its window (the same values to rounding); in eval mode it
    stays the adaptive pool, which exports to ONNX for any input size.
    """

    def __init__(self) -> None:
        super().__init__(1)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return F.avg_pool2d(x, x.shape[-2:])
        return super().forward(x)


class RPReLU(nn.Module):
    """ReActNet's RPReLU (Liu et al., ECCV 2020): ``PReLU(x - gamma_c) + zeta_c`` per channel."""

    def __init__(self, channels: int, init: float = 0.25) -> None:
        super().__init__()
        self.shift_in = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.prelu = nn.PReLU(channels, init=init)
        self.shift_out = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.prelu(x - self.shift_in) + self.shift_out
