"""``generalist data fetch``: download a dataset's official files, verify, unpack in place.

Each file is downloaded to ``DIR/.downloads/<name>.part``; an interrupted download is resumed
from where it stopped with an HTTP ``Range`` request (a server that ignores it sends the file
again from the start, which is detected). A complete file must match its published MD5 before
anything is unpacked; a mismatch deletes it, since resuming a corrupt file cannot repair it.
Unpacking goes into a temporary folder inside ``DIR`` that is renamed into place only when it
is complete, so an interrupted or failed unpack leaves nothing half-written under its final
name. The unpacked dataset is then read once by its reader, which proves ``--data-dir`` works.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from generalist.data.readers import READERS
from generalist.errors import DataError

CHUNK = 1 << 20
TIMEOUT_S = 60


@dataclass(frozen=True)
class Remote:
    """One file to download: where from (mirrors, in order), and its published MD5."""

    name: str
    urls: tuple[str, ...]
    md5: str
    query: str = ""
    """Appended to the URL of the built-in mirrors (``?download=1`` on Zenodo), not to
    ``--mirror``'s, which serves plain file names."""


@dataclass(frozen=True)
class Source:
    """A dataset's files and how they become the folder its reader expects."""

    files: tuple[Remote, ...]
    folder: str
    """The folder created in DIR (what the archive unpacks to, or where plain files go)."""
    unpack: str
    """``tar``: each file is a tar archive holding ``folder``; ``copy``: files go in as they are."""
    data_dir: str
    """What to pass as ``--data-dir``, relative to DIR."""


CIFAR_SITE = "https://www.cs.toronto.edu/~kriz/"
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
# MD5s: CIFAR's are published on https://www.cs.toronto.edu/~kriz/cifar.html; MNIST's site
# publishes none, so these are the ones torchvision and most loaders check the originals with.
SOURCES: dict[str, Source] = {
    "cifar10": Source(
        (Remote("cifar-10-python.tar.gz", (CIFAR_SITE,), "c58f30108f718f92721af3b95e74349a"),),
        "cifar-10-batches-py",
        "tar",
        ".",
    ),
    "cifar100": Source(
        (Remote("cifar-100-python.tar.gz", (CIFAR_SITE,), "eb9058c3a382ffc7106e4002c42a8d85"),),
        "cifar-100-python",
        "tar",
        ".",
    ),
    "mnist": Source(
        tuple(
            Remote(name, MNIST_MIRRORS, md5)
            for name, md5 in (
                ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
                ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
                ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
                ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
            )
        ),
        "mnist",
        "copy",
        "mnist",
    ),
}

# CIFAR-10-C and CIFAR-100-C (Hendrycks & Dietterich, ICLR 2019): one tar each on Zenodo
# (records 2535967 and 3555552), about 2.9 GB. The MD5s are those the Zenodo records list; this
# project's machines cannot reach Zenodo, so they were checked against several independent
# public loaders that verify the same archives, not against a download of our own.
ZENODO = "https://zenodo.org/records/{}/files/"
CORRUPTION_SETS: dict[str, Source] = {
    "cifar10-c": Source(
        (
            Remote(
                "CIFAR-10-C.tar",
                (ZENODO.format(2535967),),
                "56bf5dcef84df0e2308c6dcbcbbd8499",
                "?download=1",
            ),
        ),
        "CIFAR-10-C",
        "tar",
        "CIFAR-10-C",
    ),
    "cifar100-c": Source(
        (
            Remote(
                "CIFAR-100-C.tar",
                (ZENODO.format(3555552),),
                "11f0ed0f1191edbf9fa23466ae6021d3",
                "?download=1",
            ),
        ),
        "CIFAR-100-C",
        "tar",
        "CIFAR-100-C",
    ),
}
SOURCES.update(CORRUPTION_SETS)

IMAGENET_HOWTO = """\
ImageNet (ILSVRC-2012) cannot be downloaded without an account: its licence asks each user to
register. To train on it:
  1. Register at https://image-net.org, accept the terms and download into {dir}:
       ILSVRC2012_img_train.tar   138 GB   MD5 1d675b47d978889d74fa0da5fadfb00e
       ILSVRC2012_img_val.tar     6.3 GB   MD5 29b22e2961454d5413ddabcf34fc5622
     (check them with: md5sum ILSVRC2012_img_*.tar)
  2. Unpack the training set into one folder per class (the archive holds one tar per class):
       mkdir -p {dir}/train && tar -xf ILSVRC2012_img_train.tar -C {dir}/train
       cd {dir}/train && for f in n*.tar; do mkdir "${{f%.tar}}" && tar -xf "$f" -C "${{f%.tar}}" \\
         && rm "$f"; done
  3. Unpack the validation images into {dir}/val and move each into the folder of its class
     (n01440764/ ...): the labels are in ILSVRC2012_devkit_t12.tar.gz (same download page);
     the valprep.sh script linked from PyTorch's examples/imagenet README does the moving.
  4. Check: {dir}/train and {dir}/val each hold 1,000 class folders (1,281,167 and 50,000
     images). Then train with
       generalist train --preset generalist-d --dataset imagenet --data-dir {dir}
"""


def fetch(
    name: str,
    directory: str | Path,
    *,
    mirror: str | None = None,
    source: Source | None = None,
    echo: Callable[[str], None] = print,
) -> Path | None:
    """Download, verify and unpack dataset ``name`` into ``directory``; the ``--data-dir`` to
    use (None for ImageNet, whose steps are printed). ``mirror`` replaces every file's base
    URL; ``source`` replaces the built-in description (tests serve their own archive)."""
    directory = Path(directory).expanduser()
    if name == "imagenet":
        echo(IMAGENET_HOWTO.format(dir=directory))
        return None
    if source is None:
        if name not in SOURCES:
            raise DataError(
                f"cannot fetch {name!r}; choose one of {', '.join([*SOURCES, 'imagenet'])}"
            )
        source = SOURCES[name]
    target = directory / source.folder
    data_dir = directory / source.data_dir
    if target.exists():
        echo(f"{target} already exists; nothing downloaded (delete it to fetch {name} again)")
        return data_dir
    downloads = directory / ".downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    files = [_download(remote, downloads, mirror, echo) for remote in source.files]
    _unpack(name, files, source, directory, target)
    use = (
        f"evaluate with generalist eval RUN --corruptions {data_dir}"
        if name in CORRUPTION_SETS
        else f"pass --dataset {name} --data-dir {data_dir}"
    )
    echo(f"{name} is ready in {target}: {use}")
    for path in files:
        path.unlink()
    if not any(downloads.iterdir()):
        downloads.rmdir()
    return data_dir


def _download(remote: Remote, downloads: Path, mirror: str | None, echo) -> Path:
    """The verified file in ``downloads``, fetched or resumed from the first mirror that
    answers; one-line :class:`DataError` when none does or the bytes do not match."""
    done = downloads / remote.name
    if done.is_file() and _md5(done) == remote.md5:
        return done
    part = downloads / f"{remote.name}.part"
    urls = [mirror.rstrip("/") + "/"] if mirror else list(remote.urls)
    failures = []
    for base in urls:
        url = base + remote.name + ("" if mirror else remote.query)
        try:
            _transfer(url, part, echo)
            break
        except (urllib.error.URLError, OSError) as error:
            failures.append(f"{url}: {getattr(error, 'reason', None) or error}")
    else:
        raise DataError(
            f"could not download {remote.name} ({'; '.join(failures)}); check the connection "
            "and run the same command again, which resumes what was downloaded"
        )
    got = _md5(part)
    if got != remote.md5:
        part.unlink()
        raise DataError(
            f"{remote.name} from {url} has MD5 {got}, not the published {remote.md5}: it is "
            "corrupt or not the official file, so it was deleted; run the command again "
            "(or use another --mirror)"
        )
    part.replace(done)
    return done


def _transfer(url: str, part: Path, echo) -> None:
    """Append the rest of ``url`` to ``part``; raises :class:`DataError` on a cut-off
    transfer (keeping what arrived, for the next attempt to resume)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # nothing left to send: the part is whole
            return
        raise
    with response:
        resumed = response.status == 206
        if have and not resumed:
            echo(f"{url} does not resume downloads; starting it again")
        size = response.headers.get("Content-Length")
        expected = int(size) if size is not None else None
        received = 0
        verb = f"resuming {url} at {have:,} bytes" if resumed else f"downloading {url}"
        echo(verb + (f" ({expected:,} bytes to go)" if expected is not None else ""))
        with open(part, "ab" if resumed else "wb") as out:
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    received += len(chunk)
            except (http.client.IncompleteRead, ConnectionError, TimeoutError):
                pass  # judged by the byte count below
    if expected is not None and received < expected:
        raise DataError(
            f"the download of {url} stopped after {received:,} of {expected:,} bytes; run the "
            "same command again to resume it"
        )


def _unpack(
    name: str, files: Sequence[Path], source: Source, directory: Path, target: Path
) -> None:
    """Everything into a temporary folder beside ``target``, read once by the dataset's
    reader (so ``--data-dir`` is known to work), then one rename."""
    staging = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=directory))
    try:
        if source.unpack == "tar":
            for archive in files:
                _extract(archive, staging)
            unpacked = staging / source.folder
            if not unpacked.is_dir():
                raise DataError(
                    f"{files[0].name} does not hold a {source.folder} folder; it is not the "
                    "official archive"
                )
        else:
            unpacked = staging / source.folder
            unpacked.mkdir()
            for path in files:
                _check_gzip(path)
                shutil.copyfile(path, unpacked / path.name)
        from generalist.data.corruption_sets import read_cifar_c  # loads SciPy: only here

        read = read_cifar_c if name in CORRUPTION_SETS else READERS[name]
        read(staging / source.data_dir)
        unpacked.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract(archive: Path, into: Path) -> None:
    """Plain files and folders that stay inside ``into``: an archive with absolute paths,
    ``..`` or links is refused, whatever the Python version's own tar filters do."""
    root = into.resolve()
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                inside = (root / member.name).resolve().is_relative_to(root)
                if not inside or not (member.isfile() or member.isdir()):
                    raise DataError(
                        f"{archive} holds {member.name!r}, a link or a path outside the folder; "
                        "refusing to unpack it: it is not the official archive"
                    )
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(into, members, **safe)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f"cannot unpack {archive} ({error}); delete it and fetch again") from None


def _check_gzip(path: Path) -> None:
    try:
        with gzip.open(path) as stream:
            while stream.read(CHUNK):
                pass
    except (OSError, EOFError) as error:
        raise DataError(
            f"{path} is not a valid .gz file ({error}); delete it, fetch again"
        ) from None


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
