"""Running a model for its predictions: the one eval-mode switch and the one "correct?" test.

Training attacks, the per-epoch accuracy check and the robustness suite all craft or score
examples in eval mode (BatchNorm uses its running statistics, as in the official code) and must
hand the model back in the mode the caller had set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(model: nn.Module, *, freeze: bool = False) -> Iterator[nn.Module]:
    """Eval mode, restored afterwards; ``freeze`` also turns off the weights' gradients (an
    evaluation attack needs gradients only for its input)."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()] if freeze else []
    model.eval()
    for param in model.parameters() if freeze else ():
        param.requires_grad_(False)
    try:
        yield model
    finally:
        for param, flag in zip(model.parameters() if freeze else (), flags, strict=True):
            param.requires_grad_(flag)
        model.train(was_training)


@torch.no_grad()
def predicts_correctly(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example: is the model's top class the label?"""
    return model(x).argmax(dim=1) == y
