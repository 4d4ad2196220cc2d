"""Decode the first training images while the process starts.

A command that fits spends its first seconds importing torch, on one core; the other core idles.
:class:`Prefetch` forks a process before torch is imported that decodes training images, in
order, into shared memory, until the fit takes them (:meth:`Prefetch.take`): it stops there, so it
never competes with the network's threads (docs/performance.md). The images it did not reach,
and any it could not decode, are read by the fit as usual, with its errors and warnings.
"""

from __future__ import annotations

import mmap
import multiprocessing
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .images import ImageSource, read_image

PREFETCH_BYTES = 256 << 20  # decoded images held at most (about 550 at 320 x 480)


def _decode(paths: Sequence[Path], size: tuple[int, int], buffer: mmap.mmap, done, stop) -> None:
    """The prefetching process: decode ``paths`` into ``buffer`` one after another, counting them
    in ``done``, until ``stop`` is set or a file fails (the fit then reads it and reports it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the command's to report, not this helper's
    try:
        images = np.frombuffer(buffer, np.uint8)[:len(paths) * size[0] * size[1] * 3].reshape(-1, size[0], size[1], 3)
        for i, path in enumerate(paths):
            if stop.is_set():
                return
            images[i] = np.asarray(read_image(path, size))
            done.value = i + 1
    except Exception:  # noqa: BLE001, S110 - the fit decodes this file itself and names it in its error
        return


def can_prefetch() -> bool:
    """Whether a process can be forked safely here: fork exists and torch (with its thread pools)
    is not loaded yet."""
    return "torch" not in sys.modules and "fork" in multiprocessing.get_all_start_methods()


class Prefetch:
    """Decode ``paths`` at ``size`` (h, w) in a forked process, at most ``max_bytes`` of them, from
    now until :meth:`take`. Start it before torch is imported (:func:`can_prefetch`)."""

    def __init__(self, paths: Sequence[Path], size: tuple[int, int], max_bytes: int = PREFETCH_BYTES):
        self.paths, self.size = list(paths), (int(size[0]), int(size[1]))
        per_image = self.size[0] * self.size[1] * 3
        self.capacity = min(len(self.paths), max_bytes // per_image)
        context = multiprocessing.get_context("fork")
        self.buffer = mmap.mmap(-1, max(1, self.capacity * per_image))  # anonymous, shared with the child
        self.done, self.stop = context.Value("l", 0, lock=False), context.Event()
        self.process = context.Process(target=_decode, daemon=True, name="padim-prefetch",
                                       args=(self.paths[:self.capacity], self.size, self.buffer, self.done, self.stop))
        self.process.start()

    def take(self, size: Sequence[int]) -> list[ImageSource]:
        """Stop decoding; the images in order: (h, w, 3) uint8 arrays for those decoded, then the
        paths of the rest (all paths when ``size``, the model's, is not the one decoded at)."""
        self.close()
        n = int(self.done.value) if tuple(size) == self.size and self.buffer is not None else 0
        if n == 0:
            return list(self.paths)
        decoded = np.frombuffer(self.buffer, np.uint8, count=n * self.size[0] * self.size[1] * 3)
        self.buffer = None  # the arrays keep the memory alive as long as the fit holds them
        return [*decoded.reshape(n, self.size[0], self.size[1], 3), *self.paths[n:]]

    def close(self) -> None:
        """Stop the decoding process and wait for it (again: nothing); a command that fails before
        its fit takes the images calls it, so no process outlives it."""
        self.stop.set()
        self.process.join()
