"""The one way this package replaces a file: all at once, durably, or not at all.

Every file a run leaves behind (config, metrics, manifest, weights, checkpoints, evaluation
records, reports) goes through :func:`write_durably`: the bytes go to a temporary name beside the
target, are flushed and fsynced, and the temporary is renamed over the target, then the
directory is fsynced so the rename itself survives a power loss. A crash or a full disk at any
moment leaves either the old file or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once: temp file, flush, fsync, rename, fsync dir.

    On any failure (a full disk, a quota) the temp file is removed and ``path`` keeps its old
    content; the error propagates.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_directory(path.parent)


def write_text_durably(path: Path, text: str) -> None:
    """:func:`write_durably` for text, always UTF-8 so a run folder reads the same everywhere."""
    write_durably(path, text.encode("utf-8"))


def fsync_directory(directory: Path) -> None:
    """Make a rename durable; some filesystems refuse to open directories, which is harmless."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
