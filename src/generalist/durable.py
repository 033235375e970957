"""The one way this package writes a file: all at once, durably, never through a link.

Every file a run leaves behind (config, metrics, manifest, weights, checkpoints, evaluation
records, reports) goes through :func:`write_durably`: the bytes go to a temporary name beside the
target, are flushed and fsynced, and the temporary is renamed over the target, then the
directory is fsynced so the rename itself survives a power loss. A crash or a full disk at any
moment leaves either the old file or the new one, never half of either.

The temporary is created exclusively and without following links (``O_CREAT | O_EXCL |
O_NOFOLLOW``), and a target that is a symbolic link is refused: a link planted in a run
directory can neither make a run write outside it nor turn the run's own files into links.
Appends (:func:`append_text`) refuse links the same way.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import BinaryIO

from generalist.errors import UnsafeFileError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CREATE_EXCLUSIVE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once: temp file, flush, fsync, rename, fsync dir.

    On any failure (a full disk, a quota) the temp file is removed and ``path`` keeps its old
    content; the error propagates. A link at ``path`` raises :class:`UnsafeFileError`.
    """
    path = Path(path)
    refuse_link(path)
    tmp = path.with_name(f".{path.name}.tmp")
    handle = open_new(tmp)
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        refuse_link(path)  # planted while we wrote: still never rename over it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_directory(path.parent)


def write_text_durably(path: Path, text: str) -> None:
    """:func:`write_durably` for text, always UTF-8 so a run folder reads the same everywhere."""
    write_durably(path, text.encode("utf-8"))


def append_text(path: Path, text: str) -> None:
    """Append ``text`` (UTF-8) to ``path``, creating it, without following a link there."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o644)
    except OSError as exc:
        if _NOFOLLOW and path.is_symlink():
            raise _link_error(path) from None
        raise exc
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()


def refuse_link(path: Path) -> None:
    """Raise :class:`UnsafeFileError` if ``path`` is a symbolic link (a missing path is fine)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise _link_error(path)


def _link_error(path: Path) -> UnsafeFileError:
    return UnsafeFileError(
        f"{path} is a symbolic link; generalist never writes through links, so remove it "
        "(or replace it with a copy of what it points to) and retry"
    )


def open_new(tmp: Path) -> BinaryIO:
    """``tmp`` opened for writing, new and exclusively. A leftover of a killed write (or
    anything planted under that name, a link included) is removed first: the name is ours,
    and only the entry itself is removed, never what a link points to."""
    try:
        fd = os.open(tmp, _CREATE_EXCLUSIVE, 0o644)
    except FileExistsError:
        tmp.unlink()
        fd = os.open(tmp, _CREATE_EXCLUSIVE, 0o644)
    return os.fdopen(fd, "wb")


def fsync_directory(directory: Path) -> None:
    """Make a rename durable; some filesystems refuse to open directories, which is harmless."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
