"""Stopping a run cleanly on SIGTERM (a cluster preempting the job) or SIGINT (Ctrl-C).

The first signal only raises a flag: the loop finishes the step in flight, writes a checkpoint
and leaves through :class:`TrainingInterrupted`, whose message says how to resume. A second
signal stops at once without saving, which is safe because checkpoints are written atomically:
the last complete one stays intact.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from generalist.errors import TrainingError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(TrainingError):
    """A signal stopped training; ``checkpoint`` is what was saved (None: nothing new)."""

    def __init__(
        self, message: str, *, signum: int, run: Path, checkpoint: Path | None = None
    ) -> None:
        super().__init__(message)
        self.signum = signum
        self.run = run
        self.checkpoint = checkpoint

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


class StopRequest:
    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


def resume_hint(run: Path) -> str:
    return f"continue with: generalist train --resume {run}"


@contextmanager
def stop_on_signals(run: Path) -> Iterator[StopRequest]:
    """Turn SIGTERM/SIGINT into a :class:`StopRequest` while the block runs.

    Signal handlers can only be installed from the main thread; elsewhere (a notebook's worker
    thread) the block runs with the default behaviour and the request never fires.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, _frame: object) -> None:
        if request.requested:
            raise TrainingInterrupted(
                f"stopped at once by a second {signal.Signals(signum).name}, without saving; "
                f"the checkpoints already in {run} are intact; {resume_hint(run)}",
                signum=signum,
                run=run,
            )
        request.signum = signum
        print(
            f"\n{request.name} received: finishing the current step, then saving a checkpoint "
            "(send it again to stop at once without saving)",
            file=sys.stderr,
            flush=True,
        )

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
