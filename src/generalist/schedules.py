"""Piecewise-linear schedules in the epoch, for learning rates and the mixing weights γ.

The official recipe writes every schedule as points on the epoch axis of a 120-epoch run. We
let the x-coordinates be fractions of E instead, so a 10-epoch smoke run keeps the *shape* of
the recipe (decay at 2E/3, redistribution from 0.625E) rather than never reaching it.
Two points with the same x make a step, which is how the classic "divide by 10 at 50 %"
schedules of the baselines are written.
"""

from __future__ import annotations

import bisect
import math
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from generalist.errors import ConfigError, cut

SCHEDULE_UNITS = ("fraction", "epoch")
MAX_NUMBER_CHARS = 100
MAX_EXPONENT = 400
"""Beyond a float's range (1e308) either way; ``Fraction("1e9999999")`` takes seconds."""
_EXPONENT = re.compile(r"[eE]([+-]?\d+)")
SCHEDULE_GRANULARITIES = ("epoch", "step")
"""``epoch``: every curve is read once per epoch e, at x = e (the official code); ``step``:
at every step, at the fractional epoch e − 1 + (batches done)/(batches per epoch)."""


def parse_number(value: Any, key: str) -> float:
    """Read ``0.01``, ``1e-3`` or a fraction such as ``"2/3"`` without ever calling eval."""
    return float(parse_exact(value, key))


_RELATIVE_TO_EPS = re.compile(r"(?:(?P<factor>[^*]+)\*)?eps(?:/(?P<divisor>[^*/]+))?")
"""``eps``, ``eps/4``, ``2/3*eps``, ``0.25*eps``: a step size written as a share of ε."""


def parse_step_size(value: Any, eps: Fraction, key: str) -> float:
    """A PGD step size: a number (``0.007``, ``2/255``), or a share of ε (``eps/4``,
    ``2/3*eps``) that follows ε when only ε is changed.

    The shipped profiles write theirs relative to ε, so ``--set budgets.Linf.eps=0.3`` keeps
    the attack able to cross the ball; a plain number stays as written (a run whose
    steps × step size fall short of ε says so when it starts). Computed exactly, so
    ``eps/4`` of ``8/255`` is bit for bit the float of ``2/255``.
    """
    if isinstance(value, str):
        match = _RELATIVE_TO_EPS.fullmatch(value.replace(" ", ""))
        if match is not None:
            factor = parse_exact(match["factor"], key) if match["factor"] else Fraction(1)
            divisor = parse_exact(match["divisor"], key) if match["divisor"] else Fraction(1)
            if divisor == 0:
                raise ConfigError(f"{key}: {cut(value)} divides by zero; write it like eps/4")
            return float(eps * factor / divisor)
    return parse_number(value, key)


def parse_exact(value: Any, key: str) -> Fraction:
    """:func:`parse_number` as an exact rational, for rules that must land on whole epochs or
    steps without float rounding (``1/24`` of 120 epochs is exactly 5)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{key}: expected a number, got {cut(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {cut(value)}")
    if isinstance(value, str) and len(value) > MAX_NUMBER_CHARS:
        raise ConfigError(f"{key}: {cut(value)} is too long for a number")
    if isinstance(value, int):  # not through repr: a 5,000-digit integer has none
        text = ""
    else:
        text = value.strip().replace(" ", "") if isinstance(value, str) else repr(value)
    exponent = _EXPONENT.search(text)
    too_large = f"{key}: expected a finite number, got {cut(value)}"
    if exponent and int(exponent.group(1)) > MAX_EXPONENT:  # Fraction would compute 10**e
        raise ConfigError(too_large)
    if exponent and int(exponent.group(1)) < -MAX_EXPONENT:
        raise ConfigError(f"{key}: {cut(value)} is below any float but 0; write 0")
    try:
        number = Fraction(value) if isinstance(value, int) else Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(
            f"{key}: {cut(value)} is not a number; write it like 0.01, 1e-3 or 2/3"
        ) from None
    if abs(number) > sys.float_info.max:  # every caller reads it as a float too
        raise ConfigError(too_large)
    return number


def schedule_position(
    granularity: str, epoch: int, batches_done: int, batches_per_epoch: int
) -> float:
    """Where on the epoch axis a step reads its schedules (see :data:`SCHEDULE_GRANULARITIES`).

    ``batches_done`` counts the step being taken, so the last step of epoch e reads x = e in
    both granularities: ``epoch`` holds that value for the whole epoch (docs/algorithm.md).
    """
    if granularity == "epoch":
        return float(epoch)
    return epoch - 1 + batches_done / batches_per_epoch


@dataclass(frozen=True)
class PiecewiseLinear:
    """``f(epoch)`` through ``points`` (x in epochs), constant before the first / after the last."""

    points: tuple[tuple[float, float], ...]

    def __call__(self, epoch: float) -> float:
        xs = [x for x, _ in self.points]
        # bisect_right makes a repeated x act as a step: at x itself the later value wins.
        right = bisect.bisect_right(xs, epoch)
        if right == 0:
            return self.points[0][1]
        if right == len(xs):
            return self.points[-1][1]
        (x0, y0), (x1, y1) = self.points[right - 1], self.points[right]
        return y0 + (y1 - y0) * (epoch - x0) / (x1 - x0)

    @classmethod
    def constant(cls, value: float) -> PiecewiseLinear:
        return cls(((0.0, value),))


def build_schedule(
    spec: Any, epochs: int, key: str, *, low: float = 0.0, high: float = math.inf
) -> PiecewiseLinear:
    """Turn a config value (a number, or ``{unit, points}``) into a schedule over ``epochs``.

    Every value is checked against ``[low, high]`` so that a negative learning rate or a γ of 1.5
    fails before training starts, naming the key.
    """
    if isinstance(spec, int | float | str) and not isinstance(spec, bool):
        value = parse_number(spec, key)
        _check_range(value, key, low, high)
        return PiecewiseLinear.constant(value)
    if not isinstance(spec, dict):
        raise ConfigError(f"{key}: expected a number or {{unit: fraction, points: [[x, y], ...]}}")
    unknown = set(spec) - {"unit", "points"}
    if unknown:
        raise ConfigError(f"{key}: unknown schedule field {sorted(unknown)[0]!r}; use unit, points")
    unit = spec.get("unit", "fraction")
    if unit not in SCHEDULE_UNITS:
        raise ConfigError(f"{key}.unit: {cut(unit)} is not one of {', '.join(SCHEDULE_UNITS)}")
    raw = spec.get("points")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{key}.points: give a non-empty list of [x, y] pairs")
    scale = epochs if unit == "fraction" else 1
    points: list[tuple[float, float]] = []
    for i, pair in enumerate(raw):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ConfigError(f"{key}.points[{i}]: expected an [x, y] pair, got {cut(pair)}")
        x = parse_number(pair[0], f"{key}.points[{i}]") * scale
        if not math.isfinite(x):
            raise ConfigError(f"{key}.points[{i}]: x is too large")
        y = parse_number(pair[1], f"{key}.points[{i}]")
        _check_range(y, f"{key}.points[{i}]", low, high)
        if points and x < points[-1][0]:
            raise ConfigError(f"{key}.points: x must not decrease (point {i} goes back to {x:g})")
        points.append((x, y))
    return PiecewiseLinear(tuple(points))


def _check_range(value: float, key: str, low: float, high: float) -> None:
    if not low <= value <= high:
        bound = f"[{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
        raise ConfigError(f"{key}: {value:g} is out of range; it must be {bound}")


REMAINDER = "remainder"
"""The γ of the one learner that takes whatever the others leave: 1 − Σ_other γ_j(e)."""


def mixing_weights(gammas: dict[str, Any], epochs: int) -> dict[str, PiecewiseLinear]:
    """γ_i(e) of every learner: its own curve, or for the ``remainder`` learner 1 − Σ of the
    others at every integer epoch e = 1..E (γ is read once per epoch, so the points are exact).

    The one builder of the remainder: the config check (γ in [0, 1], summing to 1) and training
    both read these curves.
    """
    fixed = {
        name: build_schedule(spec, epochs, f"learners.{name}.gamma", high=1.0)
        for name, spec in gammas.items()
        if spec != REMAINDER
    }
    return {
        name: fixed[name]
        if name in fixed
        else PiecewiseLinear(
            tuple((float(e), 1.0 - sum(c(e) for c in fixed.values())) for e in range(1, epochs + 1))
        )
        for name in gammas
    }
