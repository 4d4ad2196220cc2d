"""Connecting to a Dask cluster, checking its workers, and the per-worker model cache."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from math import ceil
from pathlib import Path
from typing import Any

from distributed import Client, LocalCluster, WorkerPlugin, get_worker

from .. import __version__
from ..errors import ClusterError, DatasetError

LOCAL = "local:"
RETRIES = 2  # extra tries of a task that raised (a killed worker is rescheduled by Dask anyway)
# Images per task at most. A fit task returns one partial statistic (hundreds of MB at the defaults), far
# more than its images (~136 kB each for VisA JPEGs), so fit shards are large; a scoring task
# returns a row count, and its shard is the unit of resumption, so scoring shards are small.
FIT_SHARD_SIZE = 512
PREDICT_SHARD_SIZE = 64


@contextlib.contextmanager
def connect(address: str, dashboard: bool = True) -> Iterator[Client]:
    """A client of the scheduler at ``address``, or of a new LocalCluster for ``local:N``.

    ``local:N`` starts N worker processes with one thread each (torch uses one core per worker);
    the cluster is closed on exit. ``dashboard=False`` starts no web dashboard.
    """
    if address.startswith(LOCAL):
        try:
            n = int(address[len(LOCAL):])
        except ValueError:
            n = 0
        if n < 1:
            raise ClusterError(f"--dask {address!r}: expected local:N with N >= 1 workers")
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                          dashboard_address=":0" if dashboard else None) as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(address, timeout="30s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise ClusterError(f"--dask {address!r}: cannot reach the Dask scheduler ({exc})") from exc
    with client:
        yield client


def _worker_view(dask_worker, probe: str | None) -> tuple[str, bool]:
    # runs on every worker via client.run: its package version and whether it sees the data
    return __version__, probe is None or os.path.exists(probe)


def prepare(client: Client, probe: str | Path | None = None, timeout: float = 60.0) -> int:
    """Register the model cache and check every worker: same package version, sees ``probe``.

    Returns the number of workers. ``probe`` is one input file: data must be on a path that
    every worker can read (a shared or network file system), since workers are sent file names.
    """
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError as exc:
        raise ClusterError(f"no Dask worker joined the scheduler within {timeout:.0f} s") from exc
    client.register_plugin(ModelCache())
    views = client.run(_worker_view, probe=None if probe is None else str(probe))
    for address, (version, sees) in sorted(views.items()):
        if version != __version__:
            raise ClusterError(f"worker {address} runs visa-padim {version}, this client {__version__}; "
                               "install the same version everywhere")
        if not sees:
            raise DatasetError(f"{probe}: not visible on worker {address}; the data must be on a path "
                               "every worker can read (shared or network file system)")
    return len(views)


def shards(items: Sequence, size: int, multiple: int = 1, at_least: int | None = None) -> list[list]:
    """``items`` cut into consecutive shards on a grid of ``multiple`` items.

    Without ``at_least``: shards of ``size`` rounded up to the grid (the last one shorter), so the
    cut depends only on the items and the sizes. With ``at_least``: at least that many shards (one
    per worker thread, when there are enough items) of equal length, none much above ``size``.
    With ``multiple`` = the batch size every shard's batches are exactly the single-process batches,
    so the backbone sees the same inputs in both and only the float64 summation order differs.
    """
    if not items:
        return []
    n = ceil(len(items) / max(1, size)) if at_least is None else max(ceil(len(items) / max(1, size)), at_least)
    per = ceil((len(items) / n if at_least is not None else size) / multiple) * multiple
    return [list(items[i:i + per]) for i in range(0, len(items), per)]


def worker_threads(client: Client) -> int:
    """Tasks the cluster runs at once (the sum of its workers' threads)."""
    return max(1, sum(client.nthreads().values()))


class ModelCache(WorkerPlugin):
    """Per-worker cache of built models, keyed by their parameters (at most ``maxsize`` kept).

    This is the one piece of state outside the library's objects: it lives in the worker process
    (as a Dask worker plugin), not in the client, and is dropped with the worker. ``loads`` counts
    the models built, so tests can check that a backbone is loaded once per worker.
    """

    name = "padim-model-cache"

    def __init__(self, maxsize: int = 2):
        self.maxsize = maxsize

    def setup(self, worker) -> None:
        self.models: OrderedDict[Hashable, Any] = OrderedDict()
        self.loads = 0
        self.lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The model for ``key``, built with ``build()`` on first use."""
        with self.lock:  # a worker with several threads builds each model once
            if key in self.models:
                self.models.move_to_end(key)
                return self.models[key]
            model = self.models[key] = build()
            self.loads += 1
            while len(self.models) > self.maxsize:
                self.models.popitem(last=False)
            return model


def worker_cache() -> ModelCache:
    """The model cache of the worker running the current task."""
    return get_worker().plugins[ModelCache.name]
