"""Whether a checkpoint that reads back intact also *fits* this run, checked before loading.

A checkpoint's hashes prove it is the file that was written, not that what was written is a
training state of this run: a hand-edited or foreign checkpoint can carry a momentum buffer of
the wrong shape, an fp16 weight, a generator state of the wrong size, a position past the end
of the epoch or a missing RNG entry. Loaded, these crash every resume or, worse, continue
silently from a different state. So every tensor is compared with the live run's own (names,
shapes, dtypes), optimizer entries with the parameters they belong to, and every scalar with
the range it must lie in; the first problem is returned as text, and the caller sets the
checkpoint aside like a damaged one.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from generalist.errors import CheckpointError
from generalist.training.state import TrainingState, capture
from generalist.weights import check_same_layout, describe_layout

OPTIMIZER_STATE = {
    "sgd": {"momentum_buffer"},
    "adam": {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"},
    "adamw": {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"},
}
"""The per-parameter tensors each optimizer keeps (``step`` is a scalar)."""
_PYTHON_RNG_WORDS = 625
_NUMPY_RNG_WORDS = 624
CUDA_RNG = "rng/cuda"
BEST = "best/"


def layout_problem(state: TrainingState, tensors: dict[str, torch.Tensor], meta: Any) -> str:
    """What does not fit ``state`` in a checkpoint's ``tensors`` and ``meta``; "" if all does."""
    try:
        _check_meta(state, meta)
        _check_tensors(state, tensors, meta)
    except (_Misfit, CheckpointError) as misfit:
        return str(misfit)
    return ""


class _Misfit(Exception):
    pass


def _require(condition: bool, problem: str) -> None:
    if not condition:
        raise _Misfit(problem)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_meta(state: TrainingState, meta: Any) -> None:
    batches = state.epoch_losses.shape[0]
    position = meta.get("position")
    _require(isinstance(position, dict), "has no position")
    epoch, batch, step = (position.get(k) for k in ("epoch", "batch", "step"))
    _require(
        all(_is_int(v) for v in (epoch, batch, step)), "has a position that is not whole numbers"
    )
    _require(
        epoch >= 1 and 0 <= batch <= batches,
        f"has position epoch {epoch} batch {batch} outside the run's {batches} batches per epoch",
    )
    _require(
        step == (epoch - 1) * batches + batch,
        f"has step {step}, which is not epoch {epoch} batch {batch} of {batches}-batch epochs",
    )
    metrics = meta.get("metrics")
    _require(
        isinstance(metrics, list)
        and len(metrics) == epoch - 1
        and all(isinstance(r, dict) for r in metrics),
        f"does not hold one metrics record per finished epoch ({epoch - 1})",
    )
    _require(isinstance(meta.get("val"), dict), "has no validation record")
    _require(isinstance(meta.get("config"), dict), "has no config")
    learners = meta.get("learners")
    _require(
        isinstance(learners, list)
        and len(learners) == len(state.learners)
        and all(isinstance(e, dict) for e in learners),
        f"does not describe this run's {len(state.learners)} learners",
    )
    for entry, learner in zip(learners, state.learners, strict=True):
        _require(entry.get("name") == learner.name, f"has no entry for learner {learner.name}")
        optimizer = entry.get("optimizer")
        _require(
            isinstance(optimizer, dict)
            and isinstance(optimizer.get("param_groups"), list)
            and len(optimizer["param_groups"]) == len(learner.optimizer.param_groups)
            and all(isinstance(g, dict) for g in optimizer["param_groups"])
            and isinstance(optimizer.get("state"), dict),
            f"has an optimizer record for {learner.name} that does not fit its optimizer",
        )
        count = len(_parameters(learner.optimizer))
        for index, scalars in optimizer["state"].items():
            _require(
                str(index).isdigit() and int(index) < count and isinstance(scalars, dict),
                f"has optimizer state for parameter {str(index)[:12]} of {learner.name}, "
                f"which has {count}",
            )
    _require(meta.get("generator_device") in ("cpu", "cuda", "mps"), "names no generator device")
    _check_rng(meta.get("rng"))


def _check_rng(rng: Any) -> None:
    _require(isinstance(rng, dict), "has no RNG states")
    python = rng.get("python")
    _require(
        isinstance(python, list)
        and len(python) == 3
        and _is_int(python[0])
        and isinstance(python[1], list)
        and len(python[1]) == _PYTHON_RNG_WORDS
        and all(_is_int(w) and 0 <= w < 2**32 for w in python[1][:-1])
        and _is_int(python[1][-1])
        and 0 <= python[1][-1] <= _NUMPY_RNG_WORDS
        and (python[2] is None or isinstance(python[2], numbers.Real)),
        "has a malformed Python RNG state",
    )
    numpy = rng.get("numpy")
    _require(
        isinstance(numpy, list)
        and len(numpy) == 5
        and numpy[0] == "MT19937"
        and isinstance(numpy[1], list)
        and len(numpy[1]) == _NUMPY_RNG_WORDS
        and all(_is_int(w) and 0 <= w < 2**32 for w in numpy[1])
        and _is_int(numpy[2])
        and 0 <= numpy[2] <= _NUMPY_RNG_WORDS
        and _is_int(numpy[3])
        and isinstance(numpy[4], numbers.Real),
        "has a malformed NumPy RNG state",
    )


def _check_tensors(
    state: TrainingState, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    expected, _ = capture(state)
    expected = {k: v for k, v in expected.items() if not _is_variable(k)}
    fixed = {k: v for k, v in tensors.items() if not _is_variable(k)}
    check_same_layout(expected, fixed, "does not fit this run")
    for index, learner in enumerate(state.learners):
        parameters = _parameters(learner.optimizer)
        kind = type(learner.optimizer).__name__.lower()  # sgd, adam, adamw
        prefix = f"learners/{index}/optimizer/"
        for name, tensor in tensors.items():
            if not name.startswith(prefix):
                continue
            position, _, key = name[len(prefix) :].partition("/")
            _require(
                position.isdigit()
                and int(position) < len(parameters)
                and key in OPTIMIZER_STATE.get(kind, set()),
                f"holds {name[:80]}, which {learner.name}'s {kind} optimizer has no place for",
            )
            parameter = parameters[int(position)]
            want = (
                (torch.Size([]), torch.float32)
                if key == "step"
                else (parameter.shape, parameter.dtype)
            )
            _require(
                (tensor.shape, tensor.dtype) == want,
                f"holds {name} as {describe_layout(tensor.shape, tensor.dtype)} where "
                f"{describe_layout(*want)} is expected",
            )
    _check_best(state, tensors, meta)
    for name, tensor in tensors.items():
        if _is_cuda_rng(name):
            _require(
                (name == CUDA_RNG or name[len(CUDA_RNG) + 1 :].isdigit())
                and tensor.dtype == torch.uint8
                and tensor.dim() == 1
                and tensor.numel() > 0,
                f"holds a malformed CUDA RNG state {name[:40]}",
            )


def _check_best(state: TrainingState, tensors: dict[str, torch.Tensor], meta: Any) -> None:
    """The best model so far (model selection): a copy of the global model, with its record."""
    best = {k[len(BEST) :]: v for k, v in tensors.items() if k.startswith(BEST)}
    record = meta.get("best")  # absent in checkpoints written before model selection
    if record is None:
        _require(not best, "holds best-model weights but no record of them")
        return
    _require(
        isinstance(record, dict)
        and _is_int(record.get("epoch"))
        and isinstance(record.get("score"), numbers.Real)
        and isinstance(record.get("val"), dict),
        "has a malformed best-model record",
    )
    check_same_layout(
        state.merge.global_model.state_dict(), best, "has a best model that does not fit this run"
    )


def _is_cuda_rng(name: str) -> bool:
    """``rng/cuda`` (the run's own GPU, CUDA runs only) or an older checkpoint's
    ``rng/cuda/<index>`` per visible GPU, which still resume."""
    return name == CUDA_RNG or name.startswith(f"{CUDA_RNG}/")


def _is_variable(name: str) -> bool:
    """Entries a fresh state may lack or a checkpoint may hold in either layout: optimizer
    buffers appear at the first step, the best model at the first selection, CUDA RNG states
    depend on the run's device and age."""
    return _is_cuda_rng(name) or name.startswith(BEST) or "/optimizer/" in name


def _parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]
