"""How CUDA's numerical back ends are set for a run: TF32, cuDNN autotuning, determinism.

Three defaults of PyTorch on a GPU matter to adversarial training and evaluation:

* **TF32.** On Ampere and newer GPUs cuDNN runs fp32 convolutions as TF32 (10-bit mantissa)
  unless told otherwise. generalist promises that validation, test and ``generalist eval``
  run in IEEE fp32, so that a robust accuracy is never an artefact of rounding, and that
  ``precision: fp32`` training is fp32: :func:`configure` switches TF32 off for the run and
  :func:`for_evaluation` guarantees it around every evaluation, whoever changed the flags.
  Speed comes from ``precision: bf16`` instead, which is faster than TF32 and says so.
* **cuDNN autotuning.** A training run feeds the same shapes step after step, so
  ``cudnn.benchmark`` pays its one-off search back many times over; it picks kernels by
  timing, so two runs may take different kernels and differ in the last bits. Evaluations,
  whose batch sizes vary, run without it.
* **Determinism.** ``deterministic: true`` turns autotuning off, asks cuDNN for deterministic
  kernels, sets ``CUBLAS_WORKSPACE_CONFIG`` (cuBLAS needs it before its first call) and makes
  PyTorch raise on any operation without a deterministic CUDA kernel. generalist's own code
  has none on the paths it runs (adaptive average pooling's backward, the only one in the
  models, is replaced by a plain mean where the pooled output is 1×1; the attacks' ``cumsum``
  runs on integers or in the forward direction, both deterministic), so a raise names a
  user-supplied model or task.

What a CUDA resume guarantees: with ``deterministic: true``, a run killed and resumed on the
same GPU model, driver and software ends bit-identical to one that never stopped (tested by
``tests/test_cuda.py`` when a GPU is present); without it, the resumed run follows the same
data, random starts and schedules, and differs only by the rounding of the kernels cuDNN
picked, which is not bounded in general (it compounds over steps; ``benchmarks/device_check.py``
measures it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

CUBLAS_WORKSPACE = ":4096:8"
"""The cuBLAS workspace setting that makes its matrix products deterministic (CUDA docs)."""


def configure(device: torch.device, *, deterministic: bool) -> None:
    """Set the back ends for a run on ``device``: IEEE fp32, autotuning or determinism.

    Called once at the start of a run, before the first CUDA kernel: cuBLAS reads its
    workspace setting when it starts.
    """
    _set_tf32(False)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic


@contextmanager
def for_evaluation() -> Iterator[None]:
    """Inside: IEEE fp32 matrix products and convolutions, never TF32, and no cuDNN autotuning.

    Evaluation attacks only the points still classified correctly, so its batch sizes vary
    from batch to batch, and autotuning would search again for every new size.
    """
    saved = _tf32(), torch.backends.cudnn.benchmark
    _set_tf32(False)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        _set_tf32(*saved[0])
        torch.backends.cudnn.benchmark = saved[1]


def backend_flags() -> dict[str, Any]:
    """What the manifest records: the settings that decide a GPU run's last bits."""
    matmul, conv = _tf32()
    flags: dict[str, Any] = {
        "tf32_matmul": matmul,
        "tf32_conv": conv,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
    if torch.backends.cudnn.is_available():
        flags["cudnn_version"] = torch.backends.cudnn.version()
    return flags


def _has_precision_api() -> bool:
    """torch >= 2.9 sets TF32 per back end by name; mixing it with the older ``allow_tf32``
    flags makes torch raise when they are read, so only one of the two is used."""
    return hasattr(torch.backends.cudnn, "conv") and hasattr(
        torch.backends.cuda.matmul, "fp32_precision"
    )


def _tf32() -> tuple[bool, bool]:
    """(matrix products may use TF32, convolutions may use TF32)."""
    if _has_precision_api():
        return (
            torch.backends.cuda.matmul.fp32_precision == "tf32",
            torch.backends.cudnn.conv.fp32_precision == "tf32",
        )
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set_tf32(matmul: bool, conv: bool | None = None) -> None:
    conv = matmul if conv is None else conv
    if _has_precision_api():
        torch.backends.cuda.matmul.fp32_precision = "tf32" if matmul else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if conv else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = conv
