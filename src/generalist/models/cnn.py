"""Small convolutional networks: ``tiny-cnn`` for fast tests, ``small-cnn`` from TRADES,
``madry-mnist-cnn`` from Madry et al. (2018) and ``mnist-bn-cnn`` for CPU-sized experiments."""

from __future__ import annotations

import torch
from torch import nn

from generalist.errors import ConfigError
from generalist.models.normalization import GlobalAvgPool
from generalist.models.registry import register_model


class TinyCNN(nn.Module):
    """Two conv+BatchNorm layers and a linear head: seconds to train, yet it has BN buffers, so
    tests exercise the running-statistics handling (EMA, averaging, eval mode) of real models."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            GlobalAvgPool(),
        )
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _small_cnn_feature_size(image_size: int, padding: int) -> int:
    """Side of the last feature map: two (conv, conv, 2x2 max-pool) stages of 3x3 convolutions."""
    size = image_size
    for _ in range(2):
        size = (size - 2 * (2 - 2 * padding)) // 2
    return size


class SmallCNN(nn.Module):
    """TRADES' SmallCNN (conv32-conv32-pool-conv64-conv64-pool-fc200-fc200-fc), without dropout.

    TRADES uses unpadded convolutions on 28x28 MNIST (4x4 final maps); those would shrink an 8x8
    digits image to nothing, so small images get padded ("same") convolutions instead and the
    classifier's input size follows from ``image_size``.
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        padding = 0 if _small_cnn_feature_size(image_size, 0) >= 1 else 1
        side = _small_cnn_feature_size(image_size, padding)
        if side < 1:
            raise ConfigError(f"small-cnn needs images of at least 4x4 pixels; got {image_size}")

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=padding), nn.ReLU()]

        self.features = nn.Sequential(
            *conv(in_channels, 32),
            *conv(32, 32),
            nn.MaxPool2d(2),
            *conv(32, 64),
            *conv(64, 64),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * side * side, 200),
            nn.ReLU(),
            nn.Linear(200, 200),
            nn.ReLU(),
            nn.Linear(200, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class MadryMnistCNN(nn.Module):
    """Madry et al.'s MNIST network: conv32 5x5, 2x2 max-pool, conv64 5x5, 2x2 max-pool,
    fc1024, fc ("same" padding, ReLU, no BatchNorm): the model of the MNIST challenge and the
    PGD-AT paper, ~3.3 M parameters, most of them in the fc1024 layer."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        side = _pooled_side(image_size, "madry-mnist-cnn")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * side * side, 1024), nn.ReLU(), nn.Linear(1024, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class MnistBnCNN(nn.Module):
    """conv16-BN-pool, conv32-BN-pool, fc100, fc: ~1.2 M multiply-adds per 28x28 image.

    Made for the 2-core CPU experiments of RESULTS.md: ``small-cnn`` (no BatchNorm) costs ~4x
    more per image and PGD-AT at lr 0.01 sat at chance for the first ~100 steps affordable
    there; ``tiny-cnn`` global-average-pools a 14x14 map and reached ~33 % clean after 376
    steps of standard training. This one keeps the spatial layout at tiny-cnn's cost.
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        if side < 1:
            raise ConfigError(f"mnist-bn-cnn needs images of at least 4x4 pixels; got {image_size}")
        self.classifier = nn.Sequential(
            nn.Linear(32 * side * side, 100), nn.ReLU(), nn.Linear(100, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _pooled_side(image_size: int, name: str) -> int:
    """Side after two 2x2 max-pools that keep a partial window (28 -> 14 -> 7, 8 -> 4 -> 2)."""
    if image_size < 1:
        raise ConfigError(f"{name} needs a positive image size; got {image_size}")
    return -(-image_size // 4)


@register_model("tiny-cnn")
def tiny_cnn(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    del image_size  # global average pooling accepts any size
    return TinyCNN(num_classes, in_channels)


@register_model("small-cnn")
def small_cnn(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return SmallCNN(num_classes, in_channels, image_size)


@register_model("madry-mnist-cnn")
def madry_mnist_cnn(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return MadryMnistCNN(num_classes, in_channels, image_size)


@register_model("mnist-bn-cnn")
def mnist_bn_cnn(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return MnistBnCNN(num_classes, in_channels, image_size)
