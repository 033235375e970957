"""What differs on a GPU: attacks, the merge, bf16 autocast, channels_last, resume, one-process
distributed training. Skipped without CUDA; ``benchmarks/device_check.py`` runs them on one.

Each test compares the GPU with the CPU on the same inputs, or the GPU with itself (resume),
in IEEE fp32 unless it is about bf16: TF32 would blur every tolerance here.
"""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
from conftest import HAS_CUDA, REAL_CUDA_IS_AVAILABLE, linear_classifier, small_cnn
from safetensors.torch import load_file
from training_runs import (
    STEPS_PER_EPOCH,
    assert_same_result,
    only_run,
    sigterm_at_step,
    tiny_config,
    train_tiny,
)

from generalist import backends
from generalist.attacks.apgd import APGD, apgd_run, dlr_loss
from generalist.attacks.base import feasible
from generalist.attacks.fab import FABTargeted
from generalist.attacks.friendly_pgd import friendly_pgd
from generalist.attacks.pgd import pgd
from generalist.attacks.square import Square
from generalist.attacks.threat import ThreatModel
from generalist.devices import training_autocast
from generalist.models import create_model
from generalist.rundir import RunDir
from generalist.training import loop
from generalist.training.generalist import GeneralistMerge
from generalist.training.signals import TrainingInterrupted

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU here (benchmarks/device_check.py)"),
]
GPU = torch.device("cuda")
CPU = torch.device("cpu")
THREAT = ThreatModel.parse("Linf:0.05")


@pytest.fixture(autouse=True)
def gpu_visible(monkeypatch):
    """Undo conftest's hiding of the GPU for these tests alone; IEEE fp32 throughout."""
    monkeypatch.setattr(torch.cuda, "is_available", REAL_CUDA_IS_AVAILABLE)
    with backends.for_evaluation():
        yield


def _on(device: torch.device, model: torch.nn.Module, *tensors: torch.Tensor):
    return copy.deepcopy(model).to(device), *(t.to(device) for t in tensors)


def test_pgd_takes_the_same_steps_on_the_gpu_without_a_host_sync():
    model, x, y, _ = linear_classifier(10, 64, seed=1)
    on_cpu = pgd(model, x, y, THREAT, steps=10, random_start=False, keep_best=True)
    gpu_model, gx, gy = _on(GPU, model, x, y)
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside the loop raises
    try:
        on_gpu = pgd(gpu_model, gx, gy, THREAT, steps=10, random_start=False, keep_best=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-5)


def test_apgd_matches_the_cpu_run_point_for_point():
    """The per-point streams draw the same starts on both devices."""
    model, x, y, _ = linear_classifier(10, 64, seed=2)
    attack = APGD(THREAT, loss="dlr", n_iter=20)
    on_cpu = attack(model, x, y)
    gpu_model, gx, gy = _on(GPU, model, x, y)
    on_gpu = attack(gpu_model, gx, gy)
    with torch.no_grad():
        assert torch.equal(gpu_model(on_gpu).argmax(1).cpu(), model(on_cpu).argmax(1))
    assert feasible(THREAT, gx, on_gpu).all()


def test_an_apgd_iteration_loop_never_waits_for_the_gpu():
    model, x, y, _ = linear_classifier(10, 64, seed=3)
    gpu_model, gx, gy = _on(GPU, model, x, y)
    start = (gx + THREAT.eps * (2 * torch.rand_like(gx) - 1)).clamp(0, 1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fooled, x_adv = apgd_run(
            gpu_model,
            gx,
            gy,
            THREAT,
            lambda z, t, _: dlr_loss(z, t),
            n_iter=20,
            rho=0.75,
            start=start,
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert feasible(THREAT, gx, x_adv).all() and fooled.dtype == torch.bool


def test_friendly_pgd_masks_on_the_gpu_and_agrees_with_the_cpu():
    model, x, y, _ = linear_classifier(10, 64, seed=4)
    kw = dict(steps=8, step_size=0.01, tau=1, random_start=False)
    on_cpu = friendly_pgd(model, x, y, THREAT, **kw)
    gpu_model, gx, gy = _on(GPU, model, x, y)
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = friendly_pgd(gpu_model, gx, gy, THREAT, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert on_gpu.steps_taken.tolist() == on_cpu.steps_taken.tolist()
    torch.testing.assert_close(on_gpu.x_adv.cpu(), on_cpu.x_adv, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attack", [Square(THREAT, n_queries=300), FABTargeted(THREAT, n_iter=20)])
def test_square_and_fab_break_what_they_break_on_the_cpu(attack):
    """Their random draws come from a GPU generator, so points may differ; the robust accuracy
    on a small CNN must not (within 3 of 48 points), and every output must be feasible."""
    model, x = small_cnn(), torch.rand(48, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = model(x).argmax(1)
    on_cpu = attack(model, x, y)
    gpu_model, gx, gy = _on(GPU, model, x, y)
    on_gpu = attack(gpu_model, gx, gy)
    assert feasible(THREAT, gx, on_gpu).all()
    with torch.no_grad():
        robust_cpu = int((model(on_cpu).argmax(1) == y).sum())
        robust_gpu = int((gpu_model(on_gpu).argmax(1) == gy).sum())
    assert abs(robust_gpu - robust_cpu) <= 3


def test_the_merge_updates_teachers_and_global_alike_on_both_devices():
    torch.manual_seed(0)
    models = [create_model("tiny-cnn", num_classes=10, in_channels=3, image_size=8) for _ in "ab"]
    base = create_model("tiny-cnn", num_classes=10, in_channels=3, image_size=8)
    merges = []
    for device in (CPU, GPU):
        learners = [_on(device, m)[0] for m in models]
        merge = GeneralistMerge(learners, _on(device, base)[0], decay_max=0.99)
        for step in range(5):
            with torch.no_grad():
                for i, learner in enumerate(learners):
                    for p in learner.parameters():
                        p.add_(0.01 * (i + 1) * (step + 1))
            merge.update(step, [0.3, 0.7])
        merge.redistribute()
        merges.append(merge)
    on_cpu, on_gpu = merges
    for cpu_model, gpu_model in zip(
        [on_cpu.global_model, *on_cpu.teachers, *on_cpu.learners],
        [on_gpu.global_model, *on_gpu.teachers, *on_gpu.learners],
        strict=True,
    ):
        torch.testing.assert_close(
            {k: v.cpu() for k, v in gpu_model.state_dict().items()},
            cpu_model.state_dict(),
            rtol=1e-6,
            atol=1e-6,
        )


def test_bf16_autocast_runs_the_convolutions_in_bf16_and_keeps_fp32_weights_and_losses():
    model = create_model("tiny-cnn", num_classes=10, in_channels=3, image_size=8).to(GPU)
    x = torch.rand(16, 3, 8, 8, device=GPU)
    y = torch.randint(0, 10, (16,), device=GPU)
    seen = []
    model.features[0].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    with training_autocast("bf16", GPU):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32
    for param in model.parameters():
        assert param.dtype == torch.float32 and param.grad.dtype == torch.float32


def test_channels_last_gives_the_nchw_results():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_channels=3, image_size=32).to(GPU).eval()
    x = torch.rand(8, 3, 32, 32, device=GPU)
    with torch.no_grad():
        nchw = model(x)
        model.to(memory_format=torch.channels_last)
        nhwc = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(nhwc, nchw, rtol=1e-4, atol=1e-4)


@pytest.fixture
def deterministic_gpu():
    yield
    backends.configure(CPU, deterministic=False)  # a run's settings outlive it; reset them


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_deterministic_cuda_run_stopped_mid_epoch_resumes_bit_identical(
    tmp_path, precision, deterministic_gpu
):
    """The CUDA resume guarantee (generalist.backends): with ``deterministic: true`` a resumed
    run ends with the uninterrupted run's bits."""
    extra = ("device=cuda", "deterministic=true", f"precision={precision}")
    reference = train_tiny(tmp_path / "reference", *extra)
    config = tiny_config(tmp_path / "stopped", *extra)
    with sigterm_at_step(STEPS_PER_EPOCH + 3), pytest.raises(TrainingInterrupted):
        loop.train(config, progress=False, echo=lambda *_: None)
    run = only_run(tmp_path / "stopped")
    loop.train(config, RunDir.open(run), resume=True, progress=False, echo=lambda *_: None)
    assert_same_result(run, reference)
    manifest = (run / "manifest.json").read_text()
    assert '"cudnn_deterministic": true' in manifest


def test_a_cuda_run_saves_only_its_own_gpu_rng(tmp_path):
    run = train_tiny(tmp_path, "device=cuda", "epochs=1")
    (checkpoint,) = (run / "checkpoints").glob("*.safetensors")
    keys = {k for k in load_file(checkpoint) if k.startswith("rng/")}
    assert keys == {"rng/torch", "rng/cuda"}


def test_one_process_on_the_nccl_path_trains_what_a_single_process_trains(tmp_path):
    """A process group of one (what torchrun gives ``--nproc 1`` under a scheduler): every
    collective runs through NCCL and must change nothing."""
    extra = ("device=cuda", "deterministic=true", "epochs=2")
    single = train_tiny(tmp_path / "single", *extra, preset="pgd-at")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        device_id=torch.device("cuda", 0),
    )
    try:
        grouped = train_tiny(tmp_path / "grouped", *extra, preset="pgd-at")
    finally:
        dist.destroy_process_group()
        backends.configure(CPU, deterministic=False)
    torch.testing.assert_close(
        load_file(grouped / "model.safetensors"), load_file(single / "model.safetensors")
    )
