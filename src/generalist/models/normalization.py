"""Per-channel input normalisation that lives *inside* the model.

Attacks, augmentation and ε-balls are all defined on images in [0,1]. Folding ``(x - mean) / std``
into the network means every caller feeds raw pixels and no code path can forget (or repeat) the
normalisation; the statistics are persistent buffers so they travel with the weights.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from generalist.errors import ConfigError, cut


def _channel_stats(values: Sequence[float], what: str) -> torch.Tensor:
    try:
        stats = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(
            f"{what} must be a list of numbers, one per channel; got {cut(values)}"
        ) from None
    if not stats or not all(math.isfinite(v) for v in stats):
        raise ConfigError(f"{what} must be a non-empty list of finite numbers; got {cut(values)}")
    return torch.tensor(stats, dtype=torch.float32).view(1, -1, 1, 1)


class InputNormalization(nn.Module):
    """Computes ``(x - mean) / std`` per channel, for inputs in [0,1] pixel space."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = _channel_stats(mean, "mean")
        std_t = _channel_stats(std, "std")
        if mean_t.numel() != std_t.numel():
            raise ConfigError(
                f"mean has {mean_t.numel()} values but std has {std_t.numel()}; "
                "give one value per channel"
            )
        if any(float(v) <= 0 for v in std):  # plain floats: also right on the meta device
            raise ConfigError(f"std must be positive in every channel; got {cut(list(std))}")
        self.register_buffer("mean", mean_t, persistent=True)
        self.register_buffer("std", std_t, persistent=True)

    @property
    def num_channels(self) -> int:
        return self.mean.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class NormalizedModel(nn.Sequential):
    """``net(normalize(x))``: a network that accepts [0,1] pixels.

    A ``Sequential`` so it indexes like one (``model[0]`` is the normalisation), with named
    children so code can say ``model.normalize`` / ``model.net`` instead.
    """

    normalize: InputNormalization
    net: nn.Module

    def __init__(self, normalize: InputNormalization, net: nn.Module) -> None:
        super().__init__(OrderedDict(normalize=normalize, net=net))


class GlobalAvgPool(nn.Module):
    """The mean over the spatial dimensions, kept as [B, C, 1, 1] (``AdaptiveAvgPool2d(1)``).

    Written as a plain mean because ``AdaptiveAvgPool2d``'s backward has no deterministic CUDA
    kernel: with ``deterministic: true`` PyTorch raises in it, while a mean's backward is an
    exact broadcast. No parameters or buffers, so saved weights are unaffected.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1), keepdim=True)
