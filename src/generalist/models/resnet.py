"""CIFAR-style ResNet-18 and pre-activation ResNets (3x3 stem, no max-pool).

Global average pooling is adaptive, so the same networks run on 32x32 CIFAR, 28x28 MNIST and 8x8
digits without changes. ``PreActResNet`` is general enough to also build the wide ResNets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from generalist.models.normalization import GlobalAvgPool
from generalist.models.registry import register_model


def _shortcut(cin: int, cout: int, stride: int, with_bn: bool) -> nn.Module:
    """Identity when shapes match, else a strided 1x1 projection."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    projection = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
    return nn.Sequential(projection, nn.BatchNorm2d(cout)) if with_bn else projection


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut, then ReLU (He et al. 2016a)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(cin, cout, stride, with_bn=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv plus shortcut (He et al. 2016b).

    When the shape changes the projection shortcut takes the pre-activated input, as in the
    PreAct-ResNet of Rice et al. and the TRADES/Madry wide ResNets.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(cin, cout, stride, with_bn=False)
        self.projects = not isinstance(self.shortcut, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu(self.bn1(x))
        residual = self.shortcut(activated) if self.projects else x
        out = self.conv1(activated)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + residual


def _stages(
    block: type[BasicBlock | PreActBlock],
    cin: int,
    widths: Sequence[int],
    blocks_per_stage: Sequence[int],
    strides: Sequence[int],
) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width, count, stride in zip(widths, blocks_per_stage, strides, strict=True):
        for index in range(count):
            layers.append(block(cin, width, stride if index == 0 else 1))
            cin = width
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """Post-activation ResNet with a 3x3 stem (CIFAR variant of He et al.)."""

    def __init__(self, blocks_per_stage: Sequence[int], num_classes: int, in_channels: int) -> None:
        super().__init__()
        widths = (64, 128, 256, 512)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        self.stages = _stages(BasicBlock, 64, widths, blocks_per_stage, (1, 2, 2, 2))
        self.pool = GlobalAvgPool()
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.stages(self.stem(x)))
        return self.classifier(torch.flatten(out, 1))


class PreActResNet(nn.Module):
    """Pre-activation ResNet: bare conv stem, pre-activation stages, final BN-ReLU-pool-linear."""

    def __init__(
        self,
        *,
        stem_width: int,
        widths: Sequence[int],
        blocks_per_stage: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        in_channels: int,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, stem_width, 3, padding=1, bias=False)
        self.stages = _stages(PreActBlock, stem_width, widths, blocks_per_stage, strides)
        self.final_bn = nn.BatchNorm2d(widths[-1])
        self.relu = nn.ReLU()
        self.pool = GlobalAvgPool()
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.final_bn(self.stages(self.stem(x))))
        return self.classifier(torch.flatten(self.pool(out), 1))


@register_model("resnet18")
def resnet18(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    del image_size  # adaptive pooling accepts any size
    return ResNet((2, 2, 2, 2), num_classes, in_channels)


@register_model("preact-resnet18")
def preact_resnet18(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    del image_size  # adaptive pooling accepts any size
    return PreActResNet(
        stem_width=64,
        widths=(64, 128, 256, 512),
        blocks_per_stage=(2, 2, 2, 2),
        strides=(1, 2, 2, 2),
        num_classes=num_classes,
        in_channels=in_channels,
    )
