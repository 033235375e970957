"""Sharded evaluation: the points split over processes, each shard resumable, one folder at the end.

``generalist eval ... --nproc N`` runs N local processes through torchrun (and the same code
runs under a torchrun the user started, even over several machines). Rank ``r`` of ``N``
evaluates the points ``r, r+N, r+2N, ...`` of the whole evaluation, with the suite's own resumable
state file ``shards/state-r-of-N.json`` in the evaluation folder; the attacks seed every random
draw by a point's global index, so a point's result does not depend on which shard ran it.
When every shard is done, rank 0 gathers the shard states, maps them back to global indices and
writes them as the one-process ``state.json``; then the suite "resumes" that finished state on the
whole data, which only runs the once-per-model sanity checks, so the record, the tables and the
per-point masks come from exactly the code path of a one-process run, and equal its results.

A killed sharded evaluation resumes with the same number of processes (each shard from its own
file); shards cannot be re-cut mid-evaluation, since AutoAttack's queue of a shard is fixed when a
stage starts. GPUs use NCCL, one per process (``cuda:LOCAL_RANK``); the CPU uses gloo. Shards
finish at different times, so the process group waits long (``GROUP_TIMEOUT``) at the gather.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from generalist.data import ImageDataset
from generalist.durable import write_text_durably
from generalist.errors import ConfigError, GeneralistError, cut
from generalist.evaluation.suite import (
    STATE_FORMAT,
    EvaluationSuite,
    Progress,
    SuiteResult,
    decode_mask,
    encode_mask,
)
from generalist.torchrun import check_gpus, launch, process_group, said_by_rank_zero, world_size

T = TypeVar("T")
SHARD_FOLDER = "shards"
SHARD_STATE = re.compile(r"^state-(\d+)-of-(\d+)\.json$")
GROUP_TIMEOUT = datetime.timedelta(days=7)
"""How long a finished shard waits at the gather for the slowest one (torch's default of 30
minutes would abort an evaluation whose shards differ by more than that)."""


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``count``: the points ``rank, rank+count, ...`` of the evaluation."""

    rank: int
    count: int

    def indices(self, n_examples: int) -> torch.Tensor:
        return torch.arange(self.rank, n_examples, self.count)

    @property
    def state_name(self) -> str:
        return f"{SHARD_FOLDER}/state-{self.rank}-of-{self.count}.json"

    def describe(self) -> str:
        return f"{self.rank} of {self.count}"


@dataclass(frozen=True)
class Processes:
    """This process's part in an evaluation: its rank among ``count`` and its device."""

    rank: int
    count: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def agree(self, decide: Callable[[], T]) -> T:
        """Rank 0 runs ``decide`` (choose the folder, take its lock); every rank gets its value,
        or raises its error, so no rank goes on alone after rank 0 refused."""
        if self.count == 1:
            return decide()
        outcome: list[Any] = [None]
        if self.is_main:
            try:
                outcome = [(True, decide())]
            except Exception as exc:  # every rank must hear of it, or they wait forever
                outcome = [(False, exc)]
        dist.broadcast_object_list(outcome, src=0)
        ok, value = outcome[0]
        if ok:
            return value
        if self.is_main or isinstance(value, GeneralistError):
            raise value  # a GeneralistError is printed by rank 0 only (said_by_rank_zero)
        raise GeneralistError(str(value)) from None  # an OSError too: said once, by rank 0

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value``, in rank order, on rank 0 (``None`` elsewhere)."""
        if self.count == 1:
            return [value]
        parts: list[Any] | None = [None] * self.count if self.is_main else None
        dist.gather_object(value, parts, dst=0)
        return parts


@contextmanager
def evaluation_processes(device: torch.device) -> Iterator[Processes]:
    """This process's :class:`Processes`: one alone, or under torchrun a rank of a fresh process
    group (NCCL with ``cuda:LOCAL_RANK`` on GPUs, gloo on the CPU), torn down at the end; or a
    rank of the group the caller initialised. Errors every rank raises are printed by rank 0."""
    if not dist.is_initialized() and world_size() == 1:
        yield Processes(0, 1, device)
        return
    with (
        process_group(device, "evaluate", timeout=GROUP_TIMEOUT) as rank_device,
        said_by_rank_zero(),
    ):
        yield Processes(dist.get_rank(), dist.get_world_size(), rank_device)


def launch_evaluation(nproc: int, argv: Sequence[str], device: torch.device) -> int:
    """``generalist eval ARGV`` on ``nproc`` local processes (torchrun); its exit status."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give at least 1 process")
    check_gpus(nproc, device, "--nproc asks for", "evaluate")
    return launch(nproc, argv)


# --------------------------------------------------------------------------- the folder


def shard_counts(folder: Path) -> set[int]:
    """The process counts of the shard state files in ``folder`` (empty: not sharded)."""
    shards = folder / SHARD_FOLDER
    if not shards.is_dir():
        return set()
    found = (SHARD_STATE.match(path.name) for path in shards.iterdir())
    return {int(match.group(2)) for match in found if match}


def holds_evaluation(folder: Path, state_file: str) -> bool:
    """Whether ``folder`` already holds an evaluation, one-process or sharded."""
    return (folder / state_file).exists() or bool(shard_counts(folder))


def check_resumable(folder: Path, state_file: str, processes: int) -> None:
    """Refuse to resume ``folder`` on another number of processes than it was started with."""
    counts = shard_counts(folder)
    if len(counts) > 1:
        raise ConfigError(
            f"resume {folder}: its {SHARD_FOLDER}/ holds states of {sorted(counts)} processes; "
            "keep the files of one run only"
        )
    if counts:
        (count,) = counts
        if count != processes:
            raise ConfigError(
                f"resume {folder}: it was evaluated on {count} processes, so resume it with "
                f"--nproc {count} (or torchrun --nproc-per-node {count}), not {processes}"
            )
    elif not (folder / state_file).is_file():
        raise ConfigError(
            f"resume {folder}: no {state_file} there; pass the folder of an interrupted eval"
        )
    elif processes > 1:
        raise ConfigError(
            f"resume {folder}: it was evaluated in one process, so resume it without --nproc"
        )


# --------------------------------------------------------------------------- running


def run_sharded(
    suite: EvaluationSuite,
    model: nn.Module,
    data: ImageDataset,
    *,
    folder: Path,
    state_file: str,
    identity: dict[str, Any],
    processes: Processes,
    on_progress: Callable[[Progress], None] | None = None,
) -> SuiteResult | None:
    """Run ``suite`` on this process's shard of ``data``; on rank 0, the merged whole result
    (``None`` on the other ranks). One process runs the suite on ``folder/state_file`` as is."""
    whole = folder / state_file
    run = {"identity": identity, "on_progress": on_progress, "device": processes.device}
    if processes.count == 1:
        return suite.run(model, data, state_path=whole, **run)
    n = len(data)
    if n < processes.count:
        raise ConfigError(
            f"{n} examples cannot be split over {processes.count} processes; "
            f"use at most {n} processes or raise --n-examples"
        )
    shard = Shard(processes.rank, processes.count)
    indices = shard.indices(n)
    path = folder / shard.state_name
    path.parent.mkdir(parents=True, exist_ok=True)  # another machine may not have the folder
    try:
        suite.run(
            model,
            data.subset(indices),
            state_path=path,
            indices=indices,
            model_checks=False,
            **{**run, "identity": {**identity, "shard": shard.describe()}},
        )
    except GeneralistError as exc:  # about this shard's own file: each rank says its own
        exc.quiet = False
        raise
    states = processes.gather(json.loads(path.read_text()))
    if states is None:
        return None
    parts = [(Shard(rank, processes.count).indices(n), state) for rank, state in enumerate(states)]
    merged = merge_states(parts, n, suite.full_plan(n, identity))
    write_text_durably(whole, json.dumps(merged) + "\n")
    return suite.run(model, data, state_path=whole, **run)


# --------------------------------------------------------------------------- merging


def merge_states(
    parts: Sequence[tuple[torch.Tensor, dict[str, Any]]], n: int, plan: dict[str, Any]
) -> dict[str, Any]:
    """The one-process state of ``n`` points from finished shard states, each given with its
    points' global indices: masks and AutoAttack's point lists mapped back to global indices,
    seconds, rejections and pass counts summed. The model checks are left for the whole data
    (a shard's ``warnings`` too: the merged run derives them from the merged masks)."""
    merged: dict[str, Any] = {"format": STATE_FORMAT, "plan": plan, "jobs": {}}
    merged["clean"] = {
        **_sum_leaves([_without(s["clean"], "correct") for _, s in parts]),
        "correct": _merged_mask([(idx, s["clean"]["correct"]) for idx, s in parts], n),
    }
    for key in parts[0][1]["jobs"]:
        jobs = [(idx, s["jobs"][key]) for idx, s in parts]
        if "autoattack" in jobs[0][1]:
            aa = [(idx, job["autoattack"]) for idx, job in jobs]
            merged["jobs"][key] = {
                **_sum_leaves([_without(job, "autoattack", "warnings") for _, job in jobs]),
                "autoattack": _merged_autoattack(aa, n),
            }
            continue
        if any(job["done"] != len(idx) for idx, job in jobs):
            raise ConfigError(f"a shard has not finished {key}; resume the evaluation")
        merged["jobs"][key] = {
            **_sum_leaves([_without(job, "done", "robust") for _, job in jobs]),
            "done": n,
            "robust": _merged_mask([(idx, job["robust"]) for idx, job in jobs], n),
        }
    return merged


POSITIONAL = ("n_examples", "clean_correct", "broken_by", "queue", "queue_done", "adversarials")
"""AutoAttack state entries that hold (or count) a shard's own point positions."""


def _merged_autoattack(parts: list[tuple[torch.Tensor, dict[str, Any]]], n: int) -> dict[str, Any]:
    if any(state["queue"] or len(state["finished"]) != len(state["attacks"]) for _, state in parts):
        raise ConfigError("a shard has not finished AutoAttack; resume the evaluation")
    names = parts[0][1]["attacks"]
    return {
        **_sum_leaves([_without(state, *POSITIONAL) for _, state in parts]),
        "n_examples": n,
        "clean_correct": _global([(idx, s["clean_correct"]) for idx, s in parts]),
        "broken_by": {
            name: _global([(idx, s["broken_by"].get(name, [])) for idx, s in parts])
            for name in names
        },
        "queue": [],
        "queue_done": 0,
    }


def _global(parts: list[tuple[torch.Tensor, list[int]]]) -> list[int]:
    """Shard positions mapped to global indices, in increasing order (as one process lists them)."""
    return sorted(int(idx[pos]) for idx, positions in parts for pos in positions)


def _merged_mask(parts: list[tuple[torch.Tensor, str]], n: int) -> str:
    mask = torch.zeros(n, dtype=torch.bool)
    for idx, text in parts:
        mask[idx] = decode_mask(text)
    return encode_mask(mask)


def _without(entry: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in keys}


def _sum_leaves(values: list[Any]) -> Any:
    """Dicts merged key by key, numbers summed, anything else (names, lists of stages) kept if
    every shard agrees on it: shard states differ only in their points and their costs."""
    if all(isinstance(v, dict) for v in values):
        keys = list(dict.fromkeys(k for v in values for k in v))
        return {k: _sum_leaves([v[k] for v in values if k in v]) for k in keys}
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return sum(values)
    if any(v != values[0] for v in values):
        raise ConfigError(
            f"the shard states disagree ({cut(values[0])} vs {cut(values[1:])}); they come from "
            "different evaluations: start a new --out"
        )
    return values[0]
