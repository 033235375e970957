"""Speed settings change how fast a run is, never what it computes beyond float rounding.

``precision: auto`` picks bf16 only where the hardware multiplies bf16 natively;
``model.channels_last`` stores weights and batches in NHWC.
"""

from __future__ import annotations

import pytest
import torch
from training_runs import train_tiny

from generalist import devices
from generalist.config import build_config
from generalist.errors import ConfigError
from generalist.training import loop
from generalist.weights import load_model

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")],
)
def test_auto_on_the_cpu_follows_the_bf16_instructions(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert devices.resolve_precision("auto", torch.device("cpu")) == expected


def test_auto_on_a_gpu_needs_ampere_or_newer(monkeypatch):
    for capability, expected in (((7, 0), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d, c=capability: c)
        assert devices.resolve_precision("auto", torch.device("cuda")) == expected


def test_an_explicit_precision_is_kept_whatever_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert devices.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert devices.resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_bf16_autocast_lowers_matmuls_and_fp32_leaves_them_alone():
    a = torch.randn(4, 4)
    with devices.training_autocast("bf16", torch.device("cpu")):
        assert (a @ a).dtype == torch.bfloat16
    with devices.training_autocast("fp32", torch.device("cpu")):
        assert (a @ a).dtype == torch.float32


def test_config_accepts_auto_and_names_the_key_for_anything_else():
    assert (
        build_config("pgd-at", dataset="digits", overrides=["precision=auto"]).precision == "auto"
    )
    with pytest.raises(ConfigError, match=r"precision: unknown value 'fp16'.*fp32, bf16, auto"):
        build_config("pgd-at", dataset="digits", overrides=["precision=fp16"])


def test_channels_last_trains_the_same_model_up_to_rounding(tmp_path):
    """NHWC only reorders memory: same seeds, same batches, the same weights within rounding;
    and the saved weights load back as an ordinary (contiguous) model. Standard training, since
    PGD's sign() would amplify the convolutions' different rounding into flipped pixels."""
    runs = {
        layout: train_tiny(
            tmp_path / str(layout), "epochs=1", f"model.channels_last={layout}", preset="standard"
        )
        for layout in (False, True)
    }
    plain, nhwc = (load_model(runs[layout])[0].state_dict() for layout in (False, True))
    for key, tensor in plain.items():
        if tensor.is_floating_point():
            # A layout bug (e.g. transposed kernels) would be off by ~100 %.
            relative = (nhwc[key] - tensor).norm() / tensor.norm().clamp_min(1e-12)
            assert relative < 1e-4, f"{key}: relative difference {relative:.2e}"
        else:
            assert torch.equal(nhwc[key], tensor), key


def test_channels_last_puts_every_learner_and_the_global_model_in_nhwc():
    config = build_config("quickstart", dataset="digits", overrides=["model.channels_last=true"])
    spec = {"name": "tiny-cnn", "num_classes": 10, "in_channels": 1, "image_size": 8}
    learners, global_model = loop.build_learners(config, {**spec, "mean": None, "std": None}, CPU)
    for model in [*(lr.model for lr in learners), global_model]:
        kernels = [p for p in model.parameters() if p.dim() == 4]
        assert any(k.shape[1] > 1 for k in kernels)  # layouts differ only with channels > 1
        assert all(k.is_contiguous(memory_format=torch.channels_last) for k in kernels)
