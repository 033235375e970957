"""Streaming image-folder loader: images/s per worker core, and resident memory while streaming.

Three measurements, each printed as a Markdown table for BENCHMARKS.md:

1. ``folders``: generates JPEG folders of N and 2N images (CIFAR-10 subset images, upscaled and
   varied) and streams one epoch of each with the training transform, recording images/s and
   the memory (PSS of the main process plus its loader workers) over the epoch: memory
   must not grow with the folder.
2. ``decode``: per-image decode + RandomResizedCrop to 224 of ImageNet-sized JPEGs (500 x 375),
   with and without the JPEG draft (libjpeg's reduced-size decoding) that the loader uses.
3. ``gather``: what a learner-parallel process pays to receive a share of a 224 px batch from
   its peer (gloo all-gather on this machine) against decoding that share itself.

Run: OMP_NUM_THREADS=1 python benchmarks/streaming_loader.py --images 20000 --workers 1 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from generalist.data import EpochBatches, load_splits
from generalist.data.folders import FileImages, FolderOptions
from generalist.data.images import decode, sample_seed
from generalist.data.streaming import StreamingBatches

CIFAR_DIR = Path("/work/shared/data/cifar10-subset")


def make_folder(root: Path, count: int, size: tuple[int, int], classes: int = 10) -> Path:
    """``count`` JPEGs in ``classes`` class folders: CIFAR images upscaled to ``size``, with a
    per-image brightness change so no two files are the same."""
    cifar = load_splits("cifar10", CIFAR_DIR, val_size=0).train
    pixels = cifar.images.permute(0, 2, 3, 1).numpy()
    for split in ("train", "val"):
        for label in range(classes):
            (root / split / f"class{label:02d}").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        source = pixels[index % len(pixels)].astype(np.int16) + (index // len(pixels)) % 7 - 3
        image = Image.fromarray(source.clip(0, 255).astype(np.uint8)).resize(size)
        image.save(root / "train" / f"class{index % classes:02d}" / f"{index:06d}.jpg", quality=90)
    for label in range(classes):  # the reader wants a val split too
        image = Image.fromarray(pixels[label]).resize(size)
        image.save(root / "val" / f"class{label:02d}" / "0.jpg", quality=90)
    return root


def pss_mb(pid: int) -> float:
    """Memory of ``pid`` and its children (loader workers) in MB: the proportional set size,
    which counts pages a forked worker still shares with its parent once, not once per
    process as the resident sizes (RSS) would."""
    total = 0
    for process in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{process}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass  # a worker that just exited
    return total / 1e6


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        found += [int(c) for c in children]
    return found


def stream_epoch(root: Path, workers: int, image_size: int, batch_size: int) -> dict:
    options = FolderOptions(image_size=image_size, storage="stream", workers=workers)
    splits = load_splits("imagefolder", root, val_size=0, folder=options, echo=lambda _: None)
    train = splits.train
    assert isinstance(train, FileImages)
    source = StreamingBatches(
        train, EpochBatches(len(train), batch_size, seed=0), torch.device("cpu"), echo=print
    )
    samples, images = [], 0
    started = time.perf_counter()
    for number, batch in enumerate(source.epoch(1)):
        images += len(batch.y)
        if number % 10 == 0:
            samples.append(pss_mb(os.getpid()))
    seconds = time.perf_counter() - started
    return {
        "images": images,
        "seconds": seconds,
        "per_s": images / seconds,
        "first": samples[0],
        "middle": samples[len(samples) // 2],
        "last": samples[-1],
        "max": max(samples),
    }


def folders(args: argparse.Namespace) -> None:
    print(
        "| folder | workers | images/s | per worker core "
        "| memory MB, PSS (start / middle / end / max) |"
    )
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for count in (args.images, 2 * args.images):
            root = Path(tmp) / f"n{count}"
            started = time.perf_counter()
            make_folder(root, count, (args.width, args.height))
            made = time.perf_counter() - started
            print(f"<!-- generated {count} JPEGs in {made:.0f} s -->")
            for workers in args.workers:
                r = stream_epoch(root, workers, args.image_size, args.batch_size)
                per_core = r["per_s"] / max(1, workers)
                print(
                    f"| {count:,} JPEGs {args.width}x{args.height} | {workers} | "
                    f"{r['per_s']:,.0f} | {per_core:,.0f} | {r['first']:.0f} / "
                    f"{r['middle']:.0f} / {r['last']:.0f} / {r['max']:.0f} |",
                    flush=True,
                )


def decode_costs(args: argparse.Namespace) -> None:
    """ms per image for the training decode at 224, with and without the JPEG draft."""
    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder(Path(tmp), 200, (500, 375), classes=1)
        files = sorted(str(p) for p in (root / "train").rglob("*.jpg"))
        plain = Image.Image.draft
        print("| decode + RandomResizedCrop to 224, 500x375 JPEG | ms per image |")
        print("|---|---|")
        for label, draft in (("with JPEG draft (the loader)", plain), ("without draft", None)):
            if draft is None:
                Image.Image.draft = lambda self, mode, size: None  # type: ignore[method-assign]
            try:
                started = time.perf_counter()
                for index, path in enumerate(files):
                    decode(path, 224, sample_seed(0, 1, index))
                ms = (time.perf_counter() - started) / len(files) * 1000
            finally:
                Image.Image.draft = plain  # type: ignore[method-assign]
            print(f"| {label} | {ms:.2f} |")
        started = time.perf_counter()
        for path in files:
            decode(path, 224)
        ms = (time.perf_counter() - started) / len(files) * 1000
        print(f"| evaluation view (Resize 256 + CenterCrop 224), with draft | {ms:.2f} |")


def _gather_rank(rank: int, port: int, share: int, repeats: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    part = torch.randint(0, 255, (share, 3, 224, 224), dtype=torch.uint8)
    parts = [torch.empty_like(part) for _ in range(2)]
    dist.all_gather(parts, part)  # warm-up: connections
    started = time.perf_counter()
    for _ in range(repeats):
        dist.all_gather(parts, part)
    seconds = (time.perf_counter() - started) / repeats
    if rank == 0:
        out.write_text(str(seconds))
    dist.destroy_process_group()


def gather_cost(args: argparse.Namespace) -> None:
    share = 32  # half of a 64-image batch share: what one of two learners' processes receives
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "seconds"
        spawn = multiprocessing.get_context("spawn")
        ranks = [spawn.Process(target=_gather_rank, args=(r, port, share, 20, out)) for r in (0, 1)]
        for process in ranks:
            process.start()
        for process in ranks:
            process.join()
        seconds = float(out.read_text())
    mb = share * 3 * 224 * 224 / 1e6
    print(
        f"| gloo all-gather, 2 processes, {share} images of 224 px each ({mb:.1f} MB) "
        f"| {seconds * 1000:.1f} ms ({seconds / share * 1000:.2f} ms per image received) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--width", type=int, default=80)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--only", choices=["folders", "decode", "gather"], nargs="+", default=None)
    args = parser.parse_args()
    parts = {"folders": folders, "decode": decode_costs, "gather": gather_cost}
    for name in args.only or list(parts):
        parts[name](args)


if __name__ == "__main__":
    main()
