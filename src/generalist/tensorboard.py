"""Optional TensorBoard scalars, fed the same per-epoch records as ``metrics.jsonl``.

The JSON lines stay the record every report reads; TensorBoard is a live view of them for
those who already use it. ``tensorboard`` is an optional dependency, so its absence must be
found while the config is checked, not an epoch into training.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from generalist.errors import ConfigError

LOG_DIR = "tensorboard"
MISSING = "tensorboard logging needs `pip install generalist-at[tensorboard]`"

MetricsSink = Callable[[dict[str, Any]], None]


class ScalarWriter(Protocol):
    """The part of ``torch.utils.tensorboard.SummaryWriter`` the sink uses."""

    def add_scalar(self, tag: str, value: float, global_step: int) -> None: ...

    def flush(self) -> None: ...


def require_tensorboard() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(f"logging.tensorboard: {MISSING} (or set logging.tensorboard=false)")


class TensorBoardSink:
    """Writes one metrics record as scalars, at the record's epoch as the step."""

    def __init__(self, writer: ScalarWriter) -> None:
        self.writer = writer

    def __call__(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["epoch"])
        self.writer.flush()  # one flush per epoch: the view is live and costs nothing


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """``train_loss/natural``, ``lr/natural``, ``gamma/natural``, ``val/global/Linf:8/255`` ..."""
    values: dict[str, float] = {}
    for section in ("train_loss", "lr", "gamma", "skipped_batches"):
        for learner, value in record.get(section, {}).items():
            values[f"{section}/{learner}"] = float(value)
    for model, accuracies in record.get("val", {}).items():
        for metric, value in accuracies.items():
            values[f"val/{model}/{metric}"] = float(value)
    values["redistributed"] = float(record.get("redistributed", False))
    values["train_seconds"] = float(record["train_seconds"])
    return values


def metrics_sinks(config: Any, run_path: Path) -> list[MetricsSink]:
    """The extra receivers of a run's metrics records that ``config.logging`` asks for."""
    if not config.logging.tensorboard:
        return []
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    return [TensorBoardSink(SummaryWriter(log_dir=str(run_path / LOG_DIR)))]
