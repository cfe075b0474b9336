"""VGG-Small for CIFAR (Zhang et al., LQ-Nets 2018; IR-Net's official code).

conv0 3->128 real; conv1..conv5 (128, 256, 256, 512, 512) quantized, a max-pool
after conv1, conv3 and conv5, each followed by BN + activation; real linear 8192->classes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers import HardtanhSign
from .base import ACTIVATIONS, QuantConfig, ZooModel


class VGGSmall(ZooModel):
    def __init__(self, q: QuantConfig, num_classes: int = 10, activation: str | None = None) -> None:
        super().__init__()
        act = activation or q.default_activation()
        if act not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        self.num_classes = num_classes
        self.stem = nn.Sequential(q.first_conv(3, 128, 3, 1, 1), nn.BatchNorm2d(128), ACTIVATIONS[act]())
        widths = [(128, 128, True), (128, 256, False), (256, 256, True), (256, 512, False), (512, 512, True)]
        stages: list[nn.Module] = []
        self.feature_info = []
        reduction = 1
        for i, (cin, cout, pool) in enumerate(widths, start=1):
            layers: list[nn.Module] = [q.conv(cin, cout, 3, 1, 1)]
            if pool:
                layers.append(nn.MaxPool2d(2, 2))
                reduction *= 2
            layers += [nn.BatchNorm2d(cout), ACTIVATIONS[act]()]
            stages.append(nn.Sequential(*layers))
            if pool:
                self.feature_info.append({"module": f"features.{i - 1}", "num_chs": cout, "reduction": reduction})
        self.features = nn.Sequential(*stages)
        self.num_features = 512 * 4 * 4
        self.fc = q.classifier(self.num_features, num_classes)
        for act, stage in zip([self.stem[-1]] + [stage[-1] for stage in stages[:-1]], stages, strict=True):
            if isinstance(act, HardtanhSign):  # computes the next stage's conv's sign fused
                act.feeds(stage[0])

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(self.stem(x))

    def forward_head(self, x: Tensor) -> Tensor:
        if not isinstance(x, torch.fx.Proxy) and x.shape[-2:] != (4, 4):
            raise ValueError(f"VGG-Small needs 32x32 inputs (4x4 before the classifier), got {tuple(x.shape[-2:])}")
        return self.fc(x.flatten(1))
