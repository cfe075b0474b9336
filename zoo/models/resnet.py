"""ResNets for binary and low-bit networks.

* CIFAR ResNet-20/32/44/56, IR-Net structure (Qin et al., CVPR 2020, official
  code): a shortcut around *every* quantized conv,
  ``out = act(BN(conv1(x)) + shortcut(x)); out = act(BN(conv2(out)) + out)``,
  option-A (subsample + zero-pad) shortcuts, real stem, head BN1d + real linear.
* CIFAR ResNet-20/32/44/56 in He et al.'s structure (CVPR 2016, section 4.2),
  ``resnet20_he`` etc.: a shortcut around every *pair* of convs (BasicBlock),
  option-A shortcuts, no head BN. Not a binary structure; a float teacher
  for logit KD (the IR-Net structure's float model trains slower, docs/training.md).
* CIFAR ResNet-18/34: standard BasicBlock (He et al. 2016) with real 1x1
  downsample convs, stem 3x3 / 64 channels, no max-pool.
* ImageNet ResNet-18/34 in the Bi-Real structure (Liu et al., ECCV 2018):
  the same shortcut around every conv, downsample = avg-pool + real 1x1 conv,
  real 7x7 stem and fc.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from ..layers import GlobalAvgPool2d, HardtanhSign
from .base import ACTIVATIONS, QuantConfig, ZooModel


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut (He et al. 2016, option A): subsample by 2, zero-pad channels.

    The subsampling ``x[:, :, ::2, ::2]`` is a 1x1 average pool with stride 2 (the same values),
    whose gradient keeps a channels_last layout; the slice's gradient comes back NCHW."""

    def __init__(self, pad_channels: int) -> None:
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(F.avg_pool2d(x, 1, 2), (0, 0, 0, 0, self.pad_channels, self.pad_channels))


def downsample_shortcut(q: QuantConfig, kind: str, in_planes: int, planes: int, stride: int) -> nn.Module:
    """The shortcut of a block that changes resolution or width: ``"A"`` option A (He et al. 2016),
    ``"B"`` a real strided 1x1 conv + BN, ``"avg"`` average pool, then a real 1x1 conv + BN (Bi-Real)."""
    if kind == "A":
        return OptionAShortcut((planes - in_planes) // 2)
    if kind == "B":
        return nn.Sequential(q.real_conv(in_planes, planes, 1, stride), nn.BatchNorm2d(planes))
    if kind == "avg":
        return nn.Sequential(
            nn.AvgPool2d(stride) if stride != 1 else nn.Identity(),
            q.real_conv(in_planes, planes, 1),
            nn.BatchNorm2d(planes),
        )
    raise ValueError(f"downsample must be 'A', 'B' or 'avg', got {kind!r}")


class _TwoConvBlock(nn.Module):
    """Two quantized 3x3 convs with BN and activations; subclasses add the shortcut and the wiring."""

    def __init__(self, q: QuantConfig, in_planes: int, planes: int, stride: int, act: str) -> None:
        super().__init__()
        self.conv1 = q.conv(in_planes, planes, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = q.conv(planes, planes, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act1 = ACTIVATIONS[act]()
        self.act2 = ACTIVATIONS[act]()
        self.shortcut: nn.Module = nn.Identity()


class DoubleShortcutBlock(_TwoConvBlock):
    """Each quantized conv with its own shortcut (IR-Net / Bi-Real)."""

    def __init__(self, q: QuantConfig, in_planes: int, planes: int, stride: int, act: str, downsample: str) -> None:
        super().__init__(q, in_planes, planes, stride, act)
        if stride != 1 or in_planes != planes:
            self.shortcut = downsample_shortcut(q, downsample, in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)) + self.shortcut(x))
        return self.act2(self.bn2(self.conv2(out)) + out)


class BasicBlock(_TwoConvBlock):
    """Standard ResNet BasicBlock (He et al. 2016): two convs inside one shortcut."""

    def __init__(
        self, q: QuantConfig, in_planes: int, planes: int, stride: int, act: str, downsample: str = "B"
    ) -> None:
        super().__init__(q, in_planes, planes, stride, act)
        if stride != 1 or in_planes != planes:
            self.shortcut = downsample_shortcut(q, downsample, in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(ZooModel):
    """A ResNet made of stages of ``block``; stage outputs are ``layer1..layerN``."""

    def __init__(
        self,
        q: QuantConfig,
        block: type[nn.Module],
        depths: list[int],
        widths: list[int],
        num_classes: int = 10,
        activation: str | None = None,
        stem: str = "cifar",
        downsample: str = "A",
        head_bn: bool = False,
    ) -> None:
        super().__init__()
        act = activation or q.default_activation()
        if act not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        self.num_classes = num_classes
        if stem == "cifar":
            self.stem = nn.Sequential(
                q.first_conv(3, widths[0], 3, 1, 1), nn.BatchNorm2d(widths[0]), ACTIVATIONS[act]()
            )
            reduction = 1
        else:
            self.stem = nn.Sequential(
                q.first_conv(3, widths[0], 7, 2, 3),
                nn.BatchNorm2d(widths[0]),
                ACTIVATIONS[act](),
                nn.MaxPool2d(3, 2, 1),
            )
            reduction = 4
        in_planes = widths[0]
        self.feature_info = []
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(depth):
                blocks.append(block(q, in_planes, width, stride if j == 0 else 1, act, downsample))
                in_planes = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            reduction *= stride
            self.feature_info.append({"module": f"layer{i + 1}", "num_chs": width, "reduction": reduction})
        self.num_stages = len(depths)
        self.num_features = in_planes
        self.pool = GlobalAvgPool2d()
        self.head_bn = nn.BatchNorm1d(in_planes) if head_bn else nn.Identity()
        self.fc = q.classifier(in_planes, num_classes)
        self.feature_info.append({"module": "head_bn", "num_chs": in_planes, "reduction": None})
        self._link_activations(self.stem[-1] if stem == "cifar" else None)
        self._init_weights()

    def _link_activations(self, first: nn.Module | None) -> None:
        """Tell each hardtanh which conv takes its output, so it can compute that conv's sign
        fused (:class:`HardtanhSign`): a block's ``act1`` feeds its ``conv2``, its ``act2`` the next
        block's ``conv1``, the CIFAR stem's activation the first block's ``conv1``."""
        previous = first
        for i in range(self.num_stages):
            for block in getattr(self, f"layer{i + 1}"):
                for act, conv in ((previous, block.conv1), (block.act1, block.conv2)):
                    if isinstance(act, HardtanhSign):
                        act.feeds(conv)
                previous = block.act2

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.head_bn(self.pool(x).flatten(1)))


def _cifar_blocks_per_stage(depth: int) -> int:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    return (depth - 2) // 6


def cifar_resnet_ir(q: QuantConfig, depth: int, num_classes: int = 10, **kwargs) -> ResNet:
    """IR-Net CIFAR ResNet-``depth`` (depth = 6n + 2)."""
    n = _cifar_blocks_per_stage(depth)
    return ResNet(q, DoubleShortcutBlock, [n] * 3, [16, 32, 64], num_classes, downsample="A", head_bn=True, **kwargs)


def cifar_resnet_he(q: QuantConfig, depth: int, num_classes: int = 10, **kwargs) -> ResNet:
    """He et al. (2016) CIFAR ResNet-``depth``: BasicBlocks with option-A shortcuts, no head BN."""
    n = _cifar_blocks_per_stage(depth)
    return ResNet(q, BasicBlock, [n] * 3, [16, 32, 64], num_classes, downsample="A", **kwargs)


def cifar_resnet_basic(q: QuantConfig, depths: list[int], num_classes: int = 10, **kwargs) -> ResNet:
    """CIFAR ResNet-18/34: BasicBlocks, widths 64..512, real 1x1 downsample."""
    return ResNet(q, BasicBlock, depths, [64, 128, 256, 512], num_classes, downsample="B", **kwargs)


def bireal_resnet(q: QuantConfig, depths: list[int], num_classes: int = 1000, **kwargs) -> ResNet:
    """ImageNet ResNet in the Bi-Real structure (two units per block, each with a shortcut)."""
    return ResNet(
        q, DoubleShortcutBlock, depths, [64, 128, 256, 512], num_classes, stem="imagenet", downsample="avg", **kwargs
    )
