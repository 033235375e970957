"""A run directory nobody else can break: one process per run, no writes through links, and a
cleanup that removes only what generalist wrote."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from training_runs import quiet, tiny_config, train_tiny

from generalist import durable
from generalist.checkpoint import CheckpointStore
from generalist.cli import main
from generalist.errors import UnsafeFileError
from generalist.runlock import LOCK_FILE, lock_folder, release_folder
from generalist.training import loop


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("guard"), "epochs=1")


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that takes ``folder``'s lock and sleeps; it prints once it holds it."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from generalist.runlock import lock_folder
        lock_folder({str(folder)!r}, "run", "test")
        print("locked", flush=True)
        time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_second_process_on_one_run_gets_one_line_and_a_killed_holder_frees_it(
    tmp_path, finished_run, capsys
):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "summary.json").unlink()
    (run / ".lock").unlink(missing_ok=True)
    holder = _hold_lock(run)
    try:
        assert main(["train", "--resume", str(run), "--no-progress"]) == 2
        assert capsys.readouterr().err == (
            f"error: run {run} is in use by process {holder.pid} on {socket.gethostname()}; "
            "wait for it to finish or stop it, then retry (a separate run needs its own folder: "
            "generalist train without --resume)\n"
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # SIGKILL leaves no stale lock: the kernel released it with the process
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    capsys.readouterr()


def test_a_second_evaluation_of_one_folder_is_refused(tmp_path, finished_run, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        argv = ["eval", str(finished_run), "--attacks", "pgd-2", "--n-examples", "8"]
        assert main([*argv, "--out", str(out), "--no-progress"]) == 2
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert capsys.readouterr().err == (
        f"error: evaluation folder {out} is in use by process {holder.pid} on "
        f"{socket.gethostname()}; wait for it to finish or stop it, then retry (a separate "
        "evaluation needs its own --out)\n"
    )


def test_a_planted_link_never_makes_a_write_leave_the_folder(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".config.yaml.tmp").symlink_to(outside)  # the temporary name, planted
    durable.write_text_durably(folder / "config.yaml", "mine")
    assert outside.read_text() == "precious"
    assert not (folder / "config.yaml").is_symlink()
    assert (folder / "config.yaml").read_text() == "mine"
    (folder / "metrics.jsonl").symlink_to(outside)  # the target itself, planted
    with pytest.raises(UnsafeFileError, match="is a symbolic link; generalist never writes"):
        durable.write_text_durably(folder / "metrics.jsonl", "x")
    with pytest.raises(UnsafeFileError, match="is a symbolic link; generalist never writes"):
        durable.append_text(folder / "metrics.jsonl", "x")
    assert outside.read_text() == "precious"


def test_a_run_whose_files_are_links_stops_with_one_line_and_writes_nothing_outside(
    tmp_path, capsys
):
    outside = tmp_path / "outside.yaml"
    outside.write_text("precious")
    out = tmp_path / "runs"
    config = tiny_config(out, "epochs=1", "checkpoint.every_steps=2")
    original = loop.RunDir.create

    def create_with_a_planted_link(out_dir, name):
        run = original(out_dir, name)
        (run.path / "metrics.jsonl").symlink_to(outside)
        return run

    loop.RunDir.create = create_with_a_planted_link
    try:
        with pytest.raises(UnsafeFileError, match=r"metrics.jsonl is a symbolic link"):
            loop.train(config, progress=False, echo=quiet)
    finally:
        loop.RunDir.create = original
    assert outside.read_text() == "precious"


def test_cleanup_removes_only_what_generalist_wrote_and_says_so_once(tmp_path):
    lines: list[str] = []
    store = CheckpointStore(tmp_path / "checkpoints", keep=1, echo=lines.append)
    store.directory.mkdir()
    theirs = {
        "best-model.safetensors": b"user weights",
        "step-000000099-epoch-0009.safetensors": b"not ours, though named like ours",
        ".notes.tmp": b"a user's temporary",
    }
    for name, data in theirs.items():
        (store.directory / name).write_bytes(data)
    shared = tmp_path / "shared.safetensors"
    shared.write_bytes(b"shared")
    (store.directory / "step-000000098-epoch-0009.safetensors").symlink_to(shared)
    leftover = store.directory / ".step-000000001-epoch-0001.safetensors.tmp"
    leftover.write_bytes(b"half a write")
    tensors = {"w": torch.zeros(2)}
    for step in (1, 2, 3):
        store.save(step, 1, tensors, {"position": step})
    assert sorted(p.name for p in store.directory.iterdir()) == sorted(
        [
            *theirs,
            "step-000000098-epoch-0009.safetensors",
            "step-000000003-epoch-0001.json",
            "step-000000003-epoch-0001.safetensors",
        ]
    )
    for name, data in theirs.items():
        assert (store.directory / name).read_bytes() == data
    assert shared.read_bytes() == b"shared"
    assert lines == [
        f"note: {store.directory} also holds files generalist did not write (.notes.tmp, "
        "best-model.safetensors, step-000000098-epoch-0009.safetensors, "
        "step-000000099-epoch-0009.safetensors); they are left alone"
    ]


def test_a_full_disk_at_the_start_leaves_no_half_created_run(tmp_path, monkeypatch, capsys):
    def full(path, text):
        raise OSError(28, os.strerror(28), str(path))

    monkeypatch.setattr("generalist.rundir.write_text_durably", full)
    out = tmp_path / "runs"
    argv = ["train", "--preset", "quickstart", "--dataset", "digits", "--out", str(out)]
    tiny = ["--set", "model.name=tiny-cnn", "--set", "data.train_limit=64", "--epochs", "1"]
    assert main([*argv, *tiny, "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"error: cannot use {out}/quickstart-")
    assert err[-1].endswith(
        "config.yaml (No space left on device); free some space and retry (a stopped run "
        "continues with --resume RUN_DIR)"
    )
    assert err[0].startswith(f"note: removed {out}/quickstart-")
    assert list(out.iterdir()) == []


def test_a_read_only_out_folder_is_one_line(tmp_path, monkeypatch, capsys):
    """(Injected: the tests may run as root, which writes into read-only folders.)"""
    out = tmp_path / "ro"

    def read_only(self, *args, **kwargs):
        raise PermissionError(13, os.strerror(13), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    argv = ["train", "--preset", "quickstart", "--dataset", "digits", "--out", str(out)]
    assert main([*argv, "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot use {out}/quickstart-")
    assert err.endswith("(Permission denied); make that folder writable or choose another --out\n")


def test_only_rank_zero_takes_the_lock_and_a_process_may_ask_again(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # a torchrun worker that is not rank 0
    lock_folder(tmp_path, "run", "x")
    assert not (tmp_path / LOCK_FILE).exists()
    monkeypatch.setenv("RANK", "0")
    lock_folder(tmp_path, "run", "x")
    lock_folder(tmp_path, "run", "x")  # the same process again: it keeps its one lock
    assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    release_folder(tmp_path)
    holder = _hold_lock(tmp_path)  # released: another process can take it now
    holder.send_signal(signal.SIGKILL)
    holder.wait()


def test_a_forked_worker_does_not_keep_its_parents_run_locked(tmp_path, monkeypatch):
    """A data loader worker outlives a SIGKILLed parent by seconds; the run is free meanwhile."""
    monkeypatch.setenv("RANK", "0")
    lock_folder(tmp_path, "run", "x")
    read, write = os.pipe()
    worker = os.fork()
    if worker == 0:  # the worker: alive until the test closes the pipe
        os.close(write)
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    try:
        release_folder(tmp_path)  # the parent's descriptors close, as when it is killed
        holder = _hold_lock(tmp_path)  # fails if the worker's inherited copy kept the lock
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        os.close(write)
        os.waitpid(worker, 0)
