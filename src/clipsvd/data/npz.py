"""Arrays inside an .npz file (MedMNIST), read with numpy, one row at a time when possible.

MedMNIST files are compressed: a whole ``train_images`` array at 224 px can be many GB, so
preparation streams rows out of the zip member instead of loading the array.
"""
from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import DataError


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class NpzFile:
    """Read access to the arrays of one .npz file; every problem is a DataError naming it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{self.path}: not a readable .npz file ({_reason(exc)}); "
                            "download it again") from None

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> "NpzFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def keys(self) -> list[str]:
        return sorted(n[:-4] for n in self._zip.namelist() if n.endswith(".npy"))

    def _open(self, key: str):
        try:
            return self._zip.open(f"{key}.npy")
        except KeyError:
            raise DataError(f"{self.path}: has no array '{key}' (has: {', '.join(self.keys())})"
                            "; use the file as published") from None

    def header(self, key: str) -> tuple[tuple[int, ...], np.dtype, bool]:
        """(shape, dtype, fortran_order) of an array without reading its data."""
        with self._open(key) as handle:
            try:
                version = np.lib.format.read_magic(handle)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
                else:
                    array = np.lib.format.read_array(handle, allow_pickle=False)
                    return array.shape, array.dtype, False
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise DataError(f"{self.path}: array '{key}' is not readable "
                                f"({_reason(exc)}); download the file again") from None
        return tuple(shape), np.dtype(dtype), bool(fortran)

    def read(self, key: str) -> np.ndarray:
        """The whole array (for labels and other small arrays)."""
        with self._open(key) as handle:
            try:
                return np.lib.format.read_array(handle, allow_pickle=False)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise DataError(f"{self.path}: array '{key}' is not readable "
                                f"({_reason(exc)}); download the file again") from None

    def rows(self, key: str, start: int = 0) -> Iterator[np.ndarray]:
        """Yield ``array[start]``, ``array[start + 1]``, ... decompressing as it goes."""
        shape, dtype, fortran = self.header(key)
        if fortran or dtype.hasobject or not shape:
            yield from self.read(key)[start:]
            return
        row_shape = shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        with self._open(key) as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                np.lib.format.read_array_header_2_0(handle)
            else:
                yield from np.lib.format.read_array(handle, allow_pickle=False)[start:]
                return
            if start:
                _skip(handle, start * row_bytes)
            for _ in range(start, shape[0]):
                try:
                    data = handle.read(row_bytes)
                except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                    raise DataError(f"{self.path}: array '{key}' is not readable "
                                    f"({_reason(exc)}); download the file again") from None
                if len(data) != row_bytes:
                    raise DataError(f"{self.path}: array '{key}' ends early (truncated file); "
                                    "download it again")
                yield np.frombuffer(data, dtype=dtype).reshape(row_shape)


def _skip(handle, count: int, block: int = 1 << 24) -> None:
    while count > 0:
        data = handle.read(min(block, count))
        if not data:
            return
        count -= len(data)
