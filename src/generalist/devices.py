"""The device a command runs on, and the training precision on it.

``resolve_device`` is the one reading of ``--device`` / ``device:`` (train and eval alike).

Training precision: bf16 autocast where the hardware multiplies bf16 natively, else fp32.

bf16 autocast is what makes adversarial training affordable: on a CPU with AMX tiles it ran a
ResNet-18 PGD-10 training step 3.4x faster than fp32 (BENCHMARKS.md), and Ampere-or-newer GPUs
double their tensor-core rate with it. Where bf16 is only emulated (CPUs without AMX or
AVX-512-BF16, older GPUs) it is slower than fp32, so ``auto`` asks the hardware. Only the
training steps (the training attack included) use it; validation, test and ``generalist eval``
stay in fp32 so that a reported robust accuracy is never an artefact of rounding.
"""

from __future__ import annotations

import contextlib
import platform
from importlib import metadata

import numpy
import torch

import generalist
from generalist.errors import ConfigError, cut

PRECISIONS = ("fp32", "bf16", "auto")


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto`` (the GPU if one is visible), ``cpu``, ``cuda`` or ``cuda:N``; ``key`` names the
    option in the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}: {cut(name)} is not a device; use auto, cpu or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: CUDA was asked for but no GPU is visible; use --device cpu")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ConfigError(
                f"{key}: {name} asks for GPU {device.index}, but {count} "
                f"{'is' if count == 1 else 'are'} visible (cuda:0 to cuda:{count - 1})"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"{key}: mps (Apple's GPU) is not available on this machine; use --device cpu or auto"
        )
    return device


def has_fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matrix products natively (not by emulation)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)  # Ampere and newer
    if device.type == "cpu":
        # Private probes (torch >= 2.3); an older torch simply keeps fp32.
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: what a run asking for ``precision`` trains in on ``device``."""
    if precision == "auto":
        return "bf16" if has_fast_bf16(device) else "fp32"
    return precision


def training_autocast(
    precision: str, device: torch.device
) -> torch.autocast | contextlib.nullcontext:
    """The context the training steps run in (``precision`` already resolved)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def software_versions() -> dict[str, str]:
    """What a manifest or an evaluation record names to make its numbers reproducible."""
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "generalist": generalist.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
    with contextlib.suppress(metadata.PackageNotFoundError):
        versions["safetensors"] = metadata.version("safetensors")
    return versions
