"""``manifest.json``: what produced a run, so its numbers can be trusted and compared.

Written when a run starts: the command line, software versions, device, seeds, the resolved
config, a SHA-256 fingerprint of every data split, and the git commit of the code (with a
``dirty`` flag) when generalist runs from a checkout. Every resume appends an entry, and a
change of software since the start is pointed out, since it may change the last bits.
"""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import generalist
from generalist.backends import backend_flags
from generalist.config import Config
from generalist.data import DataSplits
from generalist.devices import resolve_precision, software_versions
from generalist.rundir import RunDir

MANIFEST_FORMAT = "generalist-manifest/1"


def data_fingerprints(splits: DataSplits) -> dict[str, dict[str, Any]]:
    """Example count and SHA-256 of each split: which data a run saw, to the bit."""
    named = (("train", splits.train), ("val", splits.val), ("test", splits.test))
    return {name: {"examples": len(s), "fingerprint": s.fingerprint()} for name, s in named}


def build_manifest(
    config: Config,
    device: torch.device,
    dataset: str,
    fingerprints: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "created": _now(),
        "command": shlex.join(sys.argv),
        "software": software_versions(),
        "device": describe_device(device),
        "precision": resolve_precision(config.precision, device),
        "backends": backend_flags(),
        "host": platform.node(),
        "git": git_revision(),
        "seeds": {"seed": config.seed, "split_seed": config.data.split_seed},
        "data": {"dataset": dataset, "data_dir": config.data.data_dir, **fingerprints},
        "config": config.to_dict(),
        "resumes": [],
    }


def write_manifest(run: RunDir, manifest: dict[str, Any]) -> None:
    run.write_json(run.manifest_path.name, manifest)


def note_resume(run: RunDir, checkpoint: Path | None, echo: Any) -> None:
    """Append this resume to the manifest; say so when the software changed since the start."""
    try:
        manifest = json.loads(run.manifest_path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, RecursionError):
        echo(f"note: {run.manifest_path} is missing or unreadable; recording the resume afresh")
        manifest = {"format": MANIFEST_FORMAT, "resumes": []}
    software = software_versions()
    changed = {
        name: (manifest.get("software", {}).get(name), version)
        for name, version in software.items()
        if manifest.get("software", {}).get(name) not in (None, version)
    }
    if changed:
        what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
        echo(f"note: {what} since this run started; the result may differ in the last bits")
    started = manifest.get("device", {})
    kernels = cpu_kernels()
    if started.get("type") == "cpu" and started.get("kernels") not in (None, kernels):
        echo(
            f"note: torch's CPU kernels are {kernels} here, {started['kernels']} where this run "
            "started; the result may differ in the last bits from the first step on"
        )
    threads = torch.get_num_threads()
    if started.get("type") == "cpu" and started.get("threads") not in (None, threads):
        echo(
            f"note: {threads} CPU threads now, {started['threads']} when this run started; the "
            f"result may differ in the last bits (--threads {started['threads']} to match)"
        )
    manifest.setdefault("resumes", []).append(
        {
            "time": _now(),
            "command": shlex.join(sys.argv),
            "checkpoint": checkpoint.name if checkpoint else None,
            "software": software,
            "threads": threads,
            "git": git_revision(),
        }
    )
    write_manifest(run, manifest)


def describe_device(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(index),
            "capability": list(torch.cuda.get_device_capability(index)),
            "count": torch.cuda.device_count(),
        }
    return {
        "type": device.type,
        "name": platform.processor() or platform.machine(),
        "model": cpu_model(),
        "kernels": cpu_kernels(),
        "threads": torch.get_num_threads(),
    }


def cpu_kernels() -> str:
    """The instruction set torch's CPU kernels dispatch to (e.g. AVX512, AVX2). It sets how sums
    are split into vector lanes, so two machines that differ in it round differently and the
    same run, seed and build drift apart from the first step (measured: RESULTS.md §1, §2)."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return capability() if capability is not None else "unknown"


def cpu_model() -> str | None:
    """The processor's marketing name (Linux /proc/cpuinfo); None where it is not readable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        return None
    return None


def git_revision() -> dict[str, Any] | None:
    """The commit generalist's own source is at, when it runs from a git checkout.

    The package file must be tracked, so an installed copy inside some other repository (a
    virtual environment in a project folder) is not mistaken for that repository's code.
    """
    source = Path(generalist.__file__).resolve().parent
    try:
        _git(source, "ls-files", "--error-unmatch", "__init__.py")
        commit = _git(source, "rev-parse", "HEAD")
        dirty = bool(_git(source, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
