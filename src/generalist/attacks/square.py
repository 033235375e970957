"""Square Attack (Andriushchenko et al., ECCV 2020): score-based random search, as in AutoAttack.

It only reads the model's logits, never its gradients, so it is the AutoAttack member that still
works when gradients are masked. Each query proposes changing the perturbation inside one random
square window and keeps the proposal if the margin ``f_y - max_{k≠y} f_k`` decreased. The window
covers a fraction ``p`` of the image that halves at fixed query counts (10, 50, 200, 500, 1000,
2000, 4000, 6000, 8000), starting from ``p_init``.

ℓ∞: start from vertical stripes of ±ε; a proposal sets the window, per channel, to ±ε.
ℓ2: start from a grid of "meta" patterns (two opposite-signed blobs that peak in the middle);
a proposal moves the ℓ2 mass of a second random window into the first one, reshaped into a new
meta pattern, and rescales the whole perturbation to norm ε.

Each example gets at most ``n_queries`` proposals after its initial point and stops at its
first misclassified point; the attack returns that point, or the clean image if none was found.
Every random draw (initial point, window positions, signs) comes from the point's own stream
(see :mod:`generalist.attacks.streams`), so its search does not depend on its batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from generalist.attacks import streams
from generalist.attacks.base import fast_layout, point_indices, require_counts
from generalist.attacks.threat import ThreatModel, cumsum
from generalist.errors import ConfigError

VERSION = "2"
HALVING_QUERIES = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
"""Query counts after which the window fraction ``p`` halves (the paper's 10 000-query schedule)."""
GPU_COMPACT_EVERY = 32
"""On a GPU, fooled examples leave the searched batch every this many queries (one host sync
each time) rather than at every query; meanwhile they ride along, frozen."""


def window_fraction(p_init: float, query: int, n_queries: int, rescale: bool) -> float:
    """Fraction of the image a square covers at this (0-based) query.

    AutoAttack's standard evaluation (``rescale=False``) uses the schedule as is, so with 5000
    queries ``p`` never drops below ``p_init/128``; the Square paper's own code stretches it
    over ``n_queries`` (``rescale=True``).
    """
    if rescale:
        query = int(query / n_queries * 10000)
    return p_init / 2 ** sum(query > q for q in HALVING_QUERIES)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``f_y - max_{k≠y} f_k`` per example: negative once the example is misclassified."""
    logits = logits.float()
    true = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    other = logits.scatter(1, y.unsqueeze(1), -math.inf).amax(dim=1)
    return true - other


def _signs(bits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """±1 in ``like``'s dtype from draws in {0, 1}."""
    return (2 * bits - 1).to(like.dtype)


def _windows(
    top: torch.Tensor, left: torch.Tensor, size: int, like: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Index tuple selecting the ``size``×``size`` window at (``top``, ``left``) [n] per
    example, on every channel: ``t[index]`` has shape [n, C, size, size] for ``t`` [n, C, H, W].
    """
    n, device = len(top), like.device
    offsets = torch.arange(size, device=device)
    rows = (top.unsqueeze(1) + offsets).view(n, 1, size, 1)
    cols = (left.unsqueeze(1) + offsets).view(n, 1, 1, size)
    batch = torch.arange(n, device=device).view(n, 1, 1, 1)
    channels = torch.arange(like.shape[1], device=device).view(1, -1, 1, 1)
    return batch, channels, rows, cols


def _centre_peaked_block(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """Concentric rectangles around the block's centre: a pixel at Chebyshev distance k from
    the centre gets Σ_{j ≥ k} 1/(j+1)², so the mass is concentrated in the middle."""
    depth = max(rows // 2, cols // 2) + 1
    weights = 1.0 / torch.arange(1, depth + 1, device=like.device, dtype=like.dtype).square()
    tail = cumsum(weights.flip(0), dim=0).flip(0)
    dist_rows = (torch.arange(rows, device=like.device) - rows // 2).abs()
    dist_cols = (torch.arange(cols, device=like.device) - cols // 2).abs()
    block = tail[torch.maximum(dist_rows.unsqueeze(1), dist_cols.unsqueeze(0))]
    return block / block.norm().clamp_min(1e-12)


def _meta_patterns(size: int, transposed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[n, 1, size, size] unit-ℓ2 patterns: a positive blob above a negative one, transposed
    where ``transposed`` [n] is set (the ℓ2 building block of the Square attack)."""
    upper = _centre_peaked_block(size // 2, size, like)
    lower = _centre_peaked_block(size - size // 2, size, like)
    pattern = torch.cat([upper, -lower], dim=0)
    pattern = pattern / pattern.norm().clamp_min(1e-12)
    return torch.where(transposed.view(-1, 1, 1, 1) == 1, pattern.T, pattern)


def _compact_every(device: torch.device) -> int:
    """Queries between two looks for fooled examples (see :meth:`Square._search`)."""
    return 1 if device.type == "cpu" else GPU_COMPACT_EVERY


def _per_channel_norm(t: torch.Tensor) -> torch.Tensor:
    return t.square().sum(dim=(-2, -1), keepdim=True).sqrt()


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


class Square:
    """Square Attack as an attack object: ``Square("Linf:8/255")(model, x, y) -> x_adv``."""

    name = "square"

    def __init__(
        self,
        threat: ThreatModel | str,
        *,
        n_queries: int = 5000,
        p_init: float = 0.8,
        n_restarts: int = 1,
        seed: int = 0,
        rescale_schedule: bool = False,
    ) -> None:
        self.threat = ThreatModel.parse(threat)
        if self.threat.norm == "L1":
            raise ConfigError("square for L1 is not implemented; use it with Linf or L2")
        require_counts("square", n_queries=n_queries, n_restarts=n_restarts)
        if not 0 < p_init <= 1:
            raise ConfigError(f"square p_init must be in (0, 1], got {p_init}")
        self.n_queries = n_queries
        self.p_init = p_init
        self.n_restarts = n_restarts
        self.seed = seed
        self.rescale_schedule = rescale_schedule

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": VERSION,
            "threat": str(self.threat),
            "n_queries": self.n_queries,
            "p_init": self.p_init,
            "n_restarts": self.n_restarts,
            "seed": self.seed,
            "rescale_schedule": self.rescale_schedule,
        }

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.dim() != 4:
            raise ConfigError(f"square needs images shaped [B, C, H, W], got {tuple(x.shape)}")
        x, y = fast_layout(x.detach()), y.detach()
        points = point_indices(indices, len(x), x.device)
        x_adv = x.clone()
        # Forward passes only: inference mode skips autograd's bookkeeping entirely.
        with torch.inference_mode():
            robust = model(x).argmax(dim=1) == y
            for restart in range(self.n_restarts):
                idx = robust.nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                key = streams.stream_key(self.seed, self.name, restart)
                found, fooled = self._search(model, x[idx], y[idx], key, points[idx])
                x_adv[idx[fooled]] = found[fooled]
                robust[idx[fooled]] = False
        # A normal tensor again (usable outside inference mode), in the caller's layout.
        return x_adv.contiguous()

    def _search(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, key: int, points: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One random search: the best point per example and whether it is misclassified.

        Query ``q`` of a point draws from its own stream (``key``, its global index, ``q``), so
        the search of a point does not depend on the others in the batch. The examples still
        searched live packed in their own tensors, re-gathered only when some of them are
        fooled, not at every query: thousands of queries on a few hundred images make the
        per-query bookkeeping, not just the model, count. A fooled example is frozen at once
        (``done``); the host looks for frozen ones, and drops them from the batch, every query
        on a CPU, where that look is free, and every :data:`GPU_COMPACT_EVERY` queries on a
        GPU, where it would stall the device.
        """
        best = self._initial_point(x, key, points)
        logits = model(best)
        best_margin = margin(logits, y)
        fooled = logits.argmax(dim=1) != y
        propose = self._propose_linf if self.threat.norm == "Linf" else self._propose_l2
        compact_every = _compact_every(x.device)
        active = (~fooled).nonzero().squeeze(1)
        x_act, y_act, best_act, margin_act = x[active], y[active], best[active], best_margin[active]
        points_act = points[active]
        done = torch.zeros_like(y_act, dtype=torch.bool)
        for query in range(self.n_queries):
            if active.numel() == 0:
                break
            p = window_fraction(self.p_init, query, self.n_queries, self.rescale_schedule)
            candidate = propose(x_act, best_act, p, key, points_act, query + 1)
            logits = model(candidate)
            cand_margin = margin(logits, y_act)
            cand_fooled = (logits.argmax(dim=1) != y_act) & ~done
            accept = cand_fooled | ((cand_margin < margin_act) & ~done)
            best_act = torch.where(accept.view(-1, 1, 1, 1), candidate, best_act)
            margin_act = torch.where(accept, cand_margin, margin_act)
            done = done | cand_fooled
            if (query + 1) % compact_every == 0 and done.any():
                best[active] = best_act
                fooled[active[done]] = True
                searching = ~done
                active, x_act, y_act = active[searching], x_act[searching], y_act[searching]
                best_act, margin_act = best_act[searching], margin_act[searching]
                points_act, done = points_act[searching], done[searching]
        best[active] = best_act
        fooled[active] |= done
        return best, fooled

    def _initial_point(self, x: torch.Tensor, key: int, points: torch.Tensor) -> torch.Tensor:
        """Query 0 of every point's stream: ℓ∞ stripes, or an ℓ2 grid of meta patterns."""
        n, channels, height, width = x.shape
        eps = self.threat.eps
        if self.threat.norm == "Linf":
            bits = streams.integers(key, points, 0, torch.full((channels * width,), 2))
            return self.threat.clip(x, x + eps * _signs(bits.view(n, channels, 1, width), x))
        # A grid of meta patterns, one tile per fifth of the image, each with random signs.
        tile = max(min(height, width) // 5, 1)
        tops = [max((height - 5 * tile) // 2, 0) + k * tile for k in range(height // tile)]
        lefts = [max((width - 5 * tile) // 2, 0) + k * tile for k in range(width // tile)]
        n_tiles = len(tops) * len(lefts)
        bits = streams.integers(key, points, 0, torch.full((n_tiles * (1 + channels),), 2))
        bits = bits.view(n, n_tiles, 1 + channels)
        delta = torch.zeros_like(x)
        for k, (top, left) in enumerate((t, l) for t in tops for l in lefts):
            pattern = _meta_patterns(tile, bits[:, k, 0], x)
            signed = pattern * _signs(bits[:, k, 1:].view(n, channels, 1, 1), x)
            block = delta[:, :, top : top + tile, left : left + tile]
            block += signed[:, :, : block.shape[2], : block.shape[3]]
        unit = delta / _per_example_norm(delta).clamp_min(1e-12)
        return self.threat.clip(x, x + eps * unit)

    def _propose_linf(
        self,
        x: torch.Tensor,
        best: torch.Tensor,
        p: float,
        key: int,
        points: torch.Tensor,
        counter: int,
    ) -> torch.Tensor:
        """Set one random window, per channel, to +ε or -ε (adding ±2ε and projecting does it).

        Only the window is projected: ``best`` is feasible already and the ℓ∞ projection
        leaves a feasible point unchanged, bit for bit, so projecting the whole image (three
        full-size passes per query) would only recompute it.
        """
        n, channels, height, width = x.shape
        size = min(max(round(math.sqrt(p * height * width)), 1), height, width)
        highs = torch.tensor([height - size + 1, width - size + 1] + [2] * channels)
        draws = streams.integers(key, points, counter, highs)
        window = _windows(draws[:, 0], draws[:, 1], size, x)
        step = 2 * self.threat.eps * _signs(draws[:, 2:].view(n, channels, 1, 1), x)
        candidate = best.clone()
        candidate[window] = self.threat.clip(x[window], best[window] + step)
        return candidate

    def _propose_l2(
        self,
        x: torch.Tensor,
        best: torch.Tensor,
        p: float,
        key: int,
        points: torch.Tensor,
        counter: int,
    ) -> torch.Tensor:
        """Move the ℓ2 mass of two random windows (plus any unused budget) into the first one,
        as a fresh meta pattern blended with the old content, then rescale to norm ε."""
        n, channels, height, width = x.shape
        eps = self.threat.eps
        size = max(round(math.sqrt(p * height * width)), 3)
        size = min(size + (size % 2 == 0), height, width)  # odd, so the pattern has a centre
        room = [height - size + 1, width - size + 1]
        draws = streams.integers(
            key, points, counter, torch.tensor(room * 2 + [2] * (1 + channels))
        )
        delta = best - x
        target = _windows(draws[:, 0], draws[:, 1], size, x)
        source = _windows(draws[:, 2], draws[:, 3], size, x)
        in_windows = torch.zeros_like(x[:, :1], dtype=torch.bool)
        in_windows[target[0], 0, target[2], target[3]] = True
        in_windows[source[0], 0, source[2], source[3]] = True
        old = delta[target]
        unused = (eps**2 - _per_example_norm(delta).square()).clamp_min(0) / channels
        budget = (unused + _per_channel_norm(delta * in_windows).square()).sqrt()
        pattern = _meta_patterns(size, draws[:, 4], x)
        new = pattern * _signs(draws[:, 5:].view(n, channels, 1, 1), x)
        new = new + old / (_per_channel_norm(old) + 1e-12)
        new = new / (_per_channel_norm(new) + 1e-12) * budget
        delta = delta.masked_fill(in_windows, 0.0)
        delta[target] = new
        unit = delta / _per_example_norm(delta).clamp_min(1e-12)
        return self.threat.clip(x, x + eps * unit)
