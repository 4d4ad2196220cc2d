"""padim.distributed: sharded fit and resumable scoring on a LocalCluster of 2 single-threaded
worker processes (the optional Dask extra; required under CI)."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_visa_dataset, texture, write_png

try:
    from distributed import WorkerPlugin

    from padim.distributed import ClusterError, ModelCache, connect, fit_distributed, prepare
    from padim.distributed.cluster import shards
    from padim.distributed.fit import accumulate_distributed
    from padim.distributed.predict import predict_distributed
except ImportError as exc:  # the [dask] extra is optional for users, not for CI
    if os.environ.get("CI"):
        raise
    pytest.skip(f"Dask not installed ({exc})", allow_module_level=True)

from padim import Padim
from padim.cli import main
from padim.datasets import DatasetError, load_split
from padim.model.stats import JointStats
from padim.runs import predict_files

# a float32 factor: sharded and single-process sums differ in float64 rounding, which a float16
# factor could turn into a one-ulp (1e-3) difference of a few of its entries
REAL = {"image_size": 64, "batch_size": 4, "num_workers": 0, "factor_dtype": "float32"}


@pytest.fixture(scope="module")
def client():
    with connect("local:2", dashboard=False) as c:
        prepare(c)
        yield c


@pytest.fixture
def one_thread():
    """Torch on one thread in this process too, as on each worker (OMP_NUM_THREADS=1): the float32
    features are then the same bit for bit, and only the float64 summation order differs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fryum(visa_root):
    """12 real fryum training images."""
    return [s.path for s in load_split(visa_root, "fryum").train[:12]]


@pytest.fixture
def single(fryum, one_thread) -> Padim:
    return Padim(**REAL).fit(fryum)


def loads(client) -> list[int]:
    return list(client.run(lambda dask_worker: dask_worker.plugins[ModelCache.name].loads).values())


def assert_same_model(a: Padim, b: Padim) -> None:
    assert a.info_["n_train"] == b.info_["n_train"] and a.info_["n_calibration"] == b.info_["n_calibration"]
    assert torch.allclose(a.scorer_.whitening.mean, b.scorer_.whitening.mean, rtol=1e-6, atol=1e-6)
    # shards merge float64 sums, one process factors its float32 sums about one shift: the covariances
    # agree to ~1e-7, which the factor (up to 1/sqrt(eps) = 10) carries up to ~1e-5 relative; and a
    # float16 factor can move an entry by one ulp (<= 2^-10)
    half = a.factor_dtype == "float16"
    fa, fb = (m.scorer_.whitening.factor_of(slice(None)) for m in (a, b))
    assert torch.allclose(fa, fb, rtol=1e-3 if half else 1e-4, atol=1e-4)
    # the out-of-fold scores come from float16 embeddings (kept in the stream here, run again on the
    # client there); with 12 images the leave-one-out factor 1 / (1 - n g / (n - 1)^2) magnifies them,
    # and far more in the deep image score's 160 channels: its factor is compared, the map's threshold
    assert a.info_["map_threshold"] == pytest.approx(b.info_["map_threshold"], rel=5e-3)
    if a.scorer_.deep is not None:
        da, db = (m.scorer_.deep.factor_of(slice(None)) for m in (a, b))
        assert float((da - db).abs().max()) < 1e-3 * float(db.abs().max())


def test_shards_follow_the_batch_grid():
    assert [len(s) for s in shards(list(range(10)), 3, multiple=4)] == [4, 4, 2]
    assert [len(s) for s in shards(list(range(405)), 512, multiple=16, at_least=2)] == [208, 197]  # one per worker
    assert [len(s) for s in shards(list(range(1000)), 300, 16, at_least=1)] == [256, 256, 256, 232]  # balanced
    assert [len(s) for s in shards(list(range(1000)), 300, 16)] == [304, 304, 304, 88]  # fixed: resumable cuts
    assert shards([], 5) == []


def test_sharded_statistics_equal_single_process_statistics(client, fryum, one_thread):
    model = Padim(**REAL)
    prepare(client)  # fresh cache, so the load count below is this test's
    paths = fryum[1:]
    sharded = accumulate_distributed(model, paths, client, shard_size=4)  # 3 shards on 2 workers
    local = Padim(**REAL).accumulate(paths)
    assert sharded.count == local.count == 11
    assert_same_statistics(sharded, local)
    assert sorted(loads(client))[-1] == 1 and sum(loads(client)) <= 2  # one backbone per worker, not per task


def test_sharded_cell_statistics_equal_single_process_statistics(client, fryum, one_thread):
    params = {**REAL, "tap_resize": "nearest"}  # fit cell by cell: shards send per-cell sums
    paths = fryum[:9]
    sharded = accumulate_distributed(Padim(**params), paths, client, shard_size=4)
    local = Padim(**params).accumulate(paths)
    assert isinstance(sharded, JointStats) and sharded.count == local.count == 9
    assert_same_statistics(sharded, local)


def assert_same_statistics(a: JointStats, b: JointStats) -> None:
    """Each shard sums float32 batch products about its own shift into float64 sums: the same
    statistics within 1e-6 relative (of their largest value), the map's and the deep score's."""
    for part_a, part_b in ((a.main, b.main), (a.deep, b.deep)):
        for x, y in ((part_a.mean(), part_b.mean()), (part_a.covariance(0.0), part_b.covariance(0.0))):
            assert float((x - y).abs().max()) < 1e-6 * float(y.abs().max())


def test_sharded_fit_equals_single_process_fit(client, fryum, single):
    assert_same_model(fit_distributed(Padim(**REAL), fryum, client, shard_size=4), single)


class KillOnce(WorkerPlugin):
    """Kills its worker process (SIGKILL) when the first fit shard starts, once per marker file."""

    name = "test-kill-once"

    def __init__(self, marker: str):
        self.marker = marker

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and str(key).startswith("padim-fit-shard"):
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            os.kill(os.getpid(), signal.SIGKILL)


def test_killed_worker_task_is_retried_and_the_model_is_the_same(client, fryum, single, tmp_path):
    marker = tmp_path / "killed"
    before = set(client.scheduler_info()["workers"])
    client.register_plugin(KillOnce(str(marker)))
    try:
        model = fit_distributed(Padim(**REAL), fryum, client, shard_size=4)
    finally:
        client.unregister_worker_plugin(KillOnce.name)
    assert marker.exists()
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed process under a new address
    assert set(client.scheduler_info()["workers"]) != before
    assert_same_model(model, single)  # its shard was rerun on a live worker: the same model


@pytest.fixture(scope="module")
def scoring(tmp_path_factory):
    """A small model file and 10 images to score."""
    root = tmp_path_factory.mktemp("score")
    rng = np.random.default_rng(0)
    model = Padim(image_size=64, d=16, sigma=1.0, batch_size=4, num_workers=0).fit([texture(rng) for _ in range(12)])
    model_path = model.save(root / "model.safetensors")
    for i in range(10):
        write_png(root / "images" / f"{i:02d}.png", texture(rng, defect=i % 3 == 0))
    return model, model_path, root / "images"


def read_rows(path):
    return list(csv.reader(path.open()))


def test_distributed_scoring_matches_single_process_and_resumes(client, scoring, tmp_path):
    model, model_path, images = scoring
    kwargs = {"batch_size": 4, "shard_size": 4, "retries": 0}
    out = tmp_path / "out"
    first = predict_distributed(model_path, [images], out, client, **kwargs)
    assert (first["shards"], first["scored"], first["reused"]) == (3, 3, 0)
    single = predict_files(model, [images], tmp_path / "single", heatmaps=False)
    rows = read_rows(out / "scores.csv")
    assert rows[0] == ["path", "score", "predicted_label"] and len(rows) == 11
    assert [r[0] for r in rows[1:]] == [str(Path(p).resolve()) for p, _, _ in single]
    np.testing.assert_allclose([float(r[1]) for r in rows[1:]], [float(r[1]) for r in single], rtol=1e-4)
    assert [r[2] for r in rows[1:]] == [r[2] for r in single]
    assert len(list((out / "heatmaps").glob("*.png"))) == 10

    # a lost shard (crash) is redone; finished parts are reused untouched
    parts = sorted((out / "parts").glob("*.csv"))
    assert len(parts) == 3
    parts[1].unlink()
    (out / "scores.csv").unlink()
    kept = {p: p.stat().st_mtime_ns for p in (parts[0], parts[2])}
    again = predict_distributed(model_path, [images], out, client, **kwargs)
    assert (again["scored"], again["reused"]) == (1, 2)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert read_rows(out / "scores.csv") == rows

    # a changed input set does not reuse the parts of shards whose file list changed
    write_png(images / "10.png", texture(np.random.default_rng(9)))
    try:
        grown = predict_distributed(model_path, [images], out, client, **kwargs)
    finally:
        (images / "10.png").unlink()
    assert (grown["shards"], grown["scored"], grown["reused"]) == (3, 1, 2)
    assert len(read_rows(out / "scores.csv")) == 12


def test_a_failing_shard_keeps_the_finished_parts_and_a_rerun_finishes(client, scoring, tmp_path):
    model, model_path, _ = scoring
    images = tmp_path / "images"
    rng = np.random.default_rng(1)
    for i in range(8):
        write_png(images / f"{i:02d}.png", texture(rng))
    (images / "05.png").write_bytes(b"not a png")  # second shard fails
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match="05.png"):
        predict_distributed(model_path, [images], out, client, batch_size=4, shard_size=4, retries=0,
                            heatmaps=False)
    assert len(list((out / "parts").glob("*.csv"))) == 1 and not (out / "scores.csv").exists()
    write_png(images / "05.png", texture(rng))
    done = predict_distributed(model_path, [images], out, client, batch_size=4, shard_size=4, retries=0,
                               heatmaps=False)
    assert (done["scored"], done["reused"]) == (1, 1) and len(read_rows(out / "scores.csv")) == 9


def test_cli_fit_and_predict_on_an_existing_scheduler(client, tmp_path, one_thread):
    data = make_visa_dataset(tmp_path / "visa", np.random.default_rng(0), n_normal=16)
    fast = ["--image-size", "64", "--d", "16", "--batch-size", "4", "--no-progress"]
    runner = CliRunner()
    address = client.scheduler.address  # connect as to an existing cluster
    result = runner.invoke(main, ["fit", str(data), "--category", "widget", "--out", str(tmp_path / "m"),
                                  "--dask", address, "--shard-size", "4", *fast], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "dask: 2 workers, dashboard http" in result.output and "fitted on 12 images" in result.output
    local = Padim(image_size=64, d=16, batch_size=4, num_workers=0).fit(
        [s.path for s in load_split(data, "widget").train])
    assert_same_model(Padim.load(tmp_path / "m" / "model.safetensors"), local)
    result = runner.invoke(main, ["predict", "--model", str(tmp_path / "m" / "model.safetensors"),
                                  str(data / "widget" / "Data" / "Images"), "--out", str(tmp_path / "p"),
                                  "--dask", address, "--shard-size", "8", *fast[4:]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "scored 22 images in 3 shards (0 reused" in result.output
    assert len(read_rows(tmp_path / "p" / "scores.csv")) == 23
    assert len(list((tmp_path / "p" / "heatmaps").glob("*.png"))) == 22


def test_cli_rejects_a_bad_cluster_address(tmp_path):
    result = CliRunner().invoke(main, ["predict", "--model", str(tmp_path / "m.safetensors"), str(tmp_path),
                                       "--out", str(tmp_path / "o"), "--dask", "local:zero"])
    assert result.exit_code == 2 and "local:N" in result.output
    with pytest.raises(ClusterError):
        with connect("local:0"):
            pass
