"""Starting a run from saved weights (``model.init_from`` / ``--init-from``).

CURE is meant to start from a naturally trained model; any method can. The saved model must
be the architecture this run builds (same name, classes, input shape and normalisation): a
silent partial load would train something other than what the config says.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from generalist.checkpoint import load_model
from generalist.errors import ConfigError


def initialize_from(model: nn.Module, source: str | None, spec: dict[str, Any]) -> None:
    """Copy the weights saved at ``source`` into ``model`` (built from ``spec``); None: no-op."""
    if source is None:
        return
    saved, record = load_model(source)
    saved_spec = record.get("model", {})
    differing = [key for key in spec if saved_spec.get(key) != spec[key]]
    if differing:
        what = ", ".join(f"{k} {saved_spec.get(k)!r} vs {spec[k]!r}" for k in differing)
        raise ConfigError(
            f"model.init_from: {source} is not the model this run builds ({what}); "
            "start from weights of the same model and dataset"
        )
    with torch.no_grad():
        model.load_state_dict(saved.state_dict())
