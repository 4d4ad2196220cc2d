"""Atomic file writes: an output is either complete or absent, also if the process is killed.

A write goes to a hidden temporary file beside the target (``.<stem>.<random>.tmp<suffix>``),
is fsynced and renamed over the target. A process killed mid-write can leave such a temporary
behind (never the target itself half-written); the next write of the same target removes the
leftovers that no live writer holds (each writer keeps an exclusive ``flock`` on its temporary).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import glob
import io
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_pattern(path: Path) -> str:
    return str(path.parent / f".{glob.escape(path.stem)}.*.tmp{glob.escape(path.suffix)}")


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete temporaries of ``path`` left by killed writers; returns what was removed.

    A temporary whose lock can be taken has no live writer (locks die with their process).
    """
    path = Path(path)
    removed = []
    for name in glob.glob(_temp_pattern(path)):
        try:
            fd = os.open(name, os.O_RDONLY)
        except OSError:
            continue  # renamed or removed meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live writer holds it
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
                removed.append(Path(name))
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    The temporary name keeps the suffix so writers that infer a format from it (matplotlib) work.
    On error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    tmp_path = Path(tmp)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until the rename is done: marks the temporary as live
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give outputs the usual mode
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # again: a writer may have replaced the file (safetensors does)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp_path.unlink(missing_ok=True)
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Atomically write UTF-8 ``text`` to ``path``."""
    write_bytes(path, text.encode("utf-8"))


def csv_text(header: Sequence[str], rows: list[Sequence]) -> str:
    """A CSV document (for :func:`write_text`): the header line, then the rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()
