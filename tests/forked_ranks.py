"""Two ranks of a gloo group as forked copies of the test process: what torchrun starts,
without its seconds of imports per process."""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from training_runs import sigterm_at_step

from generalist.cli import main


def fork_two(target: Callable[..., int | None], *args: Any) -> list[int | None]:
    """Run ``target(*args)`` as ranks 0 and 1 (torchrun's environment variables set), each
    exiting with its return value; the exit statuses. A hang fails, it does not stall."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    fork = multiprocessing.get_context("fork")
    ranks = [fork.Process(target=_as_rank, args=(rank, port, target, args)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
        if process.is_alive():
            process.kill()
    return [process.exitcode for process in ranks]


def _as_rank(rank: int, port: int, target: Callable[..., int | None], args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    sys.exit(target(*args))


def cli_rank(args: list[str], stop_at: int | None = None) -> int:
    """``generalist ARGS`` as one rank (a :func:`fork_two` target); with ``stop_at``, rank 0
    gets SIGTERM at that step, as from a preempting scheduler."""
    if os.environ["RANK"] == "0" and stop_at is not None:
        with sigterm_at_step(stop_at):
            return main(args)
    return main(args)
