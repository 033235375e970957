"""Random crop and flip applied to a whole batch on its own device, without per-example loops.

Augmenting on the GPU keeps the training loop free of loader processes: a batch is an index into
the in-memory dataset, one cast, and this call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class BatchAugment:
    """Zero-padded random crop (``crop_padding`` pixels each side) and p=0.5 horizontal flip.

    Random numbers are drawn on ``generator``'s device and moved to the batch's device, so a CPU
    generator drives a CUDA batch reproducibly (and vice versa); without a generator the global
    RNG of the batch's device is used. Identity when both augmentations are off.
    """

    def __init__(self, crop_padding: int = 0, flip: bool = False) -> None:
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.crop_padding = crop_padding
        self.flip = flip

    def __repr__(self) -> str:
        return f"BatchAugment(crop_padding={self.crop_padding}, flip={self.flip})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.crop_padding:
            x = self._crop(x, generator)
        if self.flip:
            flip = _randint(2, (len(x),), generator, x.device).bool()
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x

    def _crop(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.crop_padding
        padded = F.pad(x, (p, p, p, p))
        top, left = _randint(2 * p + 1, (2, n), generator, x.device)
        rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        channel = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[batch, channel, rows, cols]


def _randint(
    high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    source = generator.device if generator is not None else device
    return torch.randint(high, shape, generator=generator, device=source).to(device)
