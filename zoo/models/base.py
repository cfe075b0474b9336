"""What every zoo architecture shares: the layer factory and input checking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..layers import HardtanhSign, QConv2d, QLinear
from ..quant import QuantizerSpec, check_bits, make_quantizer

ACTIVATIONS = {"hardtanh": HardtanhSign, "relu": nn.ReLU}


@dataclass
class QuantConfig:
    """Bits and quantizer specs of a model's quantized layers; builds those layers.

    ``first_last_bits`` quantizes the first conv's weights and the last linear
    (weights and input) to that many bits; 32 (the default) keeps them real.
    """

    weight_bits: int = 32
    act_bits: int = 32
    weight_quantizer: QuantizerSpec = None
    act_quantizer: QuantizerSpec = None
    first_last_bits: int = 32

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "weight_bits")
        check_bits(self.act_bits, "act_bits")
        check_bits(self.first_last_bits, "first_last_bits")
        if self.first_last_bits == 1:
            raise ValueError("first_last_bits=1 is not supported: first and last layers are real or k-bit")

    @property
    def is_binary(self) -> bool:
        return self.weight_bits == 1

    def default_activation(self) -> str:
        """hardtanh for binary networks (IR-Net, Bi-Real), ReLU otherwise."""
        return "hardtanh" if self.weight_bits == 1 or self.act_bits == 1 else "relu"

    def _qconv(self, in_ch: int, out_ch: int, kernel_size: int, stride: int, padding: int, wq, aq) -> QConv2d:
        return QConv2d(
            in_ch,
            out_ch,
            kernel_size,
            stride=stride,
            padding=padding,
            bias=False,
            weight_quantizer=wq,
            input_quantizer=aq,
        )

    def conv(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0) -> QConv2d:
        """A quantized conv (no bias, BN follows)."""
        wq = make_quantizer(self.weight_quantizer, self.weight_bits, "weight", out_ch)
        aq = make_quantizer(self.act_quantizer, self.act_bits, "act", in_ch)
        return self._qconv(in_ch, out_ch, kernel_size, stride, padding, wq, aq)

    def first_conv(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0) -> QConv2d:
        """The stem conv: real input; real weights unless ``first_last_bits < 32`` (then LSQ)."""
        spec = {"name": "lsq"} if self.first_last_bits < 32 else None
        wq = make_quantizer(spec, self.first_last_bits, "weight")
        return self._qconv(in_ch, out_ch, kernel_size, stride, padding, wq, None)

    def real_conv(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
        """A real conv (downsample shortcuts stay real in the Bi-Real/IR-Net structures)."""
        return nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, bias=False)

    def classifier(self, in_features: int, num_classes: int) -> QLinear:
        """The last linear: real unless ``first_last_bits < 32`` (then LSQ on weights and input)."""
        spec = {"name": "lsq"} if self.first_last_bits < 32 else None
        return QLinear(
            in_features,
            num_classes,
            weight_quantizer=make_quantizer(spec, self.first_last_bits, "weight"),
            input_quantizer=make_quantizer(
                {"name": "lsq", "signed": True} if spec else None, self.first_last_bits, "act"
            ),
        )


class ZooModel(nn.Module):
    """Base of zoo architectures: checks inputs, exposes ``feature_info`` (timm style)
    with the stage outputs that distillation hooks into."""

    in_chans = 3
    feature_info: list[dict[str, Any]]

    def forward_features(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_input(self, x: Tensor) -> None:
        if isinstance(x, torch.fx.Proxy):  # symbolic tracing (e.g. BatchNorm folding in zoo.deploy)
            return
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_chans:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} expects a batch of images of shape (N, {self.in_chans}, H, W), "
                f"got {got}; add a batch dimension with x.unsqueeze(0) or convert the image to RGB"
            )

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.forward_head(self.forward_features(x))
