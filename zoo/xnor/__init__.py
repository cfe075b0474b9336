"""Fast binary inference on the CPU (``zoo.xnor``): ``zoo.deploy(model)`` and ``zoo.load(name, deploy=True)``.

Every W1A1 convolution or linear (binary weights, ``sign``/``RSign`` input) becomes a
:class:`BinaryConv2d`/:class:`BinaryLinear` that keeps its weights as packed bits
and computes exact integer dot products with XNOR and popcount on 64-bit words
(``zoo/csrc/xnor.cpp``, a C++ extension built on first use with torch's
``cpp_extension``). The weight scale and a directly following BatchNorm fold into
one per-channel affine ``y = s_o * dot + b_o``; real layers (stem, classifier,
1x1 downsamples) stay in PyTorch. Binary-weight layers with real inputs (W1A32)
become plain float convolutions with ``+-scale`` weights and the BatchNorm folded
(no XNOR speed-up is possible there). Padding follows the training model: zero
padding *after* the sign, so border taps contribute 0.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..kernels import ISAS, KernelBuildError, isa_code, kernels, kernels_available
from ..layers import QUANTIZED_LAYERS, QConv2d, QLinear
from ..quant.binary import RSign, Sign, _BinaryWeight

__all__ = [
    "ISAS",
    "BinaryConv2d",
    "BinaryLinear",
    "KernelBuildError",
    "available_isas",
    "deploy",
    "kernels_available",
    "pack_weight_bits",
]


def available_isas() -> list[str]:
    """The instruction-set paths this CPU can run (best last), e.g. ``['generic', 'popcnt', 'avx2', 'avx512']``."""
    ops = kernels()
    return [name for name, code in ISAS.items() if code and ops.supported(code)]


def pack_weight_bits(signs: Tensor) -> tuple[Tensor, Tensor]:
    """+-1 weights ``[O, C, KH, KW]`` -> (bits ``int64 [O, KH*KW*ceil(C/64)]``, corr ``int32 [O, KH*KW]``).

    Bits are laid out per tap along channels like the packed activations, 1 = -1, unused high
    bits 0; ``corr[o, tap] = sum_c w[o, c, tap]`` is what an all-+1 (padding) tap would add.
    """
    out_channels, channels, kh, kw = signs.shape
    words = (channels + 63) // 64
    negative = (signs < 0).permute(0, 2, 3, 1).to(torch.int64)  # [O, KH, KW, C]
    negative = nn.functional.pad(negative, (0, words * 64 - channels)).view(out_channels, kh, kw, words, 64)
    bits = (negative << torch.arange(64, dtype=torch.int64)).sum(-1)  # distinct powers: no overflow
    corr = signs.sum(dim=1).reshape(out_channels, kh * kw).round().to(torch.int32)
    return bits.reshape(out_channels, kh * kw * words), corr


def lane_layout(bits: Tensor) -> Tensor:
    """``[O, K]`` weight words -> ``[ceil(O/8), K, 8]``: eight outputs side by side for SIMD lanes
    (outputs padded with zero words)."""
    out_channels, k = bits.shape
    padded = nn.functional.pad(bits, (0, 0, 0, (-out_channels) % 8))
    return padded.view(-1, 8, k).transpose(1, 2).contiguous()


def _fold(scale: Tensor, bias: Tensor | None, bn: _BatchNorm | None) -> tuple[Tensor, Tensor]:
    """Per-channel ``(s, b)`` of ``bn(scale * z + bias)`` = ``s * z + b`` (eval-mode BN)."""
    scale = scale.detach().reshape(-1).float()
    bias = bias.detach().float() if bias is not None else torch.zeros_like(scale)
    if bn is None:
        return scale, bias
    gain = 1 / torch.sqrt(bn.running_var + bn.eps)
    shift = torch.zeros_like(gain)
    if bn.affine:
        gain, shift = gain * bn.weight.detach(), bn.bias.detach()
    return scale * gain, (bias - bn.running_mean) * gain + shift


def _input_threshold(layer: QConv2d | QLinear) -> Tensor:
    q = layer.input_quantizer
    return q.threshold.detach().float() if isinstance(q, RSign) else torch.empty(0)


class _XnorLayer(nn.Module):
    """Shared state of the deployed layers: packed weight words in SIMD-lane layout, the padding
    correction, the folded per-channel affine and the input threshold (RSign), all buffers."""

    def __init__(self, layer: QConv2d | QLinear, bn: _BatchNorm | None, isa: str, weight_4d: Tensor) -> None:
        super().__init__()
        codes, params = layer.weight_quantizer.exact_encoding(layer.weight)
        bits, corr = pack_weight_bits((codes.float() * 2 - 1).view_as(weight_4d))
        scale, bias = _fold(params["scale"], layer.bias, bn)
        self.isa, self._isa = isa, isa_code(isa)
        self.folded_bn = bn is not None
        self.register_buffer("weight_lanes", lane_layout(bits))
        self.register_buffer("corr", corr)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.register_buffer("threshold", _input_threshold(layer))

    def _conv(self, x: Tensor, channels: int, geometry: tuple[int, ...]) -> Tensor:
        """``binary_conv2d`` on ``x`` [N, C, H, W]; ``geometry`` = kernel, stride, padding, dilation (h, w each)."""
        ops = kernels()
        bits = ops.pack_signs(x.float(), self.threshold)
        return ops.binary_conv2d(bits, self.weight_lanes, self.corr, channels, *geometry, self.scale, self.bias,
                                 self._isa)  # fmt: skip


class BinaryConv2d(_XnorLayer):
    """A deployed W1A1 convolution: ``y = s_o * (sign(x - t) (*) sign(w))_int + b_o`` via XNOR-popcount."""

    def __init__(self, conv: QConv2d, bn: _BatchNorm | None = None, isa: str = "auto") -> None:
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"BinaryConv2d supports groups=1 and numeric zero padding, got groups={conv.groups}, "
                f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}; leave this layer undeployed"
            )
        super().__init__(conv, bn, isa, conv.weight)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self}: expected input [N, {self.in_channels}, H, W], got {list(x.shape)}")
        geometry = (*self.kernel_size, *self.stride, *self.padding, *self.dilation)
        return self._conv(x, self.in_channels, geometry).permute(0, 3, 1, 2)  # NCHW view of channels-last memory

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, xnor-popcount ({self.isa}), folded_bn={self.folded_bn}"
        )


class BinaryLinear(_XnorLayer):
    """A deployed W1A1 linear layer (a 1x1 binary convolution on a 1x1 image)."""

    def __init__(self, linear: QLinear, bn: _BatchNorm | None = None, isa: str = "auto") -> None:
        super().__init__(linear, bn, isa, linear.weight[:, :, None, None])
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"{self}: expected input [N, {self.in_features}], got {list(x.shape)}")
        one_by_one = (1, 1, 1, 1, 0, 0, 1, 1)
        return self._conv(x[:, :, None, None], self.in_features, one_by_one).view(x.shape[0], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, xnor-popcount ({self.isa})"


def _binary_weights(layer: nn.Module) -> bool:
    return (
        isinstance(layer, QUANTIZED_LAYERS)
        and layer.quantize
        and layer.weight_quantizer.enabled
        and isinstance(layer.weight_quantizer, _BinaryWeight)
    )


def _binary_inputs(layer: nn.Module) -> bool:
    q = layer.input_quantizer
    return layer.quantize and q.enabled and isinstance(q, Sign)


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QUANTIZED_LAYERS) or super().is_leaf_module(m, qualname)


def conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """``{layer name: BatchNorm name}`` for quantized layers whose only use is a BatchNorm that is used once.

    Found by tracing the model with ``torch.fx`` (quantized layers as leaves); a model fx cannot
    trace gets no folding (``{}``)."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception:
        return {}
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BatchNorm):
            continue
        source = node.args[0] if node.args else None
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and isinstance(modules.get(source.target), QUANTIZED_LAYERS)
            and len(source.users) == 1
            and calls[node.target] == 1
            and calls[source.target] == 1
        ):
            pairs[source.target] = node.target
    return pairs


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _float_binary_conv(layer: QConv2d, bn: _BatchNorm | None) -> nn.Conv2d:
    """A W1A32 conv as a float conv with ``+-1`` weights and scale, bias and BN folded."""
    codes, params = layer.weight_quantizer.exact_encoding(layer.weight)
    scale, bias = _fold(params["scale"], layer.bias, bn)
    conv = nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
        bias=True,
        padding_mode=layer.padding_mode,
    )
    with torch.no_grad():
        conv.weight.copy_((codes.float() * 2 - 1) * scale.view(-1, 1, 1, 1))
        conv.bias.copy_(bias)
    return conv


@torch.no_grad()
def deploy(model: nn.Module, isa: str = "auto", fold_bn: bool = True) -> nn.Module:
    """An inference copy of ``model`` with XNOR-popcount W1A1 layers (see the module docstring).

    ``isa``: ``auto`` (the best this CPU has), ``avx512``, ``avx2``, ``popcnt`` or ``generic``.
    The copy is in eval mode; ``model`` is left untouched. The result's ``deploy_info`` says
    what was converted. If the C++ kernels cannot be built (no compiler), a warning says so and
    the copy runs through the float path, with the same outputs.
    """
    isa_code(isa)  # a clear error for an unknown name
    deployed = copy.deepcopy(model).eval()
    info: dict[str, Any] = {"isa": isa, "xnor_layers": 0, "float_binary_weight_layers": 0, "folded_bn": 0}
    try:
        kernels()
    except KernelBuildError as err:
        warnings.warn(f"zoo.deploy: {err}; the model runs through the float path", stacklevel=2)
        deployed.deploy_info = {**info, "isa": None, "error": str(err)}
        return deployed
    pairs = conv_bn_pairs(deployed) if fold_bn else {}
    modules = dict(deployed.named_modules())
    for name, layer in list(modules.items()):
        if not _binary_weights(layer):
            continue
        bn = modules[pairs[name]] if name in pairs else None
        if _binary_inputs(layer) and (isinstance(layer, QLinear) or layer.groups == 1):
            new = BinaryConv2d(layer, bn, isa) if isinstance(layer, QConv2d) else BinaryLinear(layer, bn, isa)
            info["xnor_layers"] += 1
        elif isinstance(layer, QConv2d) and layer.input_quantizer.bits == 32:
            new = _float_binary_conv(layer, bn)
            info["float_binary_weight_layers"] += 1
        else:
            continue
        _set_module(deployed, name, new)
        if bn is not None:
            _set_module(deployed, pairs[name], nn.Identity())
            info["folded_bn"] += 1
    deployed.deploy_info = info
    return deployed
