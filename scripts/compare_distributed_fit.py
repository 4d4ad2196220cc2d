"""Sharded fit on a LocalCluster vs the single-process fit, on one category; prints the max abs
differences of mean, covariance and whitening factor, and the wall times.

    .venv/bin/python scripts/compare_distributed_fit.py ../shared/data/visa --category fryum --workers 2
"""

from __future__ import annotations

import argparse
import time

import torch

from padim import Padim
from padim.datasets import load_split
from padim.distributed import FIT_SHARD_SIZE, connect, fit_distributed, prepare


def recording(model: Padim) -> list:
    """Keep the statistics handed to fit_from_stats (the fit images' sums; fit_from_stats merges the
    calibration images into them in place, so after the fit they cover every training image)."""
    seen, finish = [], model.fit_from_stats

    def fit_from_stats(stats, *args, **kwargs):
        seen.append(stats)
        return finish(stats, *args, **kwargs)

    model.fit_from_stats = fit_from_stats
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--category", default="fryum")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=FIT_SHARD_SIZE)
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args()
    paths = [s.path for s in load_split(args.root, args.category).train]
    print(f"{len(paths)} training images, {args.image_size} px, torch threads {torch.get_num_threads()}")

    runs, default = {}, torch.get_num_threads()
    for name, threads in (("single", default), ("single-1-thread", 1)):
        torch.set_num_threads(threads)
        model = Padim(image_size=args.image_size)
        seen = recording(model)
        start = time.perf_counter()
        model.fit(paths)
        runs[name] = (model, seen[0], time.perf_counter() - start)
        print(f"{name}: fit {runs[name][2]:.1f} s on {threads} torch thread(s)", flush=True)
    torch.set_num_threads(default)  # the client calibrates as the single-process fit does

    start = time.perf_counter()
    with connect(f"local:{args.workers}", dashboard=False) as client:
        prepare(client, paths[0])
        up = time.perf_counter() - start
        model = Padim(image_size=args.image_size)
        seen = recording(model)
        start = time.perf_counter()
        fit_distributed(model, paths, client, args.shard_size)
        runs["dask"] = (model, seen[0], time.perf_counter() - start)
    print(f"dask local:{args.workers}: cluster start {up:.1f} s, fit {runs['dask'][2]:.1f} s "
          f"(shard size {args.shard_size})", flush=True)

    dask_model, dask_stats, _ = runs["dask"]
    for name in ("single", "single-1-thread"):
        model, stats, _ = runs[name]
        mean = (dask_stats.mean() - stats.mean()).abs().max().item()
        cov = (dask_stats.covariance(model.eps) - stats.covariance(model.eps)).abs().max().item()
        final_mean = (dask_model.scorer_.mean - model.scorer_.mean).abs().max().item()
        factor = (dask_model.scorer_.factor - model.scorer_.factor).abs().max().item()
        print(f"dask vs {name}: fit statistics (float64) max|d mean| {mean:.3g}, max|d cov| {cov:.3g}; "
              f"stored model (float32) max|d mean| {final_mean:.3g}, max|d factor| {factor:.3g} "
              f"(max|factor| {model.scorer_.factor.abs().max().item():.3g}); "
              f"threshold {dask_model.threshold_:.6f} vs {model.threshold_:.6f}")


if __name__ == "__main__":
    main()
