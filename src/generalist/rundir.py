"""The run directory: everything a finished (or killed) training run leaves behind.

```
runs/<name>-<YYYYmmdd-HHMMSS>/
  config.yaml        the fully resolved config (re-running it reproduces the run)
  metrics.jsonl      one JSON object per epoch: losses, lr, γ, validation accuracies
  model.safetensors  the global learner's weights (safetensors: loading runs no code)
  model.json         how to rebuild the architecture, the dataset it was trained on, a hash
  summary.json       final test-set accuracies and timings
```
Files are written atomically (temp file + rename), so a crash never leaves a half-written one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from generalist.config import Config


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, out_dir: str | Path, name: str) -> RunDir:
        """A fresh directory; an existing run is never overwritten (a suffix is added)."""
        base = Path(out_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        path.mkdir(parents=True)
        return cls(path)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def weights_path(self) -> Path:
        return self.path / "model.safetensors"

    def write_config(self, config: Config) -> None:
        atomic_write_text(self.path / "config.yaml", config.to_yaml())

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic_write_text(self.path / name, json.dumps(data, indent=2) + "\n")
