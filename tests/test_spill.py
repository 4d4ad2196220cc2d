"""padim.spill: arrays appended to a nameless temporary file come back unchanged, one at a time."""

from __future__ import annotations

import numpy as np
import pytest

from padim.spill import SpillArray


def test_items_come_back_unchanged_and_leave_no_file(tmp_path, rng):
    store = SpillArray((5, 7), np.float32, tmp_path / "run")
    first, second = rng.random((3, 5, 7)), rng.random((2, 5, 7)).astype(np.float32)
    store.append(first)
    store.append(second)
    assert store.shape == (5, 5, 7) and len(store) == 5
    assert np.array_equal(store[1], first[1].astype(np.float32)) and np.array_equal(store[-1], second[1])
    item = store[4]
    item[0, 0] = -1.0  # a fresh array: the store keeps its copy
    assert store[4][0, 0] == second[1][0, 0]
    assert list((tmp_path / "run").iterdir()) == []  # the file has no name in the folder
    with pytest.raises(IndexError):
        store[5]
    with pytest.raises(ValueError, match="items of shape"):
        store.append(np.zeros((1, 7, 5)))
    store.close()


def test_packed_masks_round_trip(tmp_path):
    mask = np.zeros((9, 13), bool)
    mask[2:5, 3:11] = True
    store = SpillArray(((9 * 13 + 7) // 8,), np.uint8, tmp_path)
    store.append(np.packbits(mask)[None])
    assert np.array_equal(np.unpackbits(store[0], count=9 * 13).reshape(9, 13).astype(bool), mask)
    store.close()


def test_release_freed_memory_runs_anywhere():
    from padim.spill import release_freed_memory

    assert release_freed_memory() is None  # glibc: pages handed back; elsewhere: nothing to do
