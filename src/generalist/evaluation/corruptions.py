"""The common-corruptions track: accuracy per corruption × severity, resumable, per point.

The evaluated points are those of the ℓp evaluation (the split's first ``--n-examples``);
point i of a cell is the corrupted version of point i, so a cell's accuracy compares with the
clean accuracy on the very same images. Three sources of corrupted images:

* a CIFAR-10-C / CIFAR-100-C folder: the reference protocol (RobustBench ``eval.py``): the
  first N images of every severity block of every corruption, the plain mean over the 75
  cells. With the whole 10,000-image test set it is the number RobustBench reports;
* an ImageNet-C folder: the same over the corruptions present, images streamed from disk;
* ``generated``: :mod:`generalist.data.corruptions` at run time (14 of the 15; frost is left
  out and said so in every output), deterministic per (seed, corruption, severity, index).
  This is *not* CIFAR-10-C: other noise, other random directions.

State: one job per cell in a state file (the suite's format), saved after every
batch; a resume skips what is done. Corrupted pixels depend on the image index only, so the
batch size may change between a run and its resume.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from generalist import backends
from generalist.data import to_float
from generalist.data.corruption_sets import (
    corruption_set_kind,
    read_cifar_c,
    read_imagenet_c,
)
from generalist.data.corruptions import (
    CORRUPTIONS,
    GENERATED,
    LEFT_OUT,
    SEVERITIES,
    corrupt_images,
    profile_for,
)
from generalist.errors import ConfigError
from generalist.evaluation.suite import Progress, SuiteState, decode_mask, encode_mask
from generalist.inference import eval_mode, predicts_correctly

GENERATED_SOURCE = "generated"
MODEL_INFO_FILE = "model_info_corruptions.json"
REFERENCE_EXAMPLES = 10_000
"""The CIFAR-10/100 test set: the reference number uses all of it."""


# --------------------------------------------------------------------------- sources


@dataclass
class CorruptedCells:
    """Where the corrupted images of each cell come from, and what to record about it."""

    description: dict[str, Any]
    corruptions: tuple[str, ...]
    batch: Callable[[str, int, int, int], tuple[torch.Tensor, torch.Tensor]]
    """(corruption, severity, start, stop) → (uint8 images, int64 labels)."""
    left_out: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def corrupted_cells(
    source: str, data: Any, *, seed: int, image_shape: Sequence[int], num_classes: int
) -> CorruptedCells:
    """The cells for ``--corruptions SOURCE`` over ``data`` (the evaluated clean points);
    ``image_shape`` (C, H, W) and ``num_classes`` are the model's."""
    if source == GENERATED_SOURCE:
        return _generated_cells(data, seed, image_shape)
    if corruption_set_kind(source) == "cifar-c":
        return _cifar_c_cells(source, data)
    return _imagenet_c_cells(source, data, image_shape, num_classes)


def _generated_cells(data: Any, seed: int, image_shape: Sequence[int]) -> CorruptedCells:
    """Corrupted at run time, per point, at the profile of the model's image size."""
    profile = profile_for(image_shape[-1])

    def generated(corruption: str, severity: int, start: int, stop: int):
        clean = data.images[start:stop]
        images = corrupt_images(
            clean, corruption, severity, seed=seed, indices=range(start, stop), profile=profile
        )
        return images, data.labels[start:stop].cpu()

    description = {"kind": "generated", "profile": profile, "seed": seed}
    return CorruptedCells(description, GENERATED, generated, left_out=dict(LEFT_OUT))


def _cifar_c_cells(source: str, data: Any) -> CorruptedCells:
    """A CIFAR-10-C/-100-C folder's first N images of each severity, with its own labels (a
    warning when they are not the split's)."""
    n = len(data)
    folder = read_cifar_c(source)
    if n > folder.per_severity:
        raise ConfigError(
            f"{source} holds {folder.per_severity} images per severity but {n} points are "
            f"evaluated; pass --n-examples {folder.per_severity} or less"
        )
    labels = torch.from_numpy(folder.labels[:n].copy())
    differ = int((labels != data.labels[:n].cpu()).sum())
    warnings = (
        [
            f"labels.npy differs from the evaluated split's labels at {differ} of {n} points: "
            "the folder is not this dataset's test set in its order, so 'relative to clean' "
            "compares different images"
        ]
        if differ
        else []
    )

    def published(corruption: str, severity: int, start: int, stop: int):
        return folder.cell(corruption, severity, start, stop), labels[start:stop]

    description = {
        "kind": "cifar-c",
        "path": str(Path(source).resolve()),
        "per_severity": folder.per_severity,
    }
    return CorruptedCells(description, CORRUPTIONS, published, warnings=warnings)


def _imagenet_c_cells(
    source: str, data: Any, image_shape: Sequence[int], num_classes: int
) -> CorruptedCells:
    """An ImageNet-C folder's images, decoded from disk as they are needed, over the
    corruptions it holds."""
    n = len(data)
    folder_c = read_imagenet_c(source)
    if len(folder_c.classes) != num_classes:
        raise ConfigError(
            f"{source} has {len(folder_c.classes)} class folders but the model has "
            f"{num_classes} classes; its class folders must be the dataset's (sorted names)"
        )

    def streamed(corruption: str, severity: int, start: int, stop: int):
        files, labels = folder_c.cell_files(corruption, severity)
        if len(files) < n:
            raise ConfigError(
                f"{folder_c.folder / corruption / str(severity)} holds {len(files)} images but "
                f"{n} points are evaluated; pass --n-examples {len(files)} or less"
            )
        images = folder_c.decode(files[start:stop], image_shape[0], image_shape[-1])
        return images, torch.tensor(labels[start:stop])

    absent = {name: "not in the folder" for name in CORRUPTIONS if name not in folder_c.corruptions}
    description = {
        "kind": "imagenet-c",
        "path": str(Path(source).resolve()),
        "classes": len(folder_c.classes),
    }
    return CorruptedCells(description, folder_c.corruptions, streamed, left_out=absent)


# --------------------------------------------------------------------------- running


@dataclass
class CorruptionOutcome:
    clean: torch.Tensor
    """bool [N]: the evaluated points the model classifies right, uncorrupted."""
    cells: dict[tuple[str, int], torch.Tensor]
    """(corruption, severity) → bool [N]: right on the corrupted point."""
    seconds: float
    clean_seconds: float
    batch_size: int
    cells_source: CorruptedCells


def run_corruptions(
    model: nn.Module,
    data: Any,
    source: str,
    *,
    seed: int,
    batch_size: int,
    image_shape: Sequence[int],
    num_classes: int,
    state_path: Path | None,
    identity: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    on_progress: Callable[[Progress], None] | None = None,
    progress: bool = False,
) -> CorruptionOutcome:
    """Classify every cell's corrupted points (and the clean ones), resuming from ``state_path``."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if len(data) == 0:
        raise ConfigError("there are no examples to evaluate; raise --n-examples")
    device = torch.device(device)
    cells = corrupted_cells(
        source, data, seed=seed, image_shape=image_shape, num_classes=num_classes
    )
    plan = {"corruptions": cells.description, "n_examples": len(data), **(identity or {})}
    state = SuiteState(state_path, _json(plan))
    n = len(data)
    total = n * (1 + len(cells.corruptions) * len(SEVERITIES))
    done_before = sum(job["done"] for job in state.jobs.values())
    results: dict[tuple[str, int], torch.Tensor] = {}
    with (
        eval_mode(model, freeze=True),
        backends.for_evaluation(),
        tqdm(total=total, initial=done_before, unit="img", disable=not progress) as bar,
    ):
        jobs = _Jobs(model, state, n, batch_size, device, bar, on_progress)
        clean = jobs.classify("clean", lambda a, b: (data.images[a:b], data.labels[a:b].cpu()))
        for corruption in cells.corruptions:
            for severity in SEVERITIES:
                results[(corruption, severity)] = jobs.classify(
                    f"{corruption}/{severity}",
                    lambda a, b, c=corruption, s=severity: cells.batch(c, s, a, b),
                )
    seconds = sum(job["seconds"] for job in state.jobs.values())
    return CorruptionOutcome(
        clean, results, seconds, state.jobs["clean"]["seconds"], batch_size, cells
    )


@dataclass
class _Jobs:
    """Classifies each job's points batch by batch, saving the state after every batch."""

    model: nn.Module
    state: SuiteState
    n: int
    batch_size: int
    device: torch.device
    bar: tqdm
    on_progress: Callable[[Progress], None] | None

    def classify(
        self, key: str, batch: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """bool [N]: whether the model is right on each point of job ``key``, whose points
        ``[start, stop)`` ``batch`` gives; from where the saved state left off."""
        job = self.state.job(key)
        correct = decode_mask(job["robust"])
        for start in range(job["done"], self.n, self.batch_size):
            stop = min(start + self.batch_size, self.n)
            began = time.perf_counter()
            images, labels = batch(start, stop)
            x = to_float(images).to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            right = predicts_correctly(self.model, x, labels).cpu()
            correct = torch.cat([correct, right])
            job.update(
                done=stop,
                robust=encode_mask(correct),
                seconds=job["seconds"] + time.perf_counter() - began,
            )
            self.state.save()
            self.bar.update(stop - start)
            if self.on_progress is not None:
                self.on_progress(Progress("corruptions", key, stop, self.n))
        return correct


def _json(plan: dict[str, Any]) -> dict[str, Any]:
    """Normalised through JSON, so it compares equal to the plan read back from the file."""
    return json.loads(json.dumps(plan))


# --------------------------------------------------------------------------- the record


def _percent(mask: torch.Tensor) -> float:
    return round(100.0 * float(mask.float().mean()), 4) if mask.numel() else 0.0


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4)


def _relative(accuracy: float, clean: float) -> float | None:
    """Share of the clean accuracy kept, in percent (None when the clean accuracy is 0)."""
    return round(100.0 * accuracy / clean, 4) if clean else None


def corruption_section(outcome: CorruptionOutcome) -> dict[str, Any]:
    """The ``corruptions`` entry of ``eval.json``: every cell, the means and what is left out.

    ``mean`` is the reference's number: the plain mean of the cell accuracies (each cell has
    the same N points, so it is also the accuracy over all corrupted points)."""
    n = int(outcome.clean.numel())
    clean = _percent(outcome.clean)
    cells = [
        {
            "corruption": c,
            "severity": s,
            "accuracy": _percent(mask),
            "count": int(mask.sum()),
        }
        for (c, s), mask in outcome.cells.items()
    ]
    source = outcome.cells_source
    per_corruption = {
        c: _mean([cell["accuracy"] for cell in cells if cell["corruption"] == c])
        for c in source.corruptions
    }
    per_severity = {
        str(s): _mean([cell["accuracy"] for cell in cells if cell["severity"] == s])
        for s in SEVERITIES
    }
    mean = _mean([cell["accuracy"] for cell in cells])
    reference = (
        source.description["kind"] == "cifar-c"
        and n == source.description["per_severity"] == REFERENCE_EXAMPLES
    )
    return {
        "source": source.description,
        "n_examples": n,
        "reference_protocol": reference,
        "covered": list(source.corruptions),
        "left_out": dict(source.left_out),
        "clean": {"accuracy": clean, "count": int(outcome.clean.sum())},
        "mean": mean,
        "mean_relative_to_clean": _relative(mean, clean),
        "per_corruption": {
            c: {"accuracy": acc, "relative_to_clean": _relative(acc, clean)}
            for c, acc in per_corruption.items()
        },
        "per_severity": per_severity,
        "cells": cells,
        "warnings": list(source.warnings),
        "seconds": round(outcome.seconds, 3),
    }


def corruption_markdown(section: dict[str, Any]) -> str:
    """A corruption × severity table with per-corruption means, then the overall lines."""
    source = section["source"]
    what = {
        "generated": f"generated at run time ({source.get('profile')} constants, seed "
        f"{source.get('seed')}); not CIFAR-10-C",
        "cifar-c": f"CIFAR-C folder {source.get('path')}",
        "imagenet-c": f"ImageNet-C folder {source.get('path')}",
    }[source["kind"]]
    lines = [
        f"### Common corruptions, {section['n_examples']} points, {what}",
        "",
        "| corruption | " + " | ".join(f"s{s}" for s in SEVERITIES) + " | mean | % of clean |",
        "| --- |" + " ---: |" * (len(SEVERITIES) + 2),
    ]
    accuracy = {(c["corruption"], c["severity"]): c["accuracy"] for c in section["cells"]}
    for name in section["covered"]:
        entry = section["per_corruption"][name]
        row = [f"{accuracy[(name, s)]:.2f}" for s in SEVERITIES]
        lines.append(
            f"| {name} | "
            + " | ".join(row)
            + f" | {entry['accuracy']:.2f} | {_or_dash(entry['relative_to_clean'])} |"
        )
    severity = [f"{section['per_severity'][str(s)]:.2f}" for s in SEVERITIES]
    lines.append(
        "| **mean** | "
        + " | ".join(severity)
        + f" | **{section['mean']:.2f}** | {_or_dash(section['mean_relative_to_clean'])} |"
    )
    lines += [
        "",
        f"Clean accuracy on the same points: {section['clean']['accuracy']:.2f} %. "
        f"Mean over the {len(section['cells'])} cells: {section['mean']:.2f} %"
        + (" (the reference protocol)." if section["reference_protocol"] else "."),
    ]
    for name, why in section["left_out"].items():
        lines.append(f"- left out: {name} ({why})")
    for warning in section["warnings"]:
        lines.append(f"- warning: {warning}")
    return "\n".join(lines)


def _or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def corruption_model_info(
    section: dict[str, Any], *, dataset: str, name: str, architecture: str
) -> dict[str, Any]:
    """RobustBench's ``model_info/<dataset>/corruptions/<Name>.json`` fields."""
    footnotes = []
    if not section["reference_protocol"]:
        footnotes.append(
            f"{section['n_examples']} points, {section['source']['kind']} corruptions"
            + (
                " (generated at run time, not CIFAR-10-C)"
                if section["source"]["kind"] == GENERATED_SOURCE
                else ""
            )
        )
    if section["left_out"]:
        footnotes.append("left out: " + ", ".join(section["left_out"]))
    return {
        "link": "",
        "name": name,
        "authors": "",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": dataset,
        "venue": "",
        "architecture": architecture,
        "eps": None,
        "clean_acc": f"{section['clean']['accuracy']:.2f}",
        "reported": None,
        "corruptions_acc": f"{section['mean']:.2f}",
        "footnote": "; ".join(footnotes),
    }
