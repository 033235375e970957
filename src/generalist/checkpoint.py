"""Saving and loading model weights without ever unpickling.

Weights are stored as safetensors (a flat tensor table: reading it cannot run code) next to a
small JSON spec that says how to rebuild the architecture. The spec carries the file's SHA-256,
so a truncated or swapped weights file is refused with a clear message rather than half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from generalist.errors import CheckpointError
from generalist.models import create_model

WEIGHTS_FORMAT = "generalist-weights/1"
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(model: nn.Module, directory: Path, spec: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``model.json`` atomically into ``directory``.

    ``spec`` must hold ``model`` (the keyword arguments of ``create_model``); anything else
    (dataset, preset, metrics) is kept for reports.
    """
    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    tmp = directory / f".{WEIGHTS_FILE}.tmp"
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"format": WEIGHTS_FORMAT})
    os.replace(tmp, weights)
    record = {"format": WEIGHTS_FORMAT, **spec, "sha256": sha256_file(weights)}
    spec_tmp = directory / f".{SPEC_FILE}.tmp"
    spec_tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(spec_tmp, directory / SPEC_FILE)
    return weights


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a saved model from a run directory or a ``model.safetensors`` path."""
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    spec_path = weights.with_name(SPEC_FILE)
    if not weights.is_file():
        raise CheckpointError(
            f"no weights at {weights}; pass a run directory or a .safetensors file"
        )
    if not spec_path.is_file():
        raise CheckpointError(
            f"{spec_path} is missing; it says how to rebuild the model, copy it too"
        )
    try:
        spec = json.loads(spec_path.read_text())
        model_kwargs = dict(spec["model"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{spec_path} is not a valid model spec; re-save the model") from None
    if spec.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(
            f"{spec_path} has format {spec.get('format')!r}, not {WEIGHTS_FORMAT}"
        )
    if spec.get("sha256") and sha256_file(weights) != spec["sha256"]:
        raise CheckpointError(
            f"{weights} does not match the hash in {spec_path}: it is truncated or was replaced"
        )
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({exc})") from None
    model = create_model(model_kwargs.pop("name"), **model_kwargs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{weights} does not fit the architecture in {spec_path}: {what}")
    return model.to(device).eval(), spec
