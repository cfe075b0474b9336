"""Zoo models inside timm: ``import zoo.timm_models`` (automatic when timm was imported before zoo)
registers every zoo name, so ``timm.list_models("*w1a1*")`` lists them and
``timm.create_model("resnet20_fp", pretrained=True)`` returns what ``zoo.load`` returns, with
timm's ``pretrained_cfg`` (mean, std, input size, classes) taken from the model card."""

from __future__ import annotations

import sys
from typing import Any

from timm.models import is_model, register_model
from torch import nn

from .data import DATASETS
from .registry import _ARCHS, ArchInfo, list_models, load, parse_name, resolve_card

REGISTERED: list[str] = []


def pretrained_cfg(name: str, model: nn.Module) -> dict[str, Any]:
    """timm's data config for a zoo model: from its card when there is one, else its dataset's defaults."""
    arch: ArchInfo = _ARCHS[parse_name(name).arch]
    info = DATASETS.get(arch.dataset, DATASETS["cifar10"])
    card = getattr(model, "model_card", None) or {}
    return {
        "architecture": parse_name(name).base,
        "mean": tuple(card.get("mean", info["mean"])),
        "std": tuple(card.get("std", info["std"])),
        "input_size": tuple(card.get("input_size", arch.input_size)),
        "num_classes": model.num_classes,
        "crop_pct": 1.0 if arch.input_size[-1] <= 64 else 0.875,
        "interpolation": "bilinear",
        "first_conv": "stem.0",
        "classifier": "fc",
    }


def _entry(name: str):
    def build(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        if pretrained:
            model = load(name)
        else:
            from .registry import create_model

            model = create_model(name, **kwargs)
        model.pretrained_cfg = model.default_cfg = pretrained_cfg(name, model)
        return model

    build.__name__ = name
    build.__module__ = __name__
    build.__doc__ = f"zoo model {name} (see zoo.create_model / zoo.load)"
    return build


def register() -> list[str]:
    """Register every untagged zoo name that timm does not already have."""
    for name in list_models():
        if "." in name or name in REGISTERED or is_model(name):
            continue
        setattr(sys.modules[__name__], name, register_model(_entry(name)))
        REGISTERED.append(name)
    return REGISTERED


register()
__all__ = ["pretrained_cfg", "register", "resolve_card"]
