"""Quantize any torchvision or timm model by swapping its convs and linears."""

from __future__ import annotations

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
