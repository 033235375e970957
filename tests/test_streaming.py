"""Image folders streamed from disk: decoding, determinism, exact resume, shares, bad files.

The folder is real JPEGs (CIFAR-10 subset images upscaled to 56 x 48) in a temp dir, read at
24 px so everything stays fast; the same code reads ImageNet at 224.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.distributed as dist
from forked_ranks import cli_rank, fork_two
from image_folders import CLASSES, write_jpeg_folder
from safetensors.torch import load_file
from training_runs import assert_same_result, checkpoint_steps, only_run, spawn_cli

from generalist.cli import main
from generalist.data import EpochBatches, load_splits
from generalist.data.folders import FileImages, FolderOptions
from generalist.data.streaming import BatchShare, StreamingBatches
from generalist.errors import DataError

SIZE = 24
VAL = 16
TRAIN = 4 * 40 - VAL


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_jpeg_folder(tmp_path_factory.mktemp("jpegs"))


def _splits(root: Path, split_seed: int = 0, **options):
    settings = {"image_size": SIZE, "storage": "stream", "workers": 0, **options}
    folder = FolderOptions(**settings)
    return load_splits("imagefolder", root, val_size=VAL, split_seed=split_seed, folder=folder)


def _epoch(train: FileImages, epoch: int, batch_size: int = 32, start: int = 0, **kw):
    source = StreamingBatches(
        train, EpochBatches(len(train), batch_size, seed=3), torch.device("cpu"), **kw
    )
    return list(source.epoch(epoch, start))


def _by_sample(batches, train_size: int, batch_size: int, epoch: int) -> dict[int, torch.Tensor]:
    order = torch.cat(list(EpochBatches(train_size, batch_size, seed=3).indices(epoch)))
    pixels = torch.cat([b.x for b in batches])
    return dict(zip(order.tolist(), pixels, strict=True))


# --- decoding and the storage choice ------------------------------------------------------------


def test_memory_and_streaming_read_the_same_pixels_and_labels(folder, capsys):
    memory = _splits(folder, storage="memory")
    streamed = _splits(folder)
    said = capsys.readouterr().out
    assert "held in memory (data.storage=memory" in said
    assert "streamed from disk by 0 loader workers (data.storage=stream" in said
    assert isinstance(streamed.train, FileImages) and not isinstance(memory.train, FileImages)
    assert streamed.info.classes == CLASSES and streamed.info.image_shape == (3, SIZE, SIZE)
    for part in ("train", "val", "test"):
        a, b = getattr(memory, part), getattr(streamed, part)
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.images, b.images[:])
    assert memory.test.images.shape == (40, 3, SIZE, SIZE)
    assert memory.test.labels.tolist() == [c for c in range(4) for _ in range(10)]
    assert memory.info.mean == streamed.info.mean
    assert memory.train.fingerprint() != streamed.train.fingerprint()  # pixels vs file lists


def test_auto_storage_follows_the_byte_budget(folder, capsys):
    need = 4 * 50 * 3 * SIZE * SIZE / 1e9
    assert not isinstance(_splits(folder, storage="auto", memory_budget_gb=need).train, FileImages)
    assert isinstance(_splits(folder, storage="auto", memory_budget_gb=need / 2).train, FileImages)
    said = capsys.readouterr().out
    assert "within data.memory_budget_gb" in said and "over data.memory_budget_gb" in said


# --- determinism and resume ----------------------------------------------------------------------


def test_batches_do_not_depend_on_the_number_of_loader_workers(folder):
    train = _splits(folder).train
    alone = _epoch(train, 1)
    pooled = _epoch(_splits(folder, workers=2).train, 1)
    assert len(alone) == 5
    for a, b in zip(alone, pooled, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(alone[0].x, _epoch(train, 2)[0].x)  # each epoch crops afresh


def test_a_sample_is_augmented_by_seed_epoch_and_index_alone(folder):
    """The batch a sample lands in (here: another batch size) does not change its pixels, and
    the training crops differ from the evaluation view of the same file."""
    train = _splits(folder).train
    by_32 = _by_sample(_epoch(train, 1, batch_size=32), TRAIN, 32, 1)
    by_50 = _by_sample(_epoch(train, 1, batch_size=50), TRAIN, 50, 1)
    assert all(torch.equal(by_32[i], by_50[i]) for i in range(TRAIN))
    evaluation = train.images[:].float() / 255
    assert sum(not torch.equal(by_32[i], evaluation[i]) for i in range(TRAIN)) > TRAIN * 0.9


def test_starting_mid_epoch_gives_the_rest_of_that_epoch(folder):
    train = _splits(folder).train
    whole, rest = _epoch(train, 2), _epoch(train, 2, start=2)
    assert len(rest) == 3
    assert all(torch.equal(a.x, b.x) for a, b in zip(whole[2:], rest, strict=True))


STREAM_RUN = [
    "model.name=tiny-cnn",
    f"data.val_size={VAL}",
    f"data.image_size={SIZE}",
    "data.storage=stream",
    "data.workers=1",
    "data.batch_size=32",
    "epochs=2",
    "eval.val_steps=2",
    "eval.test_steps=2",
]


def _stream_cli(folder: Path, out: Path, *extra: str) -> list[str]:
    sets = [arg for item in (*STREAM_RUN, *extra) for arg in ("--set", item)]
    return [
        "train",
        "--preset",
        "quickstart",
        "--dataset",
        "imagefolder",
        "--data-dir",
        str(folder),
        *sets,
        "--out",
        str(out),
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def stream_reference(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stream-reference")
    assert main(_stream_cli(folder, out)) == 0
    return only_run(out)


def test_sigkill_mid_epoch_then_resume_is_bit_identical(folder, stream_reference, tmp_path):
    out = tmp_path / "killed"
    process = spawn_cli(_stream_cli(folder, out, "checkpoint.every_steps=1")[:-1])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        runs = [p for p in out.iterdir() if p.is_dir()] if out.exists() else []
        if runs and any(s >= 7 for s in checkpoint_steps(runs[0])):  # epoch 2, batch 2 of 5
            break
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.002)
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL
    run = only_run(out)
    assert not (run / "summary.json").exists() and max(checkpoint_steps(run)) < 10
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_result(run, stream_reference)


# --- two processes ------------------------------------------------------------------------------


class _Recording(FileImages):
    """Records which samples this process decoded."""

    decoded: ClassVar[list[int]] = []

    def decode_some(self, indices, train_seeds=None, threads=0):
        _Recording.decoded += list(indices)
        return super().decode_some(indices, train_seeds, threads)


def _decode_shares(folder: Path, out: Path) -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    train = _splits(folder).train
    train = _Recording(train.files, train.labels, train.options)
    replica = _epoch(train, 1, share=BatchShare(part=rank, parts=2))
    replica_decoded, _Recording.decoded = list(_Recording.decoded), []
    peer = _epoch(train, 1, share=BatchShare(peer=rank, peers=2))
    torch.save(
        {
            "replica": [(b.x, b.y, b.whole, b.shared) for b in replica],
            "replica_decoded": replica_decoded,
            "peer": [(b.x, b.y) for b in peer],
            "peer_decoded": _Recording.decoded,
        },
        out / f"rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()
    return 0


def test_two_processes_decode_disjoint_shares_that_make_up_the_batches(folder, tmp_path):
    """Data-parallel replicas each decode and train on their slice; learners' processes each
    decode half of a slice and all-gather it, so both end with the single-process batch."""
    assert fork_two(_decode_shares, folder, tmp_path) == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    single = _epoch(_splits(folder).train, 1)
    for kind in ("replica_decoded", "peer_decoded"):
        assert not set(ranks[0][kind]) & set(ranks[1][kind])
        assert sorted(ranks[0][kind] + ranks[1][kind]) == list(range(TRAIN))
    for b, part0, part1 in zip(single, ranks[0]["replica"], ranks[1]["replica"], strict=True):
        assert torch.equal(torch.cat([part0[0], part1[0]]), b.x)
        assert torch.equal(torch.cat([part0[1], part1[1]]), b.y)
        assert part0[2:] == (len(b.y), True)
    for rank in ranks:
        for b, (x, y) in zip(single, rank["peer"], strict=True):
            assert torch.equal(x, b.x) and torch.equal(y, b.y)


def test_a_stopped_two_process_streaming_run_resumes_on_one_process(
    folder, stream_reference, tmp_path
):
    """Learner-parallel on two processes (each decodes half of every batch), stopped mid-epoch
    by SIGTERM, finished by one process: the single-process run's weights, to rounding."""
    out = tmp_path / "two"
    statuses = fork_two(cli_rank, _stream_cli(folder, out), 7)
    assert statuses == [128 + signal.SIGTERM] * 2
    run = only_run(out)
    assert checkpoint_steps(run)[-1] == 7
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    torch.testing.assert_close(
        load_file(run / "model.safetensors"),
        load_file(stream_reference / "model.safetensors"),
        atol=1e-5,  # the all-reduced merge's summation order (see test_distributed)
        rtol=0,
    )


def test_data_parallel_replicas_each_stream_their_slice_and_train_the_one_process_model(
    folder, tmp_path
):
    """Standard training (one learner, a model without BatchNorm) on two processes: each
    decodes and trains on half of every streamed batch, gradients averaged by their share."""
    extra = ("model.name=small-cnn", "data.image_size=28", "epochs=1")
    both = tmp_path / "two"
    args = _stream_cli(folder, both, *extra)
    args[args.index("quickstart")] = "standard"
    assert fork_two(cli_rank, args) == [0, 0]
    single = tmp_path / "one"
    args = _stream_cli(folder, single, *extra)
    args[args.index("quickstart")] = "standard"
    assert main(args) == 0
    torch.testing.assert_close(
        load_file(only_run(both) / "model.safetensors"),
        load_file(only_run(single) / "model.safetensors"),
        atol=1e-6,  # the halves' gradients summed instead of one batch's (test_distributed)
        rtol=0,
    )


# --- bad files ------------------------------------------------------------------------------------


@pytest.fixture
def damaged(folder, tmp_path) -> Path:
    """A copy of the folder whose first bird image is a truncated JPEG."""
    root = tmp_path / "damaged"
    for split in ("train", "val"):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for image in (folder / split / name).iterdir():
                (root / split / name / image.name).write_bytes(image.read_bytes())
    bird = root / "train" / "bird" / "0000.jpg"
    bird.write_bytes(bird.read_bytes()[:400])
    return root


def test_a_truncated_jpeg_stops_training_with_one_line_naming_it(damaged, tmp_path, capsys):
    assert main(_stream_cli(damaged, tmp_path / "runs")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith(f"error: cannot decode {damaged / 'train' / 'bird' / '0000.jpg'} (")
    assert "truncated" in err and "data.bad_files=skip" in err
    with pytest.raises(DataError, match=r"cannot decode .*bird.0000\.jpg"):
        _splits(damaged, storage="memory")


def test_skipping_bad_files_leaves_them_out_and_counts_them(damaged, capsys):
    (damaged / "train" / "cat" / "notes.txt").write_text("not an image")
    (damaged / "val" / "cat" / "0003.jpg").write_bytes(b"GIF89a but not really")
    streamed = _splits(damaged, bad_files="skip")
    said = capsys.readouterr().out
    assert f"skipped 1 non-image files or empty class folders, e.g. {damaged}" in said
    assert "skipped 1 unreadable images of an evaluation split, e.g." in said
    assert "0003.jpg" in said
    assert len(streamed.test) == 39
    assert not any(path.endswith("bird/0000.jpg") for path in streamed.val.files)  # see below
    batches = _epoch(streamed.train, 1)
    assert sum(len(b.y) for b in batches) == TRAIN - 1
    assert "skipped 1 unreadable training images in epoch 1" in capsys.readouterr().out
    seed = next(s for s in range(1, 100) if _in_val(_splits(damaged, s, bad_files="skip")))
    assert len(_splits(damaged, seed, bad_files="skip").val) == VAL - 1
    memory = _splits(damaged, bad_files="skip", storage="memory")
    assert len(memory.train) + len(memory.val) == 4 * 40 - 1 and len(memory.test) == 39


def _in_val(splits) -> bool:
    """Whether the validation split was carved with the truncated image in it (and so, after
    the check of evaluated splits, without it)."""
    return len(splits.val) < VAL


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda r: (r / "train" / "cat" / "notes.txt").write_text("x"),
            r"train/cat/notes\.txt is not an image",
        ),
        (lambda r: (r / "train" / "frog").mkdir(), r"class folder .*train/frog holds no images"),
        (  # found when the folder is read, not when the final test meets it
            lambda r: (r / "val" / "cat" / "0003.jpg").write_bytes(b"GIF89a, but no image"),
            r"cannot decode .*val/cat/0003\.jpg \(cannot identify image file",
        ),
        (
            lambda r: (r / "val" / "bird").rename(r / "val" / "birds"),
            r"train and val have different class folders \(e\.g\. 'bird' is in only one",
        ),
    ],
)
def test_folder_layout_errors_name_the_culprit(folder, damaged, damage, message):
    bird = Path("train", "bird", "0000.jpg")  # undo the fixture's damage: one fault at a time
    (damaged / bird).write_bytes((folder / bird).read_bytes())
    damage(damaged)
    with pytest.raises(DataError, match=message):
        _splits(damaged)
