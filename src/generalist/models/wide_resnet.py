"""Wide ResNets (Zagoruyko & Komodakis), pre-activation, as used by TRADES and Generalist.

``wrn-DEPTH-WIDTH`` has (DEPTH-4)/6 blocks per stage and stage widths 16·WIDTH, 32·WIDTH,
64·WIDTH. ``wrn-32-10`` is the name the official Generalist code gives its network, which has
5 blocks per stage: it is the same topology as ``wrn-34-10`` under the standard formula.
"""

from __future__ import annotations

import re

from torch import nn

from generalist.errors import cut
from generalist.models.registry import register_model, register_model_pattern
from generalist.models.resnet import PreActResNet


def _init_weights(model: nn.Module) -> None:
    """The TRADES/Madry initialisation: He-normal (fan-out) convs, unit BN, zero linear bias."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)


def wide_resnet(
    blocks_per_stage: int, widen_factor: int, *, num_classes: int, in_channels: int
) -> PreActResNet:
    model = PreActResNet(
        stem_width=16,
        widths=(16 * widen_factor, 32 * widen_factor, 64 * widen_factor),
        blocks_per_stage=(blocks_per_stage,) * 3,
        strides=(1, 2, 2),
        num_classes=num_classes,
        in_channels=in_channels,
    )
    _init_weights(model)
    return model


MAX_WRN_DEPTH = 1000
MAX_WRN_WIDTH = 100
"""Far beyond any published WRN (RobustBench's largest are WRN-106-16 and WRN-70-16); a
larger name is a typo, and a 5000-digit depth would otherwise reach ``int()`` and allocation."""


def _wrn_problem(match: re.Match[str]) -> str | None:
    """Why ``wrn-DEPTH-WIDTH`` names no network, or None (see ``register_model_pattern``)."""
    depth_text, width_text = match.group(1), match.group(2)
    rule = (
        f"WRN depth must be 10, 16, 22, 28, 34, ... ((DEPTH-4) divisible by 6, at most "
        f"{MAX_WRN_DEPTH}) and width 1 to {MAX_WRN_WIDTH}, e.g. wrn-28-10 or wrn-34-10"
    )
    if len(depth_text) > 4 or len(width_text) > 4:  # before int(): no 5000-digit parse
        return f"{cut(match.group(0))}: {rule}"
    depth, width = int(depth_text), int(width_text)
    if not 10 <= depth <= MAX_WRN_DEPTH or (depth - 4) % 6 != 0 or not 1 <= width <= MAX_WRN_WIDTH:
        return f"{match.group(0)}: {rule}"
    return None


@register_model_pattern(
    r"wrn-(\d+)-(\d+)", "wrn-DEPTH-WIDTH with (DEPTH-4) divisible by 6", check=_wrn_problem
)
def wide_resnet_from_name(
    match: re.Match[str], *, num_classes: int, in_channels: int, image_size: int
) -> nn.Module:
    del image_size  # adaptive pooling accepts any size
    depth, width = int(match.group(1)), int(match.group(2))  # checked by _wrn_problem
    return wide_resnet((depth - 4) // 6, width, num_classes=num_classes, in_channels=in_channels)


@register_model("wrn-28-10")
def wrn_28_10(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    del image_size  # adaptive pooling accepts any size
    return wide_resnet(4, 10, num_classes=num_classes, in_channels=in_channels)


# wrn-32-10 is not a second network: the official Generalist code calls WRN-34-10 that.
@register_model("wrn-32-10")
@register_model("wrn-34-10")
def wrn_34_10(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The TRADES / RobustBench WRN-34-10 (46.16M parameters for 10 classes), also under the
    official Generalist code's name ``wrn-32-10``: 5 blocks per stage, width 10."""
    del image_size  # adaptive pooling accepts any size
    return wide_resnet(5, 10, num_classes=num_classes, in_channels=in_channels)
