"""padim.export: the ONNX graph computes what the native model computes, and carries its metadata."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import require, texture, write_png
from padim import Padim
from padim.checksums import sha256_of
from padim.cli import main
from padim.errors import DatasetError
from padim.export import OnnxModel, export_onnx, open_model
from padim.export.onnx import HALF_MIN_ELEMENTS
from padim.export.parity import parity
from padim.export.runtime import onnx_files
from padim.model import read_model_file

TOLERANCE = 1e-3  # max abs difference relative to the native image score range


@pytest.fixture(scope="module")
def synthetic_model(tmp_path_factory):
    """A tiny model on synthetic textures (64 px, 16 channels), saved; with test images."""
    require("onnxruntime")
    rng = np.random.default_rng(0)
    model = Padim(image_size=64, d=16, num_workers=0).fit([texture(rng) for _ in range(12)])
    path = model.save(tmp_path_factory.mktemp("synthetic") / "model.safetensors")
    images = [texture(rng) for _ in range(4)] + [texture(rng, defect=True) for _ in range(3)]
    return path, images


@pytest.mark.real_data
def test_onnx_matches_native_on_real_fryum_images(fryum_small, tmp_path):
    require("onnxruntime")
    path, test = fryum_small
    native = Padim.load(path)
    exported = OnnxModel.load(export_onnx(native, tmp_path / "model.onnx", source=path))
    samples = [s for s in test if s.label == 0][:8] + [s for s in test if s.label == 1][:16]
    a, b = native.predict([s.path for s in samples]), exported.predict([s.path for s in samples])
    report = parity(a, b)
    assert report["rel_score_diff"] < TOLERANCE and report["rel_map_diff"] < TOLERANCE, report
    assert report["label_mismatches"] == 0 and a.labels.sum() > 0  # some verdicts are "anomaly"
    assert b.maps.shape == (24, 128, 128) and b.maps.dtype == np.float32


def test_a_bfloat16_model_exports_a_float32_graph_and_says_its_scores_differ(tmp_path, caplog):
    require("onnxruntime")
    rng = np.random.default_rng(0)
    model = Padim(image_size=64, d=16, num_workers=0, feature_dtype="bfloat16").fit([texture(rng) for _ in range(12)])
    images = [texture(rng) for _ in range(3)] + [texture(rng, defect=True) for _ in range(2)]
    exported = OnnxModel.load(export_onnx(model, tmp_path / "bf16.onnx"))
    assert "computes them in float32" in caplog.text and exported.meta_["feature_dtype"] == "bfloat16"
    with model.scorer_.extractor.float32():  # the same Gaussians on float32 features: what the graph computes
        report = parity(model.predict(images), exported.predict(images))
    assert report["rel_score_diff"] < TOLERANCE and report["rel_map_diff"] < TOLERANCE, report
    assert model.scorer_.extractor.bfloat16  # the export left the model as it was


def test_fixed_batch_graph_pads_the_last_batch(synthetic_model, tmp_path):
    path, images = synthetic_model
    native = Padim.load(path)
    exported = OnnxModel.load(export_onnx(native, tmp_path / "b3.onnx", source=path, dynamic_batch=False,
                                          batch_size=3))
    assert exported.fixed_batch == 3 and exported.session.get_inputs()[0].shape == [3, 3, 64, 64]
    exported.batch_size = 5  # 7 images -> batches of 5 and 2, each run as padded graph calls
    report = parity(native.predict(images), exported.predict(images))
    assert report["n_images"] == 7 and report["rel_map_diff"] < TOLERANCE and report["label_mismatches"] == 0


def test_metadata_travels_inside_the_onnx_file(synthetic_model, tmp_path):
    onnx = require("onnx")
    path, _ = synthetic_model
    native = Padim.load(path)
    out = export_onnx(native, tmp_path / "m.onnx", source=path)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    meta = json.loads(props["padim"])
    assert props["model_id"] == sha256_of(path)[:12] == meta["model_id"]
    assert meta["source_sha256"] == sha256_of(path) and meta["opset"] == 17
    assert float(props["threshold"]) == native.threshold_ and props["image_size"] == "64x64"
    assert props["backbone"] == "mobilenet_v2" and props["package_version"]
    loaded = open_model(out)
    assert isinstance(loaded, OnnxModel)
    assert loaded.threshold_ == native.threshold_ and loaded.image_size_ == (64, 64)
    assert loaded.info_["map_range"] == native.info_["map_range"]
    graph = onnx.load(str(out)).graph
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", 64, 64]


def test_onnx_runner_takes_the_same_inputs_as_padim(synthetic_model, tmp_path):
    path, images = synthetic_model
    native = Padim.load(path)
    exported = OnnxModel.load(export_onnx(native, tmp_path / "m.onnx", source=path))
    batch = torch.from_numpy(np.stack(images[:2])).permute(0, 3, 1, 2).contiguous()
    assert np.allclose(exported.predict(batch).scores, exported.predict(images[:2]).scores)
    assert exported.predict([]).scores.shape == (0,)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_export_then_predict_gives_the_native_scores_and_labels(synthetic_model, tmp_path):
    path, images = synthetic_model
    folder = tmp_path / "images"
    for i, image in enumerate(images):
        write_png(folder / f"{i}.png", image)
    result = invoke("export", "--model", path, "--out", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    assert "opset 17" in result.output and "max |map diff|" in result.output
    for model, out in ((path, "native"), (tmp_path / "m.onnx", "onnx")):
        result = invoke("predict", "--model", model, folder, "--out", tmp_path / out, "--no-progress")
        assert result.exit_code == 0, result.output
    native, onnx = (list(csv.DictReader((tmp_path / o / "scores.csv").open())) for o in ("native", "onnx"))
    assert [r["predicted_label"] for r in native] == [r["predicted_label"] for r in onnx]
    assert "anomaly" in {r["predicted_label"] for r in onnx}
    # the deep image score is a sum of z-scores: near 0, compared on its own scale
    a, b = ([float(r["score"]) for r in rows] for rows in (native, onnx))
    assert np.allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    assert len(list((tmp_path / "onnx" / "heatmaps").glob("*.png"))) == len(images)


def test_cli_export_fixed_batch_and_bad_batch(synthetic_model, tmp_path):
    path, _ = synthetic_model
    result = invoke("export", "--model", path, "--out", tmp_path / "f.onnx", "--batch", "2")
    assert result.exit_code == 0 and "batch 2" in result.output, result.output
    result = invoke("export", "--model", path, "--out", tmp_path / "g.onnx", "--batch", "zero")
    assert result.exit_code == 2 and "dynamic" in result.output
    assert not (tmp_path / "g.onnx").exists()


def test_bad_onnx_files_are_model_errors(tmp_path, synthetic_model):
    onnx = require("onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf")
    plain = tmp_path / "plain.onnx"  # a valid ONNX graph, not one of ours
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [value("x", onnx.TensorProto.FLOAT, [1])],
                                   [value("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(plain))
    for bad, says in ((garbage, "not a readable ONNX model"), (plain, "without padim metadata"),
                      (tmp_path / "missing.onnx", "not found")):
        result = invoke("predict", "--model", bad, tmp_path, "--out", tmp_path / "o")
        assert result.exit_code == 4, result.output
        assert bad.name in result.output and says in result.output and "Traceback" not in result.output


@pytest.fixture(scope="module")
def cell_model(tmp_path_factory):
    """A tiny model fit cell by cell (nearest tap resizing), float16 factor, saved; with test images."""
    require("onnxruntime")
    rng = np.random.default_rng(1)
    model = Padim(image_size=(64, 96), d=40, tap_resize="nearest", num_workers=0)
    model.fit([texture(rng, size=96)[:64] for _ in range(12)])
    assert model.scorer_.storage == "cells" and model.params_.factor_dtype == "float16"
    path = model.save(tmp_path_factory.mktemp("cells") / "model.safetensors")
    images = [texture(rng, size=96)[:64] for _ in range(3)] + [texture(rng, size=96, defect=True)[:64]]
    return path, images


def test_cell_model_exports_its_cells_in_float16(cell_model, tmp_path):
    onnx = require("onnx")
    path, images = cell_model
    native = Padim.load(path)
    out = export_onnx(native, tmp_path / "m.onnx", source=path)
    proto = onnx.load(str(out))
    weights = {i.name: i for i in proto.graph.initializer}
    half = [i for i in weights.values() if i.data_type == onnx.TensorProto.FLOAT16]
    factor = [n for n in weights if "whitening.w" in n]  # small ones stay float32: a Cast costs more
    assert factor and all(weights[n].data_type == onnx.TensorProto.FLOAT16 for n in factor
                          if np.prod(weights[n].dims) >= HALF_MIN_ELEMENTS)
    assert not any("weight_head" in n or "weight_tail" in n for n in weights)  # no per-position factor
    # the cells' weights, as the model file keeps them (whose diagonal blocks are triangles)
    stored = sum(t.numel() for k, t in read_model_file(path)[1].items() if k.startswith(("w", "deep_factor")))
    assert stored < sum(int(np.prod(i.dims)) for i in half) < 2 * stored
    report = parity(native.predict(images), OnnxModel.load(out).predict(images))
    assert report["rel_map_diff"] < 1e-5 and report["label_mismatches"] == 0, report


def test_large_graphs_are_written_with_external_data_and_load_from_both_files(cell_model, tmp_path, monkeypatch):
    import padim.export.onnx as onnx_export
    path, images = cell_model
    native = Padim.load(path)
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_ABOVE", 10_000)  # as if the weights passed 2 GB
    out = export_onnx(native, tmp_path / "big.onnx", source=path)
    data = tmp_path / "big.onnx.data"
    assert onnx_files(out) == [out, data] and data.stat().st_size > out.stat().st_size
    exported = open_model(out)
    report = parity(native.predict(images), exported.predict(images))
    assert report["rel_map_diff"] < 1e-5 and report["label_mismatches"] == 0, report
    result = invoke("predict", "--model", out, *images_on_disk(images, tmp_path), "--out", tmp_path / "o",
                    "--no-heatmaps")
    assert result.exit_code == 0, result.output
    # a later export that fits in one file leaves no stale weights file behind
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_ABOVE", 1_800_000_000)
    export_onnx(native, out, source=path)
    assert not data.exists() and open_model(out).predict(images[:1]).scores.shape == (1,)


def images_on_disk(images: list[np.ndarray], folder) -> list[str]:
    paths = []
    for i, image in enumerate(images):
        paths.append(str(folder / f"img{i}.png"))
        write_png(folder / f"img{i}.png", image)
    return paths


def test_the_runner_decodes_files_on_threads_batch_after_batch_as_in_one_thread(cell_model, tmp_path):
    path, images = cell_model
    native = Padim.load(path)
    runner = OnnxModel.load(export_onnx(native, tmp_path / "m.onnx", source=path))
    files = images_on_disk(images, tmp_path)  # 4 images: 2 batches of 2, the next decoded while one runs
    runner.batch_size, runner.num_workers = 2, 2
    threaded = runner.predict(files)
    runner.num_workers = 0
    np.testing.assert_array_equal(threaded.maps, runner.predict(files).maps)
    report = parity(native.predict(files), threaded)
    assert report["rel_map_diff"] < 1e-5 and report["label_mismatches"] == 0, report
    with pytest.raises(DatasetError, match="missing.png"):
        runner.num_workers = 2
        runner.predict([*files, str(tmp_path / "missing.png")])
