"""Arrays of one shape and dtype, appended to an anonymous temporary file and read back one at a
time: an evaluation's maps and masks kept on disk, so memory does not grow with the test set.

The file has no name (it is unlinked as it is made), so it disappears when closed or when the
process ends, crash or not. Items are written and read with plain file calls, not a memory map:
pages of a map count as the process's resident memory for as long as they stay mapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import tempfile
from functools import cache
from pathlib import Path

import numpy as np


class SpillArray:
    """A (N, *item_shape) array on disk: :meth:`append` a batch, index one item (a fresh array);
    ``shape`` as an ndarray's. ``folder``: where the file lives (None: the system's temp folder)."""

    def __init__(self, item_shape: tuple[int, ...], dtype: np.dtype | type = np.float32,
                 folder: Path | str | None = None):
        self.item_shape, self.dtype = tuple(int(s) for s in item_shape), np.dtype(dtype)
        self.item_bytes = int(np.prod(self.item_shape, dtype=np.int64)) * self.dtype.itemsize
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=folder, prefix=".padim-spill-")
        self._fd = self._file.fileno()
        self.count = 0

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, *item_shape)."""
        return (self.count, *self.item_shape)

    def __len__(self) -> int:
        return self.count

    def append(self, batch: np.ndarray) -> None:
        """Add the items of ``batch`` (B, *item_shape), converted to the dtype, at the end."""
        batch = np.ascontiguousarray(batch, dtype=self.dtype)
        if batch.shape[1:] != self.item_shape:
            raise ValueError(f"items of shape {batch.shape[1:]}, expected {self.item_shape}")
        view = memoryview(batch).cast("B")
        offset, written = self.count * self.item_bytes, 0
        while written < len(view):
            written += os.pwrite(self._fd, view[written:], offset + written)
        self.count += batch.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += self.count
        if not 0 <= i < self.count:
            raise IndexError(f"item {i} of {self.count}")
        data = bytearray()
        offset = i * self.item_bytes
        while len(data) < self.item_bytes:  # os.pread may return less than asked
            chunk = os.pread(self._fd, self.item_bytes - len(data), offset + len(data))
            if not chunk:
                raise OSError(f"spill file ends before item {i}")
            data += chunk
        return np.frombuffer(data, dtype=self.dtype).reshape(self.item_shape)

    def close(self) -> None:
        """Free the file (its space on disk)."""
        self._file.close()


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    A streamed evaluation frees each image's temporaries, but glibc keeps freed heap pages that
    sit below live objects (the few bytes kept per image), so the resident size still grew with
    the test set (2.2x from 500 to 5,000 images) without this call after each batch.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
