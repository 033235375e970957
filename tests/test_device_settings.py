"""What a run sets up around its device: threads, numerical back ends, compilation, RNG state.

All on the CPU; the GPU side of the same promises is ``tests/test_cuda.py``.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters
from training_runs import only_run, quiet, tiny_cli, tiny_config, train_tiny

from generalist import backends, compiling, threads
from generalist.attacks.pgd import PGD
from generalist.attacks.threat import ThreatModel
from generalist.cli import main
from generalist.devices import training_autocast
from generalist.errors import ConfigError
from generalist.manifest import cpu_kernels, note_resume
from generalist.models import create_model
from generalist.models.normalization import GlobalAvgPool
from generalist.schedules import PiecewiseLinear
from generalist.training import loop
from generalist.training.generalist import GeneralistMerge
from generalist.training.learner import Learner
from generalist.training.save_and_resume import resume_config
from generalist.training.state import TrainingState, capture, restore
from generalist.training.tasks import TaskContext, TrainingAttack, build_task


def _no_cuda_calls(monkeypatch) -> None:
    """A GPU is 'visible', and touching CUDA's RNG fails the test."""

    def touched(*_args, **_kw):
        raise AssertionError("a CPU run touched CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, touched)


def test_a_cpu_run_never_initialises_cuda_and_saves_no_cuda_rng(tmp_path, monkeypatch):
    _no_cuda_calls(monkeypatch)
    config = tiny_config(tmp_path, "epochs=1", "device=cpu")
    loop.train(config, progress=False, echo=lambda *_: None)
    run = only_run(tmp_path)
    (checkpoint,) = (run / "checkpoints").glob("*.safetensors")
    keys = load_file(checkpoint).keys()
    assert "rng/torch" in keys
    assert not [key for key in keys if key.startswith("rng/cuda")]


def test_a_checkpoint_with_the_old_per_gpu_rng_entries_still_restores_on_the_cpu(tmp_path):
    config = tiny_config(tmp_path, "epochs=1", "device=cpu")
    spec = {"name": "tiny-cnn", "num_classes": 10, "in_channels": 1, "image_size": 8}
    spec |= {"mean": None, "std": None}
    learners, global_model = loop.build_learners(config, spec, torch.device("cpu"))
    merge = GeneralistMerge([lr.model for lr in learners], global_model, decay_max=0.99)
    state = TrainingState(learners, merge, torch.Generator(), torch.zeros(8, 2))
    tensors, meta = capture(state)
    tensors["rng/cuda/0"] = torch.zeros(16, dtype=torch.uint8)  # written by older versions
    restore(state, tensors, meta)  # no "state this run has no place for"


@pytest.mark.parametrize(
    ("requested", "environ", "busy", "expected"),
    [
        (3, {}, 0.0, (3, "as asked (--threads)")),
        (None, {"OMP_NUM_THREADS": "2"}, 7.0, (None, "as OMP_NUM_THREADS says")),
        (None, {}, 0.2, (None, "PyTorch's default on an idle machine")),
        (None, {}, 1.6, (2, "the cores left free: 1.6 of 4 busy with other work")),
        (None, {}, 7.5, (1, "the cores left free: 7.5 of 4 busy with other work")),
    ],
)
def test_threads_default_to_the_cores_other_jobs_leave_free(
    monkeypatch, requested, environ, busy, expected
):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_cores", lambda: busy)
    assert threads.choose_threads(requested) == expected


@pytest.mark.parametrize("bad", [0, -2, True, 1.5])
def test_a_thread_count_that_is_not_a_positive_whole_number_is_refused(bad):
    with pytest.raises(ConfigError, match="threads must be a whole number >= 1"):
        threads.choose_threads(bad)


def test_a_thread_count_beyond_any_machine_is_refused_before_pytorch_overflows():
    with pytest.raises(ConfigError, match=r"threads: must be <= 1024, got 2147483648"):
        threads.choose_threads(2**31)


def test_busy_cores_reads_a_plausible_figure():
    busy = threads.busy_cores(0.05)
    assert 0.0 <= busy <= (torch.get_num_threads() + threads.usable_cores()) * 4


def test_apply_threads_sets_torch_and_reports_it(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert threads.apply_threads(2)[0] == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_evaluation_runs_in_ieee_fp32_without_autotuning_whatever_the_flags_were():
    backends._set_tf32(True)
    torch.backends.cudnn.benchmark = True
    try:
        with backends.for_evaluation():
            flags = backends.backend_flags()
            assert flags["tf32_matmul"] is False and flags["tf32_conv"] is False
            assert flags["cudnn_benchmark"] is False
        assert backends._tf32() == (True, True)  # restored on the way out
        assert torch.backends.cudnn.benchmark
    finally:
        backends._set_tf32(False)
        torch.backends.cudnn.benchmark = False


def test_configure_records_what_a_resume_can_rely_on(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        backends.configure(torch.device("cpu"), deterministic=True)
        flags = backends.backend_flags()
        assert flags["deterministic_algorithms"] and flags["cudnn_deterministic"]
        assert flags["cublas_workspace_config"] == backends.CUBLAS_WORKSPACE
        assert not flags["cudnn_benchmark"] and not flags["tf32_conv"]
    finally:
        backends.configure(torch.device("cpu"), deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_the_models_have_deterministic_backward_passes():
    """No AdaptiveAvgPool2d (no deterministic CUDA backward); the replacement is the same mean."""
    torch.manual_seed(0)
    for name in ("tiny-cnn", "resnet18", "preact-resnet18", "wrn-10-1"):
        model = create_model(name, num_classes=10, in_channels=3, image_size=32)
        kinds = {type(m).__name__ for m in model.modules()}
        assert "AdaptiveAvgPool2d" not in kinds, name
    x = torch.randn(2, 5, 3, 3)
    pooled = torch.nn.AdaptiveAvgPool2d(1)(x)
    torch.testing.assert_close(GlobalAvgPool()(x), pooled)


@pytest.fixture
def aot_eager(monkeypatch):
    """Compile with the tracing and autograd of torch.compile but no C++ build (seconds, not
    the ~50 s inductor needs for its first step here)."""
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")


def test_compiling_in_place_keeps_keys_parameters_and_results(aot_eager):
    torch.manual_seed(0)
    model = create_model("tiny-cnn", num_classes=10, in_channels=1, image_size=8).eval()
    keys, params = list(model.state_dict()), list(model.parameters())
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    attack = PGD(ThreatModel.parse("Linf:0.1"), steps=3)
    expected = attack(model, x, y)
    compiling.compile_in_place(model)
    assert compiling.is_compiled(model)
    assert list(model.state_dict()) == keys and list(model.parameters()) == params
    torch.testing.assert_close(attack(model, x, y), expected, rtol=0, atol=1e-6)


def test_more_processes_than_gpus_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = tmp_path / "refused"
    assert main([*tiny_cli(out), "--nproc", "2", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == (
        "error: --nproc asks for 2 processes on this machine, which has 1 GPU(s): every process "
        "needs a GPU of its own (NCCL cannot share one), so start at most 1 here, train in one "
        "process (no --nproc), or add --device cpu\n"
    )
    assert not out.exists()


def test_a_run_resumes_on_another_thread_count_and_says_so(tmp_path):
    run = loop.train(tiny_config(tmp_path, "epochs=1"), progress=False, echo=quiet).run
    resumed = resume_config(run.path, None, ["threads=2", "epochs=2"])  # threads may change
    assert resumed.threads == 2
    said: list[str] = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        note_resume(run, None, said.append)
    finally:
        torch.set_num_threads(before)
    assert said == [
        "note: 2 CPU threads now, 1 when this run started; the result may differ in the last "
        "bits (--threads 1 to match)"
    ]


def test_the_manifest_names_the_cpu_kernels_and_a_resume_on_others_says_so(tmp_path):
    run = loop.train(tiny_config(tmp_path, "epochs=1"), progress=False, echo=quiet).run
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["device"]["kernels"] == cpu_kernels() != "unknown"
    manifest["device"]["kernels"] = "NOT" + cpu_kernels()  # as if started on another machine
    run.manifest_path.write_text(json.dumps(manifest))
    said: list[str] = []
    note_resume(run, None, said.append)
    assert said == [
        f"note: torch's CPU kernels are {cpu_kernels()} here, NOT{cpu_kernels()} where this run "
        "started; the result may differ in the last bits from the first step on"
    ]


def test_a_compiled_run_trains_and_saves_under_the_same_names(tmp_path, aot_eager):
    counters.clear()  # what dynamo traced: the proof that a run compiled
    plain = train_tiny(tmp_path / "plain", "epochs=1")
    assert not counters["frames"]["ok"]
    started = time.perf_counter()
    compiled = train_tiny(tmp_path / "compiled", "epochs=1", "model.compile=true")
    seconds = time.perf_counter() - started
    assert counters["frames"]["ok"] > 0
    (plain_checkpoint,) = (plain / "checkpoints").glob("*.safetensors")
    (compiled_checkpoint,) = (compiled / "checkpoints").glob("*.safetensors")
    assert load_file(compiled_checkpoint).keys() == load_file(plain_checkpoint).keys()
    weights = load_file(compiled / "model.safetensors")
    assert not [key for key in weights if "_orig_mod" in key]
    torch.testing.assert_close(weights, load_file(plain / "model.safetensors"), rtol=0, atol=1e-4)
    assert seconds < 120  # measured 9 s here: tracing only, no code generation


def test_autocast_covers_the_forward_passes_and_loss_but_not_backward_or_update():
    torch.manual_seed(0)
    model = create_model("tiny-cnn", num_classes=10, in_channels=1, image_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    learner = Learner(
        name="adv",
        model=model,
        optimizer=optimizer,
        lr_schedule=PiecewiseLinear.constant(0.1),
        gamma=PiecewiseLinear.constant(1.0),
        task=build_task(
            "adversarial", TaskContext(TrainingAttack(ThreatModel.parse("Linf:0.1"), 2, 0.05))
        ),
        generator=torch.Generator(),
        autocast=training_autocast("bf16", torch.device("cpu")),
    )
    seen: dict[str, list] = {"forward": [], "backward": [], "step": []}
    conv = model.features[0]
    conv.register_forward_hook(lambda _m, _i, out: seen["forward"].append(out.dtype))
    model.classifier.register_full_backward_hook(
        lambda *_: seen["backward"].append(torch.is_autocast_enabled("cpu"))
    )
    step = optimizer.step
    optimizer.step = lambda: (seen["step"].append(torch.is_autocast_enabled("cpu")), step())
    loss = learner.train_step(torch.rand(8, 1, 8, 8), torch.arange(8), 0.5)
    assert seen["forward"] == [torch.bfloat16] * 3  # 2 attack steps and the update's forward
    # The attack's input gradients are part of computing the loss (inside autocast, where
    # autocast changes nothing: a backward op keeps its forward op's dtype); the update's is not.
    assert seen["backward"] == [True, True, False]
    assert seen["step"] == [False]
    assert loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
