"""Model weights on disk: save, read and rebuild a model without ever running code from a file.

Weights are stored as safetensors (a flat tensor table: reading it cannot run code) next to a
small JSON spec that says how to rebuild the architecture. The spec carries the file's SHA-256,
so a truncated or swapped weights file is refused with a clear message rather than half-loaded.
A PyTorch state dict a user brings (``.pt``) is read by torch's allow-listing unpickler
(``weights_only=True``); any other pickle is refused before it can import anything.

The training checkpoints (:mod:`generalist.checkpoint`) use the same tensor format for the
whole training state; this module is what evaluation, pseudo-labelling and initialisation from
a file need, without the store.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import pickletools
import re
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from generalist.durable import write_durably
from generalist.errors import CheckpointError, GeneralistError, UnsafeFileError, cut
from generalist.models import create_model
from generalist.plugins import is_import_path
from generalist.training.stateful import check_same_layout

WEIGHTS_FORMAT = "generalist-weights/1"
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"
BEST_STEM = "model-best"
"""``model-best.safetensors`` + ``model-best.json``: the global model selected on validation."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- tensor files


def read_state_dict(
    path: str | Path, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or of a PyTorch state dict, whatever the suffix.

    The format is recognised from the bytes, not the name. PyTorch files go through
    ``torch.load(weights_only=True)``, whose unpickler only builds tensors and plain containers;
    a file that asks for anything else (``os.system``, a class) raises :class:`UnsafeFileError`.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path} ({exc.strerror}); check the path") from None
    if is_safetensors(data):
        state = _load_safetensors(data, path)
    elif data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":
        state = _load_torch_state_dict(data, path)
    else:
        raise CheckpointError(
            f"{path} is neither a .safetensors file nor a PyTorch state dict; "
            "save weights with safetensors.torch.save_file(model.state_dict(), ...)"
        )
    return {key: tensor.to(device) for key, tensor in state.items()}


def is_safetensors(data: bytes) -> bool:
    """A safetensors file starts with its JSON header's length (u64, little-endian), then '{'.

    A truncated one still passes this test, so its parser can say what is wrong with it.
    """
    return data[8:9] == b"{"


def _load_safetensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(data)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({exc}); replace it with the original file"
        ) from None


def _load_torch_state_dict(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():  # torch warns about pickle protocols; the refusal says enough
        warnings.simplefilter("ignore")
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeFileError(
                f"refusing to load {path}: {_refusal(exc)}; weights files may only hold tensors, "
                "so ask for a .safetensors file (or a plain model.state_dict())"
            ) from None
        except Exception as exc:  # zip and stream errors all mean a damaged file
            if data[:1] == b"\x80" and _is_whole_plain_pickle(data):
                raise CheckpointError(
                    f"{path} is a plain Python pickle, not a PyTorch state dict (torch.save "
                    "writes a zip archive of tensors); save the weights with "
                    "safetensors.torch.save_file(model.state_dict(), ...)"
                ) from None
            raise CheckpointError(
                f"{path} is a truncated or corrupt PyTorch file ({type(exc).__name__}); "
                "replace it with the original file"
            ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning and many training scripts nest it
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__} rather than a state dict of tensors; "
            "save model.state_dict()"
        )
    return obj


def _is_whole_plain_pickle(data: bytes) -> bool:
    """Whether ``data`` is one complete pickle that only builds plain values (no globals).

    Parsed opcode by opcode, never unpickled. A legacy (pre-zip) torch file is several pickles
    back to back, so it is not "whole" here and keeps the corrupt-file message."""
    end = 0
    try:
        for opcode, _, position in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ"):
                return False
            end = position
    except Exception:  # any parse failure: not a complete pickle
        return False
    return end == len(data) - 1


def _refusal(exc: Exception) -> str:
    """Name what the pickle asked for, without torch's advice to retry with weights_only=False."""
    wanted = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if wanted:
        return f"it is a pickle that asks for {wanted.group(1)}, which could run code"
    return "it is a pickle using more than tensors and plain containers"


# --------------------------------------------------------------------------- model weights


def save_model(
    model: nn.Module, directory: Path, spec: dict[str, Any], *, stem: str = "model"
) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` durably into ``directory``.

    ``spec`` must hold ``model`` (the keyword arguments of ``create_model``); anything else
    (dataset, preset, metrics) is kept for reports.
    """
    directory = Path(directory)
    weights = directory / f"{stem}.safetensors"
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    data = safetensors.torch.save(state, metadata={"format": WEIGHTS_FORMAT})
    write_durably(weights, data)
    record = {"format": WEIGHTS_FORMAT, **spec, "sha256": hashlib.sha256(data).hexdigest()}
    write_durably(weights.with_suffix(".json"), (json.dumps(record, indent=2) + "\n").encode())
    return weights


def spec_path_of(weights: Path) -> Path:
    """The spec beside ``weights``: ``<stem>.json`` when there is one (``model-best.json``),
    else ``model.json`` (a ``.pt`` a user brings next to the spec of its architecture)."""
    own = weights.with_suffix(".json")
    return own if own.is_file() else weights.with_name(SPEC_FILE)


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    trust_unhashed: bool = False,
    arch: dict[str, Any] | None = None,
    trust_changed_code: bool = False,
) -> tuple[nn.Module, dict]:
    """Rebuild a saved model from a run directory, a ``model.safetensors`` or a ``.pt`` state
    dict with a ``model.json`` beside it; returns ``(model in eval mode, spec)``.

    Before any weight is allocated, the spec is checked (a registered architecture or a
    plug-in whose source file still has the recorded SHA-256, only arguments it takes), the
    file against the spec's SHA-256 (a spec without one is refused unless ``trust_unhashed``),
    and the file's tensors against the architecture built on the meta device: names, shapes
    and dtypes must all match, so another architecture's weights or a spec asking for a
    billion classes fail with one line instead of a traceback or an allocation that never ends.

    ``arch`` (``create_model``'s arguments: ``name``, ``num_classes``, ...) replaces
    ``model.json`` for weights saved by another program (``torch.save(model.state_dict())`` or
    safetensors): naming the file and its architecture is the caller's consent to load a file
    no hash vouches for; the layout check still applies, and the file is still read without
    unpickling code. ``trust_changed_code`` builds a plug-in model from its file as it is now.
    """
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise CheckpointError(
            f"no weights at {weights}; pass a run directory or a .safetensors file"
        )
    if arch is not None:
        spec: dict[str, Any] = {"format": WEIGHTS_FORMAT, "model": dict(arch)}
        spec_path = weights
    else:
        spec_path = spec_path_of(weights)
        if not spec_path.is_file():
            raise CheckpointError(
                f"{spec_path} is missing; it says how to rebuild the model: copy it too, or "
                "name the architecture (generalist eval --arch NAME, load_model(arch=...))"
            )
        spec = _read_spec(spec_path)
        _check_hash(weights, spec_path, spec.get("sha256"), trust_unhashed)
    model_kwargs = dict(spec["model"])
    name = model_kwargs.pop("name")
    if trust_changed_code:
        model_kwargs.pop("source", None)
    skeleton = _build_model(name, model_kwargs, spec_path, "meta")
    state = read_state_dict(weights)
    if arch is not None:
        state = _without_wrapper_prefix(state, skeleton.state_dict())
    where = f"architecture {name}" if arch is not None else f"architecture in {spec_path}"
    check_same_layout(skeleton.state_dict(), state, f"{weights} does not fit the {where}")
    model = _build_model(name, model_kwargs, spec_path, "cpu")
    model.load_state_dict(state)
    return model.to(device).eval(), spec


def _check_hash(weights: Path, spec_path: Path, expected: str | None, trust: bool) -> None:
    if not expected:
        if not trust:
            raise CheckpointError(
                f"{spec_path} has no sha256 of {weights.name}, so a damaged or swapped file "
                "would load silently; re-save the model with generalist, add its sha256, or "
                "pass --trust-unhashed to generalist eval if you trust the file"
            )
    elif sha256_file(weights) != expected:
        raise CheckpointError(
            f"{weights} does not match the hash in {spec_path}: it is truncated or was replaced"
        )


def _without_wrapper_prefix(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` every key of a DataParallel/DDP state dict carries, when the bare
    names are the architecture's (a common way another program's weights arrive)."""
    prefix = "module."
    if (
        state
        and all(key.startswith(prefix) for key in state)
        and not any(key.startswith(prefix) for key in expected)
    ):
        return {key[len(prefix) :]: tensor for key, tensor in state.items()}
    return state


def _read_spec(spec_path: Path) -> dict[str, Any]:
    """``model.json``, checked for the fields loading needs; one line for anything else."""
    invalid = f"{spec_path} is not a valid model spec"
    if spec_path.stat().st_size > 1 << 20:
        raise CheckpointError(f"{invalid} (over 1 MB); re-save the model")
    try:
        spec = json.loads(spec_path.read_bytes())
    except (ValueError, RecursionError):
        raise CheckpointError(f"{invalid} (not JSON); re-save the model") from None
    if not isinstance(spec, dict):
        raise CheckpointError(f"{invalid} (not a JSON object); re-save the model")
    if spec.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(
            f"{spec_path} has format {cut(spec.get('format'))}, not {WEIGHTS_FORMAT}"
        )
    model = spec.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise CheckpointError(f"{invalid}: its 'model' needs the architecture's 'name'")
    if not isinstance(spec.get("sha256", ""), str):
        raise CheckpointError(f"{invalid}: 'sha256' must be a hex string")
    return spec


def _build_model(name: str, kwargs: dict[str, Any], spec_path: Path, device: str) -> nn.Module:
    """The architecture ``model.json`` asks for; ``meta`` builds shapes without memory."""
    try:
        with torch.device(device):
            return create_model(name, **kwargs)
    except (GeneralistError, TypeError, ValueError, RuntimeError) as exc:
        if isinstance(exc, GeneralistError) and is_import_path(name):
            raise  # the plug-in's own line says which file and what to do
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{spec_path} asks for a model that cannot be built ({cut(reason, 160)}); "
            "re-save the model with generalist"
        ) from None
