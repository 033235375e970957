"""How many CPU threads a run's kernels use, so that two jobs on one machine stop fighting.

PyTorch starts one OpenMP thread per core and its threads spin while they wait for each other.
Two such jobs on the same cores take turns at every barrier: each then runs several times
slower than it would on half the cores (BENCHMARKS.md measures it). ``threads: N`` (``--threads
N``) fixes the count; the default, ``threads: null``, keeps PyTorch's choice on an idle machine
and, when other work already keeps cores busy, takes only the cores left free (at least one).

The decision is made once, when a run starts, from how busy the CPUs are over a quarter of a
second (Linux: ``/proc/stat``; elsewhere the one-minute load average). A job that starts later
is not seen: give both jobs ``--threads`` when they are meant to share a machine. An explicit
``OMP_NUM_THREADS`` (set by the user, or by torchrun for its ranks) counts as a choice and is
left alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from generalist.errors import ConfigError, cut

SAMPLE_SECONDS = 0.25
BUSY_THRESHOLD = 0.5
"""Cores busy with other work below this count as an idle machine (noise, a shell, an editor)."""
MAX_THREADS = 1024
"""Beyond any machine's cores; PyTorch refuses counts past 2**31 only when the run starts."""


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. under taskset or a container)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float:
    """How many cores other processes keep busy now (this one sleeps while it measures)."""
    stat = Path("/proc/stat")
    try:
        before = _cpu_times(stat)
        time.sleep(seconds)
        after = _cpu_times(stat)
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    total = sum(after) - sum(before)
    idle = (after[3] + after[4]) - (before[3] + before[4])  # idle + iowait
    cores = os.cpu_count() or 1
    return cores * (total - idle) / total if total > 0 else 0.0


def _cpu_times(stat: Path) -> list[int]:
    """The machine-wide ``cpu`` line of /proc/stat: user, nice, system, idle, iowait, ..."""
    first = stat.read_text().splitlines()[0].split()
    if first[0] != "cpu":
        raise ValueError("unexpected /proc/stat")
    return [int(v) for v in first[1:9]]


def choose_threads(requested: int | None) -> tuple[int | None, str]:
    """``(threads, why)``: the count to set (None: leave PyTorch's) and a phrase saying why."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ConfigError(f"threads must be a whole number >= 1 or null, got {cut(requested)}")
        if requested > MAX_THREADS:
            raise ConfigError(f"threads: must be <= {MAX_THREADS}, got {cut(requested)}")
        return requested, "as asked (--threads)"
    if os.environ.get("OMP_NUM_THREADS"):
        return None, "as OMP_NUM_THREADS says"
    cores = usable_cores()
    busy = busy_cores()
    if busy < BUSY_THRESHOLD:
        return None, "PyTorch's default on an idle machine"
    free = max(1, min(cores, round(cores - busy)))
    return free, f"the cores left free: {busy:.1f} of {cores} busy with other work"


def apply_threads(requested: int | None) -> tuple[int, str]:
    """Set the intra-op thread count for this process; returns ``(threads in use, why)``."""
    threads, why = choose_threads(requested)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads(), why
