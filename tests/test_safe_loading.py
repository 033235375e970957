"""Opening a file someone sent never runs code: hostile pickles everywhere files are read.

Each hostile file would run ``touch MARKER`` if it were unpickled; every test checks the clear
refusal the user sees *and* that the marker was never created. The places covered: CIFAR
batches (and their meta file), training checkpoints, and weights files (``generalist eval``,
``--init-from``, ``load_model``).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from training_runs import train_tiny

from generalist.checkpoint import CHECKPOINT_FORMAT
from generalist.cli import main
from generalist.errors import CheckpointError, UnsafeFileError
from generalist.models import create_model
from generalist.weights import load_model, read_state_dict, save_model


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_pickle(marker: Path, protocol: int = pickle.HIGHEST_PROTOCOL) -> bytes:
    return pickle.dumps({"weight": _Exploit(marker)}, protocol=protocol)


def _hostile_torch_file(marker: Path, path: Path) -> Path:
    torch.save({"weight": _Exploit(marker)}, path)  # torch.save pickles; saving runs nothing
    return path


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a hostile file ran its command"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("run"), "epochs=1")


# --- CIFAR batches ----------------------------------------------------------------------------


@pytest.mark.parametrize("hostile", ["data_batch_1", "test_batch", "batches.meta"])
def test_hostile_cifar_file_is_refused_before_training(tmp_path, marker, capsys, hostile):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]}
    for name in ("data_batch_1", "test_batch", "batches.meta"):
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / hostile).write_bytes(_hostile_pickle(marker))
    out = tmp_path / "runs"
    args = ["train", "--preset", "standard", "--dataset", "cifar10", "--data-dir", str(tmp_path)]
    assert main([*args, "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"error: refusing to load global posix.system from {folder / hostile}; the file is not a "
        "CIFAR batch from the official archive, so replace it with a fresh download\n"
    )
    assert not out.exists()


# --- training checkpoints ---------------------------------------------------------------------


def _plant_checkpoint(run: Path, tensors: bytes, record: bytes | None = None) -> Path:
    """Replace the run's checkpoints by one whose JSON vouches for ``tensors`` (hash included),
    as an attacker who controls both files would write it."""
    folder = run / "checkpoints"
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "step-000000003-epoch-0001.safetensors").write_bytes(tensors)
    sha = hashlib.sha256(tensors).hexdigest()
    meta = {"format": CHECKPOINT_FORMAT, "tensors": {"sha256": sha, "bytes": len(tensors)}}
    path = folder / "step-000000003-epoch-0001.json"
    path.write_bytes(record if record is not None else json.dumps(meta).encode())
    return path


@pytest.mark.parametrize("kind", ["pickle", "torch-save", "pickled-json"])
def test_hostile_checkpoint_is_refused_on_resume(tmp_path, finished_run, marker, capsys, kind):
    run = shutil.copytree(finished_run, tmp_path / "run")
    (run / "summary.json").unlink()
    hostile = _hostile_pickle(marker)
    if kind == "torch-save":
        hostile = _hostile_torch_file(marker, tmp_path / "evil.pt").read_bytes()
    record = _plant_checkpoint(run, hostile, hostile if kind == "pickled-json" else None)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    not_safetensors = "points at step-000000003-epoch-0001.safetensors, which is not a safetensors"
    reason = {
        "pickle": not_safetensors,
        "torch-save": not_safetensors,
        "pickled-json": "is not valid JSON",
    }[kind]
    assert err.startswith(f"error: no readable checkpoint in {run / 'checkpoints'}: ")
    assert f"{record.name} {reason}" in err


# --- weights files ---------------------------------------------------------------------------


def _weights_beside_spec(finished_run: Path, weights: Path) -> Path:
    """``weights`` with the run's model.json next to it, its hash updated to match, as a
    malicious sender would ship them."""
    spec = json.loads((finished_run / "model.json").read_text())
    spec["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (weights.parent / "model.json").write_text(json.dumps(spec))
    return weights


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("torch-save", "it is a pickle that asks for posix.system, which could run code"),
        ("raw-pickle", "it is a pickle using more than tensors and plain containers"),
    ],
)
def test_hostile_weights_are_refused_by_eval_and_load_model(
    tmp_path, finished_run, marker, capsys, kind, reason
):
    weights = tmp_path / "model.pt"
    if kind == "torch-save":
        _hostile_torch_file(marker, weights)
    else:
        weights.write_bytes(_hostile_pickle(marker))
    _weights_beside_spec(finished_run, weights)
    expected = (
        f"refusing to load {weights}: {reason}; weights files may only hold tensors, so ask for "
        "a .safetensors file (or a plain model.state_dict())"
    )
    with pytest.raises(UnsafeFileError) as refused:
        load_model(weights)
    assert str(refused.value) == expected
    assert main(["eval", str(weights), "--threat", "Linf:0.1", "--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"


def test_old_protocol_pickles_are_not_even_parsed(tmp_path, marker):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(_hostile_pickle(marker, protocol=0))
    with pytest.raises(CheckpointError, match=r"neither a \.safetensors file nor a PyTorch"):
        read_state_dict(weights)


def test_hostile_weights_are_refused_by_init_from(tmp_path, finished_run, marker, capsys):
    weights = _weights_beside_spec(finished_run, _hostile_torch_file(marker, tmp_path / "m.pt"))
    out = tmp_path / "runs"
    args = ["train", "--preset", "quickstart", "--dataset", "digits", "--epochs", "1"]
    status = main(
        [*args, "--set", "model.name=tiny-cnn", "--init-from", str(weights), "--out", str(out)]
    )
    assert status == 2
    assert capsys.readouterr().err.startswith(f"error: refusing to load {weights}: it is a pickle")
    assert not out.exists()


def test_a_plain_state_dict_a_user_brings_loads_through_the_allow_list(tmp_path, finished_run):
    model, _ = load_model(finished_run)
    weights = tmp_path / "theirs.pt"
    torch.save(model.state_dict(), weights)
    _weights_beside_spec(finished_run, weights)
    again, _ = load_model(weights)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, nested)
    assert set(read_state_dict(nested)) == set(model.state_dict())


def test_weights_and_checkpoints_are_written_without_pickle(tmp_path, finished_run):
    model = create_model("tiny-cnn", num_classes=10, in_channels=1, image_size=8)
    save_model(model, tmp_path, {"model": {"name": "tiny-cnn"}})
    files = [tmp_path / "model.safetensors", *(finished_run / "checkpoints").glob("*.safetensors")]
    for path in files:
        header = path.read_bytes()[:9]
        assert header[8:9] == b"{" and not header.startswith((b"\x80", b"PK"))
