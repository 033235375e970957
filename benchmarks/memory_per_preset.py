"""Persistent training-state memory of every method preset: what K learners really cost.

A Generalist run keeps, per base learner, its model, its gradients and its optimizer state, plus
one EMA teacher per learner and the global model (CURE adds its revision copy). Activations are
not multiplied by K: learners step one after another on the same batch, so the activation peak
is one learner's. This script builds each preset's learners exactly as ``generalist train``
does, runs one optimizer step on zero gradients so lazily created optimizer state exists, and
adds up the distinct tensor storages. It needs no data and no GPU, so the figures are exact for
any device (fp32 state; autocast does not change stored state).

    .venv/bin/python benchmarks/memory_per_preset.py --model resnet18 --model wrn-34-10
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from generalist.config import build_config
from generalist.models import create_model
from generalist.models.registry import count_parameters
from generalist.presets import list_presets
from generalist.training.generalist import GeneralistMerge
from generalist.training.learner import Learner
from generalist.training.loop import build_learners

CIFAR10_SPEC = {"num_classes": 10, "in_channels": 3, "image_size": 32, "mean": None, "std": None}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="architecture(s); default resnet18")
    parser.add_argument("--presets", default="", help="comma-separated; default all but quickstart")
    return parser.parse_args()


def module_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.state_dict().values()


def learner_tensors(learner: Learner) -> Iterator[torch.Tensor]:
    """Model, gradients, optimizer state, and any model copy the task keeps (CURE's revision)."""
    yield from module_tensors(learner.model)
    yield from (p.grad for p in learner.model.parameters() if p.grad is not None)
    for state in learner.optimizer.state.values():
        yield from (v for v in state.values() if torch.is_tensor(v))
    revision = getattr(learner.task, "revision", None)
    if revision is not None:
        yield from module_tensors(revision.model)


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views are not counted twice)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure(preset: str, model: str) -> tuple[int, int, int]:
    """(learners, bytes of the learners' own state, bytes of teachers + global)."""
    config = build_config(preset, dataset="cifar10", overrides=[f"model.name={model}"])
    spec = {"name": model, **CIFAR10_SPEC}
    learners, global_model = build_learners(config, spec, torch.device("cpu"))
    merge = GeneralistMerge([lr.model for lr in learners], global_model)
    for learner in learners:
        for p in learner.model.parameters():
            p.grad = torch.zeros_like(p)
        learner.optimizer.step()
    own = storage_bytes(t for lr in learners for t in learner_tensors(lr))
    merged = storage_bytes(
        t for m in [*merge.teachers, merge.global_model] for t in module_tensors(m)
    )
    return len(learners), own, merged


def main() -> None:
    args = parse_args()
    models = args.model or ["resnet18"]
    presets = [p for p in args.presets.split(",") if p] or [
        p for p in list_presets() if p != "quickstart"
    ]
    print("| model | preset | K | learners (MB) | teachers + global (MB) | total (MB) | x model |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for model in models:
        spec = {k: v for k, v in CIFAR10_SPEC.items() if v is not None}
        single = storage_bytes(module_tensors(create_model(model, **spec)))
        for preset in presets:
            k, own, merged = measure(preset, model)
            total = own + merged
            print(
                f"| {model} | {preset} | {k} | {own / 2**20:.0f} | {merged / 2**20:.0f} "
                f"| {total / 2**20:.0f} | {total / single:.1f} |"
            )
        params = count_parameters(create_model(model, **spec))
        print(
            f"| {model} | (one model: {params / 1e6:.1f} M parameters) | | | | "
            f"{single / 2**20:.0f} | 1.0 |"
        )


if __name__ == "__main__":
    main()
