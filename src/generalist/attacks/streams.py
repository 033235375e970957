"""Per-point random streams: every random draw of an attack is a function of who asks for it.

A draw is named by (seed, attack, round, point, counter, slot): ``round`` is the restart or the
target class, ``point`` the point's *global* index in the evaluated set, ``counter`` the
iteration or query, ``slot`` the position inside that draw. The value is a hash of the name,
never the state of a generator shared by a batch, so a point gets the same draws whatever the
batch size, the order of the points, the number of processes the set is split over, or where
a killed run was resumed, and on the CPU and a GPU alike (integer arithmetic only, up to the
conversion to floats).

The hash is Wellons' ``lowbias32`` (two xor-shift-multiply rounds, full avalanche), evaluated in
int64 on values below 2³²: both multipliers are below 2³¹, so no product overflows.
"""

from __future__ import annotations

import math
import zlib

import torch

_MASK32 = 0xFFFFFFFF
_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)
_GOLDEN = 0x9E3779B9
"""Odd constant (2³²/φ) that spreads consecutive slots and counters over the hash's input."""


def _mix(h: torch.Tensor) -> torch.Tensor:
    """``lowbias32`` on int64 tensors holding values in [0, 2³²)."""
    h = h ^ (h >> 16)
    h = (h * _MULTIPLIERS[0]) & _MASK32
    h = h ^ (h >> 15)
    h = (h * _MULTIPLIERS[1]) & _MASK32
    return h ^ (h >> 15)


def stream_key(seed: int, attack: str, round_: int) -> int:
    """A 32-bit key for one (seed, attack, restart or target) — stable across Python runs."""
    return zlib.crc32(f"{seed}/{attack}/{round_}".encode())


def random_bits(key: int, points: torch.Tensor, counter: int, n: int) -> torch.Tensor:
    """[B, n] int64 hashes in [0, 2³²) for the points' global indices ``points`` [B]."""
    base = _mix((points.to(torch.int64) & _MASK32) ^ key)
    base = _mix(base ^ ((counter * _GOLDEN + key) & _MASK32))
    slots = torch.arange(n, device=points.device, dtype=torch.int64) * _GOLDEN & _MASK32
    return _mix(_mix((base.unsqueeze(1) + slots) & _MASK32) ^ key)


def uniform(key: int, points: torch.Tensor, counter: int, n: int) -> torch.Tensor:
    """[B, n] float32 uniform in [0, 1), on a grid of 2⁻²⁴ (exact in float32)."""
    return (random_bits(key, points, counter, n) >> 8).to(torch.float32) * 2.0**-24


def normal(key: int, points: torch.Tensor, counter: int, n: int) -> torch.Tensor:
    """[B, n] float32 standard normal draws (Box–Muller on two uniform streams)."""
    both = uniform(key, points, counter, 2 * n)
    radius = (-2.0 * torch.log1p(-both[:, :n])).sqrt()  # 1 - u is in (0, 1]: no log(0)
    return radius * torch.cos(2.0 * math.pi * both[:, n:])


def integers(
    key: int, points: torch.Tensor, counter: int, high: torch.Tensor | int
) -> torch.Tensor:
    """[B, k] int64 uniform in [0, high) for each of the k columns of ``high`` (or a scalar)."""
    high = torch.as_tensor(high, device=points.device, dtype=torch.int64)
    columns = 1 if high.dim() == 0 else high.shape[-1]
    bits = random_bits(key, points, counter, columns)
    return (bits * high) >> 32  # multiply-shift: bits·high < 2³²·2³¹, no overflow
