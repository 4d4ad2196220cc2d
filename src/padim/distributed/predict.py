"""Distributed, resumable batch scoring: one CSV part per shard, written atomically by the worker
that scored it, then one combined ``scores.csv``. A part exists only once complete, so a crash
loses at most the shards in flight and a re-run skips every shard whose part exists."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

from distributed import Client, as_completed
from tqdm.auto import tqdm

from ..atomic import write_text
from ..checksums import sha256_of
from ..model import Padim, read_model_file
from ..runs import PREDICT_HEADER, collect_images, csv_text, score_files
from .cluster import PREDICT_SHARD_SIZE, RETRIES, connect, prepare, shards, worker_cache

PARTS = "parts"


def part_name(model_sha: str, heatmaps: bool, files: Sequence[tuple[Path, str]]) -> str:
    """Name of a shard's part: a hash of the model, the heat-map flag and the shard's file list,
    so a changed input set or model never reuses a stale part."""
    digest = hashlib.sha256(f"{model_sha}\nheatmaps={heatmaps}\n".encode())
    for path, name in files:
        digest.update(f"{path}\t{name}\n".encode())
    return f"part-{digest.hexdigest()[:20]}.csv"


def score_shard(model_path: str, model_sha: str, load: dict, files: list[tuple[str, str]], part: str,
                heatmap_dir: str | None) -> int:
    """Task: score one shard with the worker's cached model, write its heat maps, then its part."""
    def build() -> Padim:
        model = Padim.load(model_path, device=load["device"], weights=load["weights"])
        return model.set_params(batch_size=load["batch_size"], num_workers=0)

    model = worker_cache().get(("predict", model_path, model_sha, *sorted(load.items())), build)
    rows = score_files(model, files, heatmap_dir)
    write_text(part, csv_text(PREDICT_HEADER, rows))  # last: a part exists only when its shard is done
    return len(rows)


def predict_distributed(model_path: Path, paths: Sequence[Path], out_dir: Path, client: Client, *,
                        device: str = "cpu", weights: Path | None = None, batch_size: int = 16,
                        heatmaps: bool = True, shard_size: int = PREDICT_SHARD_SIZE, retries: int = RETRIES,
                        progress: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Score image files on the cluster; write ``out_dir/parts/*.csv`` and ``out_dir/scores.csv``.

    ``out_dir`` must be writable by every worker at the same path. Returns the combined rows and
    how many shards were scored and reused. If shards fail, the finished parts stay and the first
    error is raised after all others have finished; re-running the same command completes the job.
    """
    model_path = Path(model_path).resolve()
    out_dir = Path(out_dir).resolve()
    read_model_file(model_path)  # a bad model file fails here, with its name, before any task runs
    model_sha = sha256_of(model_path)
    files = [(str(p.resolve()), name) for p, name in collect_images(paths)]
    load = {"device": device, "weights": None if weights is None else str(weights), "batch_size": batch_size}
    heatmap_dir = str(out_dir / "heatmaps") if heatmaps else None
    plan = [(out_dir / PARTS / part_name(model_sha, heatmaps, part), part)
            for part in shards(files, shard_size, batch_size)]  # independent of the cluster: resumable anywhere
    todo = [(p, part) for p, part in plan if not p.exists()]
    futures = [client.submit(score_shard, str(model_path), model_sha, load, part, str(p), heatmap_dir,
                             retries=retries, key=f"padim-score-{p.stem}") for p, part in todo]
    errors = []
    for future in tqdm(as_completed(futures), total=len(futures), desc="score shards", unit="shard",
                       disable=not progress):
        if future.status == "error":
            errors.append(future.exception())
        future.release()
    if errors:
        if log is not None:
            log(f"{len(errors)} of {len(todo)} shards failed; finished parts are kept in {out_dir / PARTS}, "
                "re-run the same command to score only the rest")
        raise errors[0]
    rows: list[list[str]] = []
    for p, _ in plan:
        with open(p, newline="") as f:
            rows.extend(list(csv.reader(f))[1:])
    write_text(out_dir / "scores.csv", csv_text(PREDICT_HEADER, rows))
    return {"rows": rows, "shards": len(plan), "scored": len(todo), "reused": len(plan) - len(todo)}


def predict_job(model_path: Path, paths: Sequence[Path], out_dir: Path, address: str, *,
                device: str = "cpu", weights: Path | None = None, batch_size: int = 16, heatmaps: bool = True,
                shard_size: int = PREDICT_SHARD_SIZE, progress: bool = True,
                log: Callable[[str], None] = print) -> dict:
    """``padim predict --dask``: :func:`predict_distributed` on the cluster at ``address``."""
    first = next((p for p in paths if p.exists()), None)
    with connect(address) as client:
        n_workers = prepare(client, first.resolve() if first is not None else None)
        log(f"dask: {n_workers} workers, dashboard {client.dashboard_link}")
        return predict_distributed(model_path, paths, out_dir, client, device=device, weights=weights,
                                   batch_size=batch_size, heatmaps=heatmaps, shard_size=shard_size,
                                   progress=progress, log=log)
