"""The training checkpoints of one run: written atomically, read back with integrity checks.

``step-<steps>-epoch-<epoch>.safetensors`` holds every tensor of the training state, and the
``.json`` beside it holds the scalars plus the tensor file's SHA-256 (and the tensor file the
scalars' SHA-256, so each file vouches for the other). Every file is written to a temporary
name, flushed, fsynced and renamed, tensors first and the JSON last, so a checkpoint exists
exactly when its JSON does: a crash or a full disk mid-write leaves the previous checkpoints
untouched. Nothing is pickled, so a checkpoint someone sends cannot run code. What the tensors
and scalars mean is :mod:`generalist.training.state`'s business; model weights on their own are
:mod:`generalist.weights`'.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from generalist.durable import write_durably
from generalist.errors import CheckpointError, cut
from generalist.weights import is_safetensors

CHECKPOINT_FORMAT = "generalist-checkpoint/1"
_CHECKPOINT_NAME = re.compile(r"step-(\d+)-epoch-(\d+)\.json")
_TENSOR_NAME = re.compile(r"step-\d{9,}-epoch-\d{4,}\.safetensors")
_TEMPORARY_NAME = re.compile(r"\.step-\d{9,}-epoch-\d{4,}\.(json|safetensors)\.tmp")
"""The names :meth:`CheckpointStore.save` generates: the only ones its cleanup may remove."""
_MAX_RECORD_BYTES = 256 << 20
_MAX_HEADER_BYTES = 100 << 20


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


class CorruptCheckpointError(CheckpointError):
    """One checkpoint cannot be read; an older one may still be good."""

    def __init__(self, record: Path, reason: str) -> None:
        super().__init__(f"checkpoint {record} {reason}")
        self.record = record
        self.reason = reason


@dataclass
class Checkpoint:
    record: Path
    """The JSON file; the tensors are in ``record.with_suffix('.safetensors')``."""
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def _meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the scalars, kept in the tensor file so that each file vouches for the other."""
    canonical = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    return header.get("__metadata__", {})


class CheckpointStore:
    """The checkpoints of one run: write, list newest first, read with integrity checks, prune."""

    def __init__(
        self, directory: Path, keep: int = 2, echo: Callable[[str], None] | None = None
    ) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self.echo = echo or _to_stderr
        self._mentioned_strangers = False

    def records(self) -> list[Path]:
        """Complete checkpoints (those whose JSON exists), newest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _CHECKPOINT_NAME.fullmatch(path.name)
            if match:
                found.append(((int(match[1]), int(match[2])), path))
        return [path for _, path in sorted(found, reverse=True)]

    def latest(self) -> Path | None:
        records = self.records()
        return records[0] if records else None

    def save(
        self, step: int, epoch: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> Path:
        """Write one checkpoint (tensors, then the JSON that commits it), then prune old ones."""
        self.directory.mkdir(parents=True, exist_ok=True)
        record = self.directory / f"step-{step:09d}-epoch-{epoch:04d}.json"
        cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
        metadata = {"format": CHECKPOINT_FORMAT, "meta_sha256": _meta_digest(meta)}
        data = safetensors.torch.save(cpu, metadata=metadata)
        write_durably(record.with_suffix(".safetensors"), data)
        full = {
            "format": CHECKPOINT_FORMAT,
            **meta,
            "tensors": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)},
        }
        write_durably(record, (json.dumps(full, indent=1) + "\n").encode())
        self._prune()
        return record

    def read(self, record: Path) -> Checkpoint:
        """Read and verify one checkpoint; :class:`CorruptCheckpointError` says what is wrong."""
        try:
            meta = json.loads(record.read_bytes())
        except OSError as exc:
            raise CorruptCheckpointError(record, f"cannot be read ({exc.strerror})") from None
        except ValueError as exc:
            raise CorruptCheckpointError(record, f"is not valid JSON ({cut(str(exc))})") from None
        except RecursionError:
            raise CorruptCheckpointError(record, "is not valid JSON (nested too deeply)") from None
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise CorruptCheckpointError(
                record, f"has format {cut(found)}, not {CHECKPOINT_FORMAT}"
            )
        tensor_path = record.with_suffix(".safetensors")
        try:
            data = tensor_path.read_bytes()
        except OSError as exc:
            raise CorruptCheckpointError(
                record, f"has lost its tensors: {tensor_path.name} ({exc.strerror})"
            ) from None
        expected = meta.get("tensors", {})
        if not isinstance(expected, dict) or hashlib.sha256(data).hexdigest() != expected.get(
            "sha256"
        ):
            raise CorruptCheckpointError(
                record,
                f"does not match {tensor_path.name} ({len(data)} bytes, SHA-256 differs): "
                "the tensor file is truncated or corrupt",
            )
        if not is_safetensors(data):
            raise CorruptCheckpointError(
                record,
                f"points at {tensor_path.name}, which is not a safetensors file (a pickle or "
                "other format); refusing to read it",
            )
        try:
            tensors = safetensors.torch.load(data)
        except (SafetensorError, ValueError) as exc:
            raise CorruptCheckpointError(record, f"has unreadable tensors ({exc})") from None
        scalars = {k: v for k, v in meta.items() if k not in ("format", "tensors")}
        if _safetensors_metadata(data).get("meta_sha256") != _meta_digest(scalars):
            raise CorruptCheckpointError(
                record, f"was changed after it was written (its hash in {tensor_path.name} differs)"
            )
        return Checkpoint(record, meta, tensors)

    def newest_readable(
        self, fits: Callable[[Checkpoint], str] | None = None
    ) -> tuple[Checkpoint | None, list[CorruptCheckpointError]]:
        """The newest checkpoint that reads back intact (and ``fits``), and the newer ones that
        did not.

        ``fits`` returns what is malformed in an intact checkpoint ("" when nothing is): such a
        checkpoint is passed over like a damaged one. ``(None, [])`` when the run has no
        checkpoint yet; a run whose every checkpoint is damaged raises
        :class:`CheckpointError` naming each file and its fault.
        """
        rejected: list[CorruptCheckpointError] = []
        for record in self.records():
            try:
                checkpoint = self.read(record)
                problem = fits(checkpoint) if fits is not None else ""
                if problem:
                    raise CorruptCheckpointError(record, problem)
                return checkpoint, rejected
            except CorruptCheckpointError as exc:
                rejected.append(exc)
        if rejected:
            faults = "; ".join(f"{e.record.name} {e.reason}" for e in rejected)
            raise CheckpointError(
                f"no readable checkpoint in {self.directory}: {faults}; the run cannot continue "
                f"from them, so start it again: generalist train --config "
                f"{self.directory.parent / 'config.yaml'}"
            )
        return None, []

    def quarantine(self, record: Path) -> None:
        """Rename a damaged checkpoint's files to ``*.corrupt``: kept for inspection, never
        picked again, never pruned in place of a good one."""
        for path in (record, record.with_suffix(".safetensors")):
            if path.exists():
                os.replace(path, path.with_name(path.name + ".corrupt"))

    def _prune(self) -> None:
        """Keep the newest ``keep`` checkpoints; drop their JSON first so a half-deleted one
        is never listed, and clear leftovers of interrupted writes.

        Only what this tool wrote is ever removed: a file whose name it generates and whose
        content says it is one of its checkpoints (or the temporary of one). Anything else in
        the folder (a user's ``best-model.safetensors``, the rest of a shared folder that
        ``checkpoints/`` links to) stays, and is mentioned once."""
        for record in self.records()[self.keep :]:
            if _is_our_record(record):
                record.unlink()
                tensors = record.with_suffix(".safetensors")
                if _is_our_tensor_file(tensors):
                    tensors.unlink()
        kept = set()
        for record in self.records():
            kept.update((record, record.with_suffix(".safetensors")))
        strangers = []
        for path in sorted(self.directory.iterdir()):
            if path in kept or path.name.endswith(".corrupt"):
                continue
            if _is_our_leftover(path):
                path.unlink(missing_ok=True)
            else:
                strangers.append(path.name)
        if strangers and not self._mentioned_strangers:
            self._mentioned_strangers = True
            shown = ", ".join(strangers[:5]) + (", ..." if len(strangers) > 5 else "")
            self.echo(
                f"note: {self.directory} also holds files generalist did not write ({shown}); "
                "they are left alone"
            )


def _is_regular(path: Path) -> bool:
    """A plain file, not a link (whose target is none of this folder's business)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_our_leftover(path: Path) -> bool:
    """A temporary of an interrupted save, or the tensors of a checkpoint whose JSON is gone."""
    if _TEMPORARY_NAME.fullmatch(path.name):
        return _is_regular(path)
    return bool(_TENSOR_NAME.fullmatch(path.name)) and _is_our_tensor_file(path)


def _is_our_record(path: Path) -> bool:
    if not _is_regular(path) or path.stat().st_size > _MAX_RECORD_BYTES:
        return False
    try:
        meta = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and meta.get("format") == CHECKPOINT_FORMAT


def _is_our_tensor_file(path: Path) -> bool:
    """A regular file whose safetensors header names this tool's checkpoint format."""
    if not _is_regular(path):
        return False
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= _MAX_HEADER_BYTES:
                return False
            header = json.loads(handle.read(size))
    except (OSError, ValueError, RecursionError):
        return False
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(metadata, dict) and metadata.get("format") == CHECKPOINT_FORMAT
