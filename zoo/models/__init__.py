"""Zoo architectures, registered by name (one builder per architecture, timm style)."""

from __future__ import annotations

from ..registry import register_arch
from .base import QuantConfig, ZooModel
from .resnet import ResNet, bireal_resnet, cifar_resnet_basic, cifar_resnet_he, cifar_resnet_ir
from .vgg import VGGSmall

for _depth in (20, 32, 44, 56):
    register_arch(f"resnet{_depth}", dataset="cifar10")(
        lambda q, num_classes=10, _d=_depth, **kw: cifar_resnet_ir(q, _d, num_classes, **kw)
    )
    register_arch(f"resnet{_depth}_he", dataset="cifar10")(
        lambda q, num_classes=10, _d=_depth, **kw: cifar_resnet_he(q, _d, num_classes, **kw)
    )


@register_arch("resnet18", dataset="cifar10")
def resnet18(q: QuantConfig, num_classes: int = 10, **kwargs) -> ResNet:
    return cifar_resnet_basic(q, [2, 2, 2, 2], num_classes, **kwargs)


@register_arch("resnet34", dataset="cifar10")
def resnet34(q: QuantConfig, num_classes: int = 10, **kwargs) -> ResNet:
    return cifar_resnet_basic(q, [3, 4, 6, 3], num_classes, **kwargs)


@register_arch("vgg_small", dataset="cifar10")
def vgg_small(q: QuantConfig, num_classes: int = 10, **kwargs) -> VGGSmall:
    return VGGSmall(q, num_classes, **kwargs)


@register_arch("bireal_resnet18", dataset="imagenet", input_size=(3, 224, 224))
def bireal_resnet18(q: QuantConfig, num_classes: int = 1000, **kwargs) -> ResNet:
    return bireal_resnet(q, [2, 2, 2, 2], num_classes, **kwargs)


@register_arch("bireal_resnet34", dataset="imagenet", input_size=(3, 224, 224))
def bireal_resnet34(q: QuantConfig, num_classes: int = 1000, **kwargs) -> ResNet:
    return bireal_resnet(q, [3, 4, 6, 3], num_classes, **kwargs)


__all__ = ["QuantConfig", "ResNet", "VGGSmall", "ZooModel"]
