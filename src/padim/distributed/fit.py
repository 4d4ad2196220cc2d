"""Sharded fit: workers return partial statistics of their shards, summed in a tree on the
cluster; the client computes the covariance and its factor once, then calibrates as Padim.fit."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from dask.base import tokenize
from distributed import Client, Future, as_completed
from tqdm.auto import tqdm

from ..model import GaussianStats, Padim
from ..runs import MODEL_FILE, DataArgs, check_training_set
from .cluster import FIT_SHARD_SIZE, RETRIES, connect, prepare, shards, worker_cache, worker_threads


def _fit_params(model: Padim) -> dict:
    """The model's settings for a worker, which builds the same feature extractor (decoding runs in
    the worker itself: Dask worker processes may not start DataLoader processes)."""
    params = model.get_params()
    params.update(num_workers=0, progress=False, device=str(params["device"]),
                  weights=None if params["weights"] is None else str(params["weights"]))
    return params


def accumulate_shard(params: dict, paths: list[str]) -> GaussianStats:
    """Task: partial statistics of one shard of image files, with the worker's cached backbone.
    They travel as they are kept: per cell, only the lower block triangle of each sum of outer products."""
    model = worker_cache().get(("fit", *sorted(params.items())), lambda: Padim(**params))
    return model.accumulate(paths)


def _add(a: GaussianStats, b: GaussianStats) -> GaussianStats:
    return a + b


def tree_sum(client: Client, leaves: list[Future], retries: int = RETRIES) -> Future:
    """Pairwise sums level by level (depth log2 n); a fixed order, so results are reproducible."""
    level = list(leaves)
    while len(level) > 1:
        pairs = [client.submit(_add, a, b, retries=retries, key=f"padim-add-{tokenize(a.key, b.key)}")
                 for a, b in zip(level[0::2], level[1::2], strict=False)]
        level = pairs + ([level[-1]] if len(level) % 2 else [])
    return level[0]


def accumulate_distributed(model: Padim, images: Sequence[str | Path], client: Client,
                           shard_size: int = FIT_SHARD_SIZE, retries: int = RETRIES,
                           progress: bool = False) -> GaussianStats:
    """``model.accumulate(images)`` on the cluster: one task per shard, partials summed in a tree."""
    params = _fit_params(model)
    parts = shards([str(p) for p in images], shard_size, model.batch_size, worker_threads(client))
    if not parts:
        raise ValueError("no training images")
    leaves = [client.submit(accumulate_shard, params, part, retries=retries,
                            key=f"padim-fit-shard-{i}-{tokenize(params, part)}") for i, part in enumerate(parts)]
    root = tree_sum(client, leaves, retries)
    done = as_completed(leaves)
    del leaves  # let the scheduler free each partial once it is summed
    for _ in tqdm(done, total=len(parts), desc="fit shards", unit="shard", disable=not progress):
        pass
    return root.result()


def fit_distributed(model: Padim, images: Sequence[str | Path], client: Client, shard_size: int = FIT_SHARD_SIZE,
                    retries: int = RETRIES, progress: bool = False) -> Padim:
    """Fit ``model`` on image files read by the cluster's workers; equals ``model.fit(images)``.

    The workers sum the statistics of all images; the client factors them and scores the sample of
    :func:`~padim.model.calibration.calibration_sample` out of fold, as :meth:`Padim.fit` does.
    """
    from ..model.calibration import calibration_sample

    images = [str(p) for p in images]
    stats = accumulate_distributed(model, images, client, shard_size, retries, progress)
    sample = calibration_sample(len(images), model.model_params().calibration_images, model.seed)
    return model.fit_from_stats(stats, [images[i] for i in sample])


def fit_job(data: DataArgs, out_dir: Path, model: Padim, address: str, shard_size: int = FIT_SHARD_SIZE,
            progress: bool = True, log: Callable[[str], None] = print, keep_stats: bool = True,
            auto: dict | None = None) -> tuple[Padim, Path, dict]:
    """``padim fit --dask``: fit on the cluster at ``address`` and write ``out_dir/model.safetensors``
    (``auto``: the record of ``--auto``'s choice, kept in it)."""
    split = data.load()
    paths = [s.path for s in split.train]
    check_training_set(data, len(paths), model)
    with connect(address) as client:
        n_workers = prepare(client, paths[0] if paths else None)
        log(f"dask: {n_workers} workers, dashboard {client.dashboard_link}")
        start = time.perf_counter()
        fit_distributed(model, paths, client, shard_size, progress=progress)
        seconds = time.perf_counter() - start
    if auto is not None:
        model.meta_["auto"] = auto
    path = model.save(out_dir / MODEL_FILE, stats=keep_stats)
    return model, path, {"fit_seconds": seconds, "n_train": len(split.train), "split": split}
