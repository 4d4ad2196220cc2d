"""Replacing the served model while the service runs: on SIGHUP, or when the model file changes.

The new file is loaded and tried on one blank image on a background thread, then swapped in by a
single reference assignment: a request reads :attr:`ModelSlot.current` once and finishes on that
model, so requests in flight when the swap happens finish on the old one. A file that does not load
leaves the old model serving, with one warning line naming the file and the reason.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..export.runtime import external_data_path
from .inspector import Inspector

log = logging.getLogger("padim.serve")

Stamp = tuple[int, int, int] | None  # (mtime_ns, size, inode) of one file; None when it is missing
Fingerprint = tuple[Stamp, ...]


def model_files(path: Path) -> list[Path]:
    """The files a model at ``path`` is read from: the file, and the weights file an exported model
    may keep beside it (``.onnx.data``, or the ``.bin`` of an OpenVINO ``.xml``)."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return [path, external_data_path(path)]
    if suffix == ".xml":
        return [path, path.with_suffix(".bin")]
    return [path]


def fingerprint(path: Path) -> Fingerprint:
    """(mtime_ns, size, inode) of each of :func:`model_files`: a rename over the file changes the inode."""
    stamps = []
    for part in model_files(path):
        try:
            st = part.stat()
        except OSError:
            stamps.append(None)
        else:
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(stamps)


@dataclass(frozen=True)
class Loaded:
    """One loaded model: the inspector, the fingerprint of its files before loading, when (epoch seconds)."""

    inspector: Inspector
    fingerprint: Fingerprint
    at: float


class ModelSlot:
    """The model being served, and its replacement by a newer file at the same path.

    ``listeners`` are called as ``listener(old, new)`` (inspectors) on the loading thread after each swap.
    """

    def __init__(self, inspector: Inspector, opener: Callable[[], Inspector] | None = None,
                 seen: Fingerprint | None = None):
        """``opener`` loads the file again (default: :meth:`Inspector.reopen`); ``seen``: the fingerprint
        taken before ``inspector`` was loaded (default: now)."""
        self.path = inspector.path
        self._open = opener or inspector.reopen
        self.loaded = Loaded(inspector, seen if seen is not None else fingerprint(self.path), time.time())
        self.reloads = self.failures = 0
        self.listeners: list[Callable[[Inspector, Inspector], None]] = []
        self._rejected: Fingerprint | None = None  # the files that failed: not tried again until they change
        self._loading = threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> Inspector:
        """The inspector to use for a whole request (read it once)."""
        return self.loaded.inspector

    def reload(self, force: bool = True) -> bool:
        """Load the file and swap it in; True when swapped. Without ``force``, only when the files differ
        from the ones served and from the last ones that failed."""
        with self._loading:
            seen = fingerprint(self.path)
            if not force and seen in (self.loaded.fingerprint, self._rejected):
                return False
            old = self.loaded.inspector
            try:
                new = self._open()
                new.warm_up()
            except Exception as exc:  # whatever a bad file raises, the old model keeps serving
                self._rejected, self.failures = seen, self.failures + 1
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].removeprefix(f"{self.path}: ")
                log.warning("%s: not reloaded, still serving model %s: %s", self.path, old.model_id, reason)
                return False
            self.loaded = Loaded(new, seen, time.time())  # the swap: one reference assignment
            self.reloads += 1
        log.info("%s: reloaded, now serving model %s (was %s)", self.path, new.model_id, old.model_id)
        for listener in self.listeners:
            listener(old, new)
        return True

    def request_reload(self) -> None:
        """Ask the watcher thread to reload now (safe to call from a signal handler)."""
        self._wake.set()

    def watch(self, interval: float) -> None:
        """Start the watcher thread: it reloads on :meth:`request_reload` and, with ``interval`` > 0,
        when the files' fingerprint has changed and stayed the same for one more poll (a model written
        as two files, an ONNX graph and its weights, is renamed in place one file at a time)."""
        if self._thread is not None:
            raise RuntimeError("the model file is already watched")
        self._thread = threading.Thread(target=self._run, args=(interval,), name="padim-model-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the watcher thread (after a load in progress)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self, interval: float) -> None:
        pending = None
        while True:
            asked = self._wake.wait(interval if interval > 0 else None)
            if self._stop.is_set():
                return
            if asked:
                self._wake.clear()
                pending = None
                self._reload_logged(force=True)
                continue
            seen = fingerprint(self.path)
            if seen in (self.loaded.fingerprint, self._rejected) or seen != pending:
                pending = None if seen in (self.loaded.fingerprint, self._rejected) else seen
                continue
            pending = None
            self._reload_logged(force=False)

    def _reload_logged(self, force: bool) -> None:
        try:
            self.reload(force)
        except Exception:  # a bug here must not end the watcher: reloading would silently stop
            log.exception("%s: reload failed", self.path)


def reload_on_sighup(slot: ModelSlot):
    """Make SIGHUP ask ``slot`` to reload (main thread only); returns the previous handler."""
    return signal.signal(signal.SIGHUP, lambda signum, frame: slot.request_reload())
