"""One process per run directory (or evaluation folder) at a time.

Two processes writing one run interleave their metrics and checkpoints and each overwrite the
other's files, so every process that writes into a folder first takes an exclusive OS lock on
``FOLDER/.lock`` and holds it until it exits. The lock is ``flock``: the kernel drops it when
the holder dies, however it dies, so a SIGKILL or a power cut never leaves a stale lock behind.
The file only says who holds it (``PID HOST``), for the message the next process prints.

A process may ask again for a folder it already holds (a library user training and then
resuming one run in one interpreter); it keeps the one lock. Under torchrun only rank 0 writes
into the run directory, so only rank 0 takes it. A forked child (a data loader worker) closes
its inherited copies of the lock files at once: the lock is the parent's, and a worker that
outlives a SIGKILLed parent for a few seconds must not keep the run locked meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

from generalist.errors import GeneralistError

try:
    import fcntl
except ImportError:  # Windows: no flock; the run directory goes unguarded there
    fcntl = None

LOCK_FILE = ".lock"

_held: dict[tuple[int, int], int] = {}
"""Open lock files of this process by the locked folder's (device, inode)."""


class FolderInUseError(GeneralistError):
    """Another live process holds the folder's lock."""


def lock_folder(folder: Path, what: str, advice: str) -> None:
    """Hold ``folder``'s lock for the rest of this process, or raise :class:`FolderInUseError`.

    ``what`` names the folder in the message (``run``, ``evaluation folder``); ``advice`` says
    what to do besides waiting, e.g. which command starts a separate one.
    """
    if fcntl is None or os.environ.get("RANK", "0") != "0":
        return
    folder = Path(folder)
    key = _identity(folder)
    if key in _held:
        return
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise FolderInUseError(
            f"{what} {folder} is in use by {holder}; wait for it to finish or stop it, "
            f"then retry ({advice})"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    _held[key] = fd


def release_folder(folder: Path) -> None:
    """Give up this process's lock on ``folder`` early (no-op when it holds none)."""
    with contextlib.suppress(OSError):
        fd = _held.pop(_identity(Path(folder)), None)
        if fd is not None:
            os.close(fd)


def _forget_inherited() -> None:
    """In a forked child: close the copies of the parent's lock files (the parent's lock stays:
    an ``flock`` lasts while any copy is open, which is why the child must not keep one)."""
    for fd in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited)


def _identity(folder: Path) -> tuple[int, int]:
    status = folder.stat()
    return status.st_dev, status.st_ino


def _holder(fd: int) -> str:
    """``process PID on HOST`` from the lock file, cut to a sane length whatever it holds."""
    try:
        words = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
    except OSError:
        words = []
    if len(words) >= 2 and words[0].isdigit():
        return f"process {words[0][:12]} on {words[1][:64]}"
    return "another process"
