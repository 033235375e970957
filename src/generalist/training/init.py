"""Starting a run from saved weights (``model.init_from`` / ``--init-from``).

CURE is meant to start from a naturally trained model; any method can. The saved model must
be the architecture this run builds (same name, classes, input shape and normalisation): a
silent partial load would train something other than what the config says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from generalist.errors import ConfigError
from generalist.models import NormalizedModel
from generalist.weights import SPEC_FILE, load_model, read_state_dict


def initialize_from(model: nn.Module, source: str | None, spec: dict[str, Any]) -> None:
    """Copy the weights saved at ``source`` into ``model`` (built from ``spec``); None: no-op.

    ``source`` is a generalist model (run directory, or weights with ``model.json`` beside
    them), or a bare state dict of the network in its published layout (a torchvision or timm
    ResNet-50 ``.pth``/``.safetensors``), which goes inside this run's input normalisation.
    """
    if source is None:
        return
    path = Path(source).expanduser()
    if path.is_file() and not path.with_name(SPEC_FILE).is_file():
        _load_bare(model, path, spec)
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


def _load_bare(model: nn.Module, path: Path, spec: dict[str, Any]) -> None:
    """Strict: every tensor of the network, nothing else, each of the right shape."""
    net = model.net if isinstance(model, NormalizedModel) else model
    state = read_state_dict(path)
    own = net.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    wrong = [key for key in own if key in state and state[key].shape != own[key].shape]
    if missing or unexpected or wrong:
        if wrong:
            what = f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, not {tuple(own[wrong[0]].shape)}"
        else:
            what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ConfigError(
            f"model.init_from: {path} does not fit {spec['name']} with {spec['num_classes']} "
            f"classes ({what}); use weights of that architecture in its published layout"
        )
    with torch.no_grad():
        net.load_state_dict(state)
