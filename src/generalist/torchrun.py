"""Local processes through torchrun, and what a process learns from torchrun's environment.

``generalist train --nproc N`` and ``generalist eval --nproc N`` both run
``torchrun --standalone --nproc-per-node N -m generalist ...`` for the user; this module is the
launcher and the few facts every rank reads (its rank, the number of processes) shared by both,
so that training and evaluation start, stop and speak through rank 0 the same way; and
:func:`process_group`, the one process group a run's ranks join.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

from generalist.errors import ConfigError, GeneralistError

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""Signals the launcher passes on to torchrun (which passes them on to every worker)."""


def launch(nproc: int, argv: Sequence[str]) -> int:
    """``generalist ARGV`` on ``nproc`` local processes through torchrun; its exit status.

    torchrun runs in its own session, so a Ctrl-C reaches the workers once (forwarded from
    here), not also straight from the terminal, which they would take for a second signal.
    """
    if world_size() > 1:
        raise ConfigError("--nproc starts torchrun itself; leave it out under torchrun")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "generalist",
        *_without_nproc(argv),
    ]
    child = subprocess.Popen(command, start_new_session=True)
    if threading.current_thread() is not threading.main_thread():
        return child.wait()
    previous = {
        sig: signal.signal(sig, lambda signum, _: child.send_signal(signum))
        for sig in FORWARDED_SIGNALS
    }
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _without_nproc(argv: Sequence[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def check_gpus(processes: int, device: torch.device, launcher: str, work: str = "train") -> None:
    """Refuse more processes on this machine than it has GPUs, on a GPU run: each rank takes
    ``cuda:LOCAL_RANK``, and NCCL cannot share one GPU between two ranks. ``work`` is the verb
    of the advice (``train``, ``evaluate``)."""
    if device.type != "cuda":
        return
    gpus = torch.cuda.device_count()
    if processes > gpus:
        raise ConfigError(
            f"{launcher} {processes} processes on this machine, which has {gpus} GPU(s): every "
            f"process needs a GPU of its own (NCCL cannot share one), so start at most {gpus} "
            f"here, {work} in one process (no --nproc), or add --device cpu"
        )


def is_rank_zero() -> bool:
    """Whether this process speaks for the run (always, without torchrun)."""
    return os.environ.get("RANK", "0") == "0"


def world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's number among those of its machine: the GPU it takes."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@contextmanager
def said_by_rank_zero() -> Iterator[None]:
    """An error every rank raises alike is printed once, by rank 0 (see ``quiet`` in the CLI);
    one whose raiser already said who prints it (``quiet`` set) keeps that."""
    try:
        yield
    except GeneralistError as exc:
        if not hasattr(exc, "quiet"):
            exc.quiet = not is_rank_zero()
        raise


@contextmanager
def process_group(
    device: torch.device,
    work: str,
    *,
    timeout: datetime.timedelta | None = None,
    leave_together_on: tuple[type[BaseException], ...] = (),
) -> Iterator[torch.device]:
    """This rank's device (``cuda:LOCAL_RANK`` on GPUs) in the run's process group: a fresh one
    (NCCL on GPUs, gloo on the CPU, ``timeout`` if given) torn down at the end, or the one the
    caller initialised. ``work`` is the verb of the advice of a refusal (``train``).

    Every rank waits for the others before a fresh group is torn down, after the body ends or
    raises one of ``leave_together_on`` (an error every rank raises at the same point): a gloo
    rank whose peer has already closed its connections can abort in C++ ("terminate called
    without an active exception") after the run itself finished. On any other error a rank
    leaves alone, since waiting for peers that may never arrive would hang it.
    """
    owned = not dist.is_initialized()
    size = world_size() if owned else dist.get_world_size()
    with said_by_rank_zero():
        check_gpus(int(os.environ.get("LOCAL_WORLD_SIZE", size)), device, "torchrun started", work)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if owned:
        options = {} if timeout is None else {"timeout": timeout}
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device, **options)
        else:
            dist.init_process_group("gloo", **options)
    try:
        try:
            yield device
        except leave_together_on:
            if owned:
                dist.barrier()
            raise
        if owned:
            dist.barrier()
    finally:
        if owned:
            dist.destroy_process_group()
