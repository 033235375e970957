"""Data package: readers on the real shared data and on small files written here, splits,
the allow-listing unpickler, augmentation and resumable batch order."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from generalist.data import (
    BatchAugment,
    EpochBatches,
    ImageDataset,
    list_datasets,
    load_splits,
    safe_load_pickle,
    to_float,
)
from generalist.errors import DataError, UnsafeFileError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_DIR = SHARED / "mnist"
CIFAR_DIR = SHARED / "cifar10-subset"


# --- helpers ---------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def _write_mnist(folder: Path, gz: bool, n_train: int = 12, n_test: int = 5) -> np.ndarray:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    suffix = ".gz" if gz else ""
    _write_idx(folder / f"train-images-idx3-ubyte{suffix}", train)
    _write_idx(folder / f"train-labels-idx1-ubyte{suffix}", np.arange(n_train) % 10)
    _write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", train[:n_test])
    _write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", np.arange(n_test) % 10)
    return train


def _numbered_npz(path: Path, n_train: int = 200, n_test: int = 30) -> None:
    """Each training image carries its index in its first two pixels, so splits are traceable."""
    x = np.zeros((n_train, 8, 8, 3), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n_train) // 256
    x[:, 0, 1, 0] = np.arange(n_train) % 256
    y = np.arange(n_train) % 4
    np.savez(path, x_train=x, y_train=y, x_test=x[:n_test], y_test=y[:n_test])


def _indices_of(data: ImageDataset) -> set[int]:
    return set((data.images[:, 0, 0, 0].long() * 256 + data.images[:, 0, 0, 1].long()).tolist())


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.target}",))


def _cifar_batch_bytes(n: int, labels_key: str = "labels") -> bytes:
    data = np.random.default_rng(n).integers(0, 256, (n, 3072), dtype=np.uint8)
    return pickle.dumps({"data": data, labels_key: [i % 10 for i in range(n)]})


# --- registry and errors ---------------------------------------------------------------------


def test_list_datasets_and_unknown_name():
    assert list_datasets() == [
        "digits",
        "mnist",
        "cifar10",
        "cifar100",
        "npz",
        "imagefolder",
        "imagenet",
    ]
    with pytest.raises(DataError, match=r"unknown dataset 'svhn'.*cifar10"):
        load_splits("svhn")


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "npz"])
def test_missing_data_names_the_path_and_how_to_get_it(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as error:
        load_splits(name, missing)
    message = str(error.value)
    assert str(missing) in message and "\n" not in message
    assert "--data-dir" in message


def test_missing_data_dir_says_to_pass_one():
    with pytest.raises(DataError, match="--data-dir"):
        load_splits("cifar10", None)


def test_imagefolder_without_a_train_folder_says_how_to_lay_it_out(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # the core never needs it
    with pytest.raises(DataError, match=r"no train folder in .*train/<class>/<image>"):
        load_splits("imagefolder", tmp_path)


# --- digits ----------------------------------------------------------------------------------


def test_digits_shapes_ranges_and_fixed_test_split():
    splits = load_splits("digits", val_size=0.1)
    assert splits.info.image_shape == (1, 8, 8) and splits.info.num_classes == 10
    assert (splits.info.default_crop_padding, splits.info.default_flip) == (0, False)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    assert len(splits.test) == 359 and len(splits.val) == 144
    for part in (splits.train, splits.val, splits.test):
        assert part.images.dtype == torch.uint8 and part.images.shape[1:] == (1, 8, 8)
        assert set(part.labels.unique().tolist()) == set(range(10))
    assert int(splits.train.images.max()) == 255 and int(splits.train.images.min()) == 0
    again = load_splits("digits", val_size=0.1, split_seed=5)
    assert again.test.fingerprint() == splits.test.fingerprint()  # test never depends on the seed
    assert again.val.fingerprint() != splits.val.fingerprint()


# --- MNIST -----------------------------------------------------------------------------------


def test_mnist_real_files():
    splits = load_splits("mnist", MNIST_DIR, val_size=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (60000, 0, 10000)
    assert splits.train.images.shape[1:] == (1, 28, 28)
    assert splits.train.labels[:5].tolist() == [5, 0, 4, 1, 9]  # the well-known first labels
    assert splits.test.labels[:3].tolist() == [7, 2, 1]
    small = load_splits("mnist", MNIST_DIR, val_size=0, train_limit=100, test_limit=50)
    assert (len(small.train), len(small.test)) == (100, 50)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_synthetic_idx_gz_and_raw(tmp_path, gz):
    train = _write_mnist(tmp_path, gz)
    splits = load_splits("mnist", tmp_path, val_size=0)
    assert torch.equal(splits.train.images[:, 0], torch.from_numpy(train))
    assert splits.train.labels.tolist() == [i % 10 for i in range(12)]
    assert len(splits.test) == 5


def test_mnist_bad_magic_and_truncation_are_data_errors(tmp_path):
    _write_mnist(tmp_path, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    raw = images.read_bytes()
    images.write_bytes(b"\0\0\x0d\x03" + raw[4:])  # float IDX, not unsigned bytes
    with pytest.raises(DataError, match="magic"):
        load_splits("mnist", tmp_path)
    images.write_bytes(raw[:-10])
    with pytest.raises(DataError, match="truncated"):
        load_splits("mnist", tmp_path)


# --- CIFAR -----------------------------------------------------------------------------------


def test_cifar10_subset_from_parent_and_from_batches_folder():
    splits = load_splits("cifar10", CIFAR_DIR, val_size=0)
    assert (len(splits.train), len(splits.test)) == (4660, 932)
    assert splits.train.images.shape[1:] == (3, 32, 32)
    assert splits.info.num_classes == 10 and splits.info.classes[0] == "airplane"
    assert (splits.info.default_crop_padding, splits.info.default_flip) == (4, True)
    counts = torch.bincount(splits.test.labels, minlength=10)
    assert counts.sum() == 932 and (counts > 50).all()
    direct = load_splits("cifar10", CIFAR_DIR / "cifar-10-batches-py", val_size=0)
    assert direct.test.fingerprint() == splits.test.fingerprint()


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(_cifar_batch_bytes(20, "fine_labels"))
    (folder / "test").write_bytes(_cifar_batch_bytes(7, "fine_labels"))
    splits = load_splits("cifar100", tmp_path, val_size=0)
    assert splits.info.num_classes == 100 and len(splits.train) == 20 and len(splits.test) == 7
    assert splits.train.labels.tolist() == [i % 10 for i in range(20)]


def test_hostile_pickle_is_refused_without_running_it(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(_cifar_batch_bytes(4))
    pwned = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(pickle.dumps({"data": _Exploit(pwned), "labels": []}))
    with pytest.raises(UnsafeFileError, match=r"refusing to load global .*system.*test_batch"):
        load_splits("cifar10", tmp_path)
    assert not pwned.exists()


def test_safe_pickle_reads_numpy_and_refuses_other_globals(tmp_path):
    path = tmp_path / "batch"
    path.write_bytes(_cifar_batch_bytes(3))
    batch = safe_load_pickle(path)
    assert batch["data"].shape == (3, 3072) and batch["labels"] == [0, 1, 2]
    path.write_bytes(pickle.dumps({"x": slice(1, 2)}))  # harmless, but not in the allow-list
    with pytest.raises(UnsafeFileError, match=r"builtins\.slice"):
        safe_load_pickle(path)


def test_safe_pickle_py2_bytes_keys_become_str(tmp_path):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [3]}))
    assert set(safe_load_pickle(path)) == {"data", "labels"}


def test_truncated_cifar_batch_is_a_data_error_naming_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(CIFAR_DIR / "cifar-10-batches-py", folder)
    damaged = folder / "data_batch_3"
    damaged.chmod(0o644)
    damaged.write_bytes(damaged.read_bytes()[:5000])
    with pytest.raises(DataError, match="data_batch_3 is truncated or corrupt"):
        load_splits("cifar10", folder)


# --- npz -------------------------------------------------------------------------------------


def test_npz_nhwc_and_nchw_uint8_give_the_same_dataset(tmp_path):
    rng = np.random.default_rng(1)
    nchw = rng.integers(0, 256, (10, 3, 5, 6), dtype=np.uint8)
    y = np.arange(10) % 3
    np.savez(tmp_path / "a.npz", x_train=nchw, y_train=y, x_test=nchw, y_test=y)
    nhwc = nchw.transpose(0, 2, 3, 1)
    np.savez(tmp_path / "b.npz", x_train=nhwc, y_train=y, x_test=nhwc, y_test=y)
    a = load_splits("npz", tmp_path / "a.npz", val_size=0)
    b = load_splits("npz", tmp_path / "b.npz", val_size=0)
    assert torch.equal(a.train.images, torch.from_numpy(nchw))
    assert a.train.fingerprint() == b.train.fingerprint()
    assert a.info.num_classes == 3 and a.info.image_shape == (3, 5, 6)


def test_npz_floats_in_unit_range_become_uint8_and_others_are_refused(tmp_path):
    x = np.array([0.0, 0.5, 1.0, 0.2], dtype=np.float32).reshape(4, 1, 1, 1) * np.ones((1, 1, 2, 2))
    y = np.array([0, 1, 0, 1])
    np.savez(tmp_path / "f.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    splits = load_splits("npz", tmp_path / "f.npz", val_size=0)
    assert splits.train.images[:, 0, 0, 0].tolist() == [0, 128, 255, 51]
    np.savez(tmp_path / "bad.npz", x_train=x * 255, y_train=y, x_test=x, y_test=y)
    with pytest.raises(DataError, match=r"outside \[0, 1\]"):
        load_splits("npz", tmp_path / "bad.npz")
    np.savez(tmp_path / "keys.npz", images=x)
    with pytest.raises(DataError, match="lacks x_train"):
        load_splits("npz", tmp_path / "keys.npz")


def test_negative_label_is_reported_with_its_index(tmp_path):
    x = np.zeros((5, 1, 2, 2), np.uint8)
    np.savez(
        tmp_path / "l.npz",
        x_train=x,
        y_train=np.array([0, 1, 2, -1, 0]),
        x_test=x[:1],
        y_test=np.array([0]),
    )
    with pytest.raises(DataError, match="index 3 is -1"):
        load_splits("npz", tmp_path / "l.npz")


# --- splits ----------------------------------------------------------------------------------


def test_val_split_is_disjoint_complete_and_deterministic(tmp_path):
    _numbered_npz(tmp_path / "n.npz")
    splits = load_splits("npz", tmp_path / "n.npz", val_size=0.25, split_seed=3)
    train, val = _indices_of(splits.train), _indices_of(splits.val)
    assert len(val) == 50 and not train & val and train | val == set(range(200))
    again = load_splits("npz", tmp_path / "n.npz", val_size=0.25, split_seed=3)
    assert _indices_of(again.val) == val
    other = load_splits("npz", tmp_path / "n.npz", val_size=0.25, split_seed=4)
    assert _indices_of(other.val) != val
    counted = load_splits("npz", tmp_path / "n.npz", val_size=17)
    assert len(counted.val) == 17


def test_train_limit_keeps_the_validation_split(tmp_path):
    _numbered_npz(tmp_path / "n.npz")
    full = load_splits("npz", tmp_path / "n.npz", val_size=20)
    small = load_splits("npz", tmp_path / "n.npz", val_size=20, train_limit=30, test_limit=10)
    assert len(small.train) == 30 and len(small.test) == 10
    assert _indices_of(small.val) == _indices_of(full.val)
    assert _indices_of(small.train) <= _indices_of(full.train)
    assert _indices_of(small.test) <= _indices_of(full.test)


@pytest.mark.parametrize("val_size", [-0.1, 1.5, 200, 500])
def test_bad_val_size_is_a_data_error(tmp_path, val_size):
    _numbered_npz(tmp_path / "n.npz")
    with pytest.raises(DataError, match="val_size"):
        load_splits("npz", tmp_path / "n.npz", val_size=val_size)


# --- containers ------------------------------------------------------------------------------


def test_image_dataset_validates_and_fingerprints():
    images = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 1, 3, 4)
    data = ImageDataset(images, torch.tensor([0, 1]))
    assert len(data) == 2 and len(data.subset(torch.tensor([1]))) == 1
    assert torch.equal(data.subset(torch.tensor([1])).images[0], images[1])
    assert data.fingerprint() == ImageDataset(images.clone(), torch.tensor([0, 1])).fingerprint()
    assert data.fingerprint() != ImageDataset(images, torch.tensor([1, 1])).fingerprint()
    assert len(data.fingerprint()) == 64
    with pytest.raises(DataError, match="uint8"):
        ImageDataset(images.float(), torch.tensor([0, 1]))
    with pytest.raises(DataError, match="one label per image"):
        ImageDataset(images, torch.tensor([0, 1, 2]))
    floats = to_float(images)
    assert floats.dtype == torch.float32 and float(floats.max()) == pytest.approx(23 / 255)


# --- augmentation ----------------------------------------------------------------------------


def _distinct_batch(n: int = 32, c: int = 2, h: int = 6, w: int = 7) -> torch.Tensor:
    return torch.arange(1, n * c * h * w + 1, dtype=torch.float32).reshape(n, c, h, w)


def test_augment_off_is_identity():
    x = _distinct_batch()
    assert BatchAugment()(x, torch.Generator().manual_seed(0)) is x


def test_crop_equals_some_shifted_window_and_shifts_vary():
    x, p = _distinct_batch(), 2
    out = BatchAugment(crop_padding=p)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    h, w = x.shape[2:]
    offsets = []
    for i in range(len(x)):  # reference: crop each example on its own, try every offset
        found = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(padded[i, :, dy : dy + h, dx : dx + w], out[i])
        ]
        assert len(found) == 1
        offsets.append(found[0])
    assert (len(set(offsets)) > 5 and (p, p) in offsets) or len(set(offsets)) > 5
    again = BatchAugment(crop_padding=p)(x, torch.Generator().manual_seed(0))
    assert torch.equal(again, out)


def test_flip_flips_about_half_the_examples():
    x = _distinct_batch(n=64)
    out = BatchAugment(flip=True)(x, torch.Generator().manual_seed(1))
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 16 < sum(flipped) < 48


# --- batches ---------------------------------------------------------------------------------


def test_epoch_batches_cover_every_index_once_and_resume_exactly():
    batches = EpochBatches(103, 10, seed=7)
    assert len(batches) == batches.num_batches == 11
    epoch = list(batches.indices(3))
    assert [len(b) for b in epoch] == [10] * 10 + [3]
    assert sorted(torch.cat(epoch).tolist()) == list(range(103))
    resumed = list(EpochBatches(103, 10, seed=7).indices(3, start_batch=4))
    assert len(resumed) == 7
    assert all(torch.equal(a, b) for a, b in zip(resumed, epoch[4:], strict=True))
    assert not torch.equal(torch.cat(list(batches.indices(4))), torch.cat(epoch))
    assert not torch.equal(
        torch.cat(list(EpochBatches(103, 10, seed=8).indices(3))), torch.cat(epoch)
    )
    assert len(EpochBatches(103, 10, seed=7, drop_last=True)) == 10


def test_npz_members_that_are_not_npy_arrays_are_one_line(tmp_path):
    path = tmp_path / "raw.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            archive.writestr(key, bytes(100))  # no .npy suffix, no .npy header
    with pytest.raises(DataError) as failed:
        load_splits("npz", path)
    assert str(failed.value) == (
        f"{path}: x_train, y_train, x_test, y_test are not .npy arrays in the zip; save arrays "
        "x_train, y_train, x_test, y_test with numpy.savez"
    )
