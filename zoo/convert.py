"""Quantize any torchvision or timm model by swapping its convs and linears."""

from __future__ import annotations

from difflib import get_close_matches

from torch import nn

from .layers import QConv2d, QLinear
from .quant import QuantizerSpec, make_quantizer


def quantize(
    model: nn.Module,
    weight_bits: int = 1,
    act_bits: int = 1,
    weight: QuantizerSpec = None,
    act: QuantizerSpec = None,
    keep_first_last: bool = True,
) -> nn.Module:
    """Replace every ``nn.Conv2d``/``nn.Linear`` of ``model`` (in place) by a QConv2d/QLinear.

    ``weight``/``act`` are quantizer specs (default: IMB/sign+DTE for 1 bit, LSQ
    for k bits). With ``keep_first_last`` the first conv and the last linear
    (in module order) stay real, as in nearly every binary/low-bit paper.
    Weights are copied, so a pretrained float model is a good start for QAT.
    Returns ``model``.
    """
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, (QConv2d, QLinear))
    ]
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d or nn.Linear to quantize")
    keep = set()
    if keep_first_last:
        convs = [n for n, m in found if isinstance(m, nn.Conv2d)]
        linears = [n for n, m in found if isinstance(m, nn.Linear)]
        keep = {convs[0]} if convs else set()
        keep |= {linears[-1]} if linears else set()
    for name, module in found:
        if name in keep:
            continue
        if isinstance(module, nn.Conv2d):
            wq = make_quantizer(weight, weight_bits, "weight", module.out_channels)
            aq = make_quantizer(act, act_bits, "act", module.in_channels)
            new: nn.Module = QConv2d.from_float(module, wq, aq)
        else:
            wq = make_quantizer(weight, weight_bits, "weight", module.out_features)
            aq = make_quantizer(act, act_bits, "act", module.in_features)
            new = QLinear.from_float(module, wq, aq)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model


def torchvision_model(
    builder: str,
    num_classes: int = 1000,
    weight_bits: int = 32,
    act_bits: int = 32,
    weight: QuantizerSpec = None,
    act: QuantizerSpec = None,
    weights: str | None = None,
    keep_first_last: bool = True,
) -> nn.Module:
    """``torchvision.models.<builder>(weights=weights)`` passed through :func:`quantize` unless both
    bit-widths are 32 (e.g. ``torchvision_model("mobilenet_v2", weight_bits=4, act_bits=4,
    weights="IMAGENET1K_V2")``); torchvision downloads pretrained weights on first use."""
    import torchvision

    if builder not in torchvision.models.list_models():
        close = get_close_matches(builder, torchvision.models.list_models(), n=3)
        raise ValueError(f"torchvision has no model {builder!r}; close: {close}")
    model = torchvision.models.get_model(builder, weights=weights, **({} if weights else {"num_classes": num_classes}))
    if weights and num_classes != 1000:
        raise ValueError(f"pretrained torchvision weights have 1000 classes, got num_classes={num_classes}")
    if weight_bits == 32 and act_bits == 32:
        return model
    return quantize(model, weight_bits, act_bits, weight, act, keep_first_last)


def build_model(
    name: str,
    num_classes: int,
    weight_quantizer: QuantizerSpec = None,
    act_quantizer: QuantizerSpec = None,
    **kwargs,
) -> nn.Module:
    """A zoo name (``resnet20_w1a1``, :func:`zoo.create_model`) or ``torchvision:<builder>``
    (:func:`torchvision_model`; ``kwargs`` give ``weight_bits``, ``act_bits``, ``weights``)."""
    if name.startswith("torchvision:"):
        return torchvision_model(
            name.removeprefix("torchvision:"), num_classes, weight=weight_quantizer, act=act_quantizer, **kwargs
        )
    from .registry import create_model

    return create_model(name, num_classes, weight_quantizer=weight_quantizer, act_quantizer=act_quantizer, **kwargs)
