"""Read CIFAR's python-pickle batches without letting the file run code.

A bare ``pickle.load`` executes whatever callable the file names, so a swapped ``test_batch`` would
run arbitrary code on the training machine. The official batches only ever reference numpy's array
reconstruction machinery, so everything else is refused before it is imported.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import IO, Any

import numpy as np

from generalist.errors import DataError, UnsafeFileError

try:  # numpy >= 2 moved the implementation; both spellings appear in real CIFAR files.
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy < 2
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    (module, name): getattr(_multiarray, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
}
_ALLOWED_GLOBALS[("numpy", "ndarray")] = np.ndarray
_ALLOWED_GLOBALS[("numpy", "dtype")] = np.dtype


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], source: str) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeFileError(
                f"refusing to load global {module}.{name} from {self._source}; the file is not a "
                "CIFAR batch from the official archive, so replace it with a fresh download"
            ) from None


def _str_keys(obj: Any) -> Any:
    """Python 2 pickles (the official archive) decode with ``bytes`` keys; callers want ``str``."""
    if isinstance(obj, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    return obj


def safe_load_pickle(path_or_file: str | Path | IO[bytes]) -> object:
    """Unpickle a CIFAR batch, allowing only the numpy globals such batches reference."""
    if isinstance(path_or_file, (str, Path)):
        source = str(path_or_file)
        try:
            with open(path_or_file, "rb") as file:
                return _load(file, source)
        except OSError as error:
            raise DataError(f"cannot read {source} ({error.strerror}); check the path") from None
    return _load(path_or_file, str(getattr(path_or_file, "name", "<stream>")))


def _load(file: IO[bytes], source: str) -> object:
    try:
        return _str_keys(_AllowListUnpickler(file, source).load())
    except UnsafeFileError:
        raise
    except Exception as error:  # any parse failure means a damaged file, whatever its type
        raise DataError(
            f"{source} is truncated or corrupt ({type(error).__name__}: {error}); "
            "replace it with a fresh copy from the official archive"
        ) from None
