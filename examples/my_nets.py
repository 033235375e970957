"""A model of your own, in a module file: a run records ``my_nets:SmallNet`` and the file's
SHA-256, so ``generalist eval RUN`` (run from this folder, or with it on PYTHONPATH) rebuilds
it. Any ``nn.Module`` class or factory works; generalist passes the keyword arguments it
accepts of ``num_classes``, ``in_channels`` and ``image_size``."""

from __future__ import annotations

import torch
from torch import nn


class SmallNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
