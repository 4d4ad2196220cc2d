"""The bad-input corpus, through the command line: every input below is made by the test itself and
gets either acceptance (with a warning where something is lost or doubtful) or exit code 3/4/5 with
one 'error:' line that names the file. No Python stack trace reaches the user."""

from __future__ import annotations

import csv
import io
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageFile

from conftest import make_folder_dataset, make_visa_dataset, texture, write_png
from padim import Padim
from padim.cli import main

FAST = ["--image-size", "64", "--d", "8", "--no-progress", "--workers", "0"]


def invoke(*args):
    """Run the CLI in-process; an exception other than a clean exit fails the test."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert "Traceback" not in result.output
    return result


def assert_error(result, code: int, *names: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0], lines[0]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    return Padim(image_size=64, d=8, sigma=1.0).fit([texture(rng) for _ in range(6)]).save(path)


def predict(model_file: Path, image: Path, out: Path):
    return invoke("predict", "--model", model_file, image, "--out", out, "--no-progress", "--workers", "0")


def jpeg_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels: Pillow reads the size from the header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------------- images
def test_zero_byte_file_is_refused(model_file, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    assert_error(predict(model_file, tmp_path / "empty.png", tmp_path / "o"), 3, "empty.png", "empty file")


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.9, -2, -1])
def test_truncated_jpeg_is_refused_wherever_it_is_cut(model_file, tmp_path, keep):
    data = jpeg_bytes(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    cut = int(len(data) * keep) if keep > 0 else len(data) + keep  # -2: only the end marker missing
    (tmp_path / "cut.JPG").write_bytes(data[:cut])
    assert_error(predict(model_file, tmp_path / "cut.JPG", tmp_path / "o"), 3, "cut.JPG", "cannot decode")


def test_truncated_images_are_never_loaded_partially():
    import padim.cli  # noqa: F401 - everything the CLI imports must leave Pillow strict
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_text_file_named_jpg_is_refused(model_file, tmp_path):
    (tmp_path / "notes.JPG").write_text("inspection notes, not a picture")
    assert_error(predict(model_file, tmp_path / "notes.JPG", tmp_path / "o"), 3, "notes.JPG", "cannot decode")


@pytest.mark.parametrize("name, fmt", [("png_inside.jpg", "PNG"), ("jpeg_inside.png", "JPEG")])
def test_wrong_extension_is_read_by_content_with_a_warning(model_file, tmp_path, name, fmt):
    Image.fromarray(texture(np.random.default_rng(1))).save(tmp_path / name, format=fmt)
    result = predict(model_file, tmp_path / name, tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert f"is a {fmt} image despite its" in result.stderr and name in result.stderr


@pytest.mark.parametrize("mode, warned", [("L", False), ("P", False), ("RGBA", True), ("I;16", True)])
def test_other_image_modes_are_converted_to_rgb(model_file, tmp_path, mode, warned):
    rgb = texture(np.random.default_rng(2))
    image = Image.fromarray(rgb)
    if mode == "I;16":
        image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    elif mode == "RGBA":
        image = Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]))
    else:
        image = image.convert(mode)
    image.save(tmp_path / "odd.png")
    assert Image.open(tmp_path / "odd.png").mode == mode
    result = predict(model_file, tmp_path / "odd.png", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "heatmaps" / "odd.png").is_file()
    assert ("warning:" in result.stderr) == warned, result.stderr


def test_exif_rotation_is_applied_to_images_and_original_sizes(tmp_path):
    from padim.datasets import image_size, read_image
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    array = np.zeros((10, 20, 3), np.uint8)
    array[:, :10] = 255  # left half white: after rotation the top half is white
    Image.fromarray(array).save(tmp_path / "r.jpg", exif=exif, quality=100)
    shown = np.asarray(read_image(tmp_path / "r.jpg"))
    assert shown.shape == (20, 10, 3) and image_size(tmp_path / "r.jpg") == (20, 10)
    assert shown[:8].mean() > 200 and shown[12:].mean() < 50


@pytest.mark.parametrize("side", [10_000, 14_000])  # 1.1x and 2.2x Pillow's limit: both refused
def test_decompression_bomb_is_refused(model_file, tmp_path, side):
    (tmp_path / "huge.png").write_bytes(png_header_only(side, side))
    assert_error(predict(model_file, tmp_path / "huge.png", tmp_path / "o"), 3, "huge.png", "decompression-bomb")


def test_hidden_and_stray_files_in_folders_are_skipped_with_a_warning(model_file, tmp_path):
    folder = tmp_path / "in"
    write_png(folder / "ok.png", texture(np.random.default_rng(3)))
    (folder / "._ok.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    (folder / "Thumbs.db").write_bytes(b"\x00" * 10)
    result = predict(model_file, folder, tmp_path / "o")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "o" / "scores.csv").open()))
    assert [Path(r["path"]).name for r in rows] == ["ok.png"]
    root = make_folder_dataset(tmp_path / "d", np.random.default_rng(0), n_train=6)
    (root / "widget" / "train" / "good" / "readme.txt").write_text("stray")
    result = invoke("fit", root, "--category", "widget", "--out", tmp_path / "m", *FAST)
    assert result.exit_code == 0 and "skipped 1 file(s)" in result.stderr and "readme.txt" in result.stderr


# ------------------------------------------------------------------------------------------ data sets
def test_mask_of_another_size_than_its_image_is_refused(tmp_path):
    root = make_folder_dataset(tmp_path, np.random.default_rng(0), n_train=6)
    mask = root / "widget" / "ground_truth" / "blob" / "001_mask.png"
    write_png(mask, np.zeros((32, 32), np.uint8))
    result = invoke("run", root, "--category", "widget", "--out", tmp_path / "o", *FAST)
    assert_error(result, 3, "001_mask.png", "32x32", "64x64")
    assert not (tmp_path / "o" / "model.safetensors").exists()  # refused before the fit


def test_anomalous_image_without_mask_counts_in_image_metrics_only(tmp_path):
    root = make_folder_dataset(tmp_path, np.random.default_rng(0), n_train=6)
    (root / "widget" / "ground_truth" / "blob" / "002_mask.png").unlink()
    result = invoke("run", root, "--category", "widget", "--out", tmp_path / "o", "--no-figures", *FAST)
    assert result.exit_code == 0, result.output
    assert "1 anomalous test image(s) without a mask" in result.stderr and "002.png" in result.stderr
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["dataset"]["n_pixel_images"] == 7 and metrics["dataset"]["n_test"] == 8


def test_empty_category_folder_is_refused(tmp_path):
    (tmp_path / "widget").mkdir()
    assert_error(invoke("fit", tmp_path, "--category", "widget", "--out", tmp_path / "o", *FAST), 3,
                 "widget", "empty")


def test_empty_training_folder_is_refused(tmp_path):
    root = make_folder_dataset(tmp_path, np.random.default_rng(0), n_train=0)
    (root / "widget" / "train" / "good").mkdir(parents=True)
    assert_error(invoke("fit", root, "--category", "widget", "--out", tmp_path / "o", *FAST), 3,
                 "train/good", "no training images")


@pytest.mark.parametrize("where", [[], ["--dask", "local:1"]])  # refused before a cluster starts
def test_too_few_training_images_is_refused(tmp_path, where):
    root = make_folder_dataset(tmp_path, np.random.default_rng(0), n_train=1)
    assert_error(invoke("fit", root, "--category", "widget", "--out", tmp_path / "o", *FAST, *where), 3,
                 "widget", "add normal training images")


def test_split_csv_naming_missing_files_is_refused(tmp_path):
    root = make_visa_dataset(tmp_path, np.random.default_rng(0))
    (root / "widget/Data/Images/Anomaly/002.JPG").unlink()
    (root / "widget/Data/Masks/Anomaly/004.png").unlink()
    assert_error(invoke("fit", root, "--category", "widget", "--out", tmp_path / "o", *FAST), 3,
                 "1cls.csv", "2 missing file(s)", "002.JPG", "004.png")


@pytest.mark.parametrize("row, why", [
    ("widget,train,normal", "expected split"),                    # too few fields
    ("widget,validate,normal,widget/x.JPG,", "expected split"),    # unknown split
    ("widget,test,broken,widget/x.JPG,", "expected split"),        # unknown label
    ("widget,train,normal,widget/x.JPG,,surplus", "more fields"),  # too many fields
])
def test_split_csv_with_a_broken_row_names_file_and_line(tmp_path, row, why):
    root = make_visa_dataset(tmp_path, np.random.default_rng(0))
    csv_path = root / "split_csv" / "1cls.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(lines[:3] + [row] + lines[3:]) + "\n")
    assert_error(invoke("fit", root, "--category", "widget", "--out", tmp_path / "o", *FAST), 3,
                 "1cls.csv line 4", why)


@pytest.mark.parametrize("content, why", [
    (b"object;split;label;image\nwidget;train;normal;a.JPG\n", "header lacks column(s)"),
    (b"object,split,label,image\nwidget,train,normal,\xff\xfe.JPG\n", "not a readable CSV"),
])
def test_split_csv_with_a_broken_header_or_encoding_is_refused(tmp_path, content, why):
    root = make_visa_dataset(tmp_path, np.random.default_rng(0))
    (root / "split_csv" / "1cls.csv").write_bytes(content)
    assert_error(invoke("fit", root, "--category", "widget", "--out", tmp_path / "o", *FAST), 3, "1cls.csv", why)


def test_non_ascii_and_space_paths_work_end_to_end(tmp_path):
    root = make_folder_dataset(tmp_path / "dä ta", np.random.default_rng(0), n_train=6)
    base = root / "widget"
    (base / "train" / "good" / "000.png").rename(base / "train" / "good" / "bïld 0.png")
    (base / "test" / "blob" / "000.png").rename(base / "test" / "blob" / "fehler ä.png")
    (base / "ground_truth" / "blob" / "000_mask.png").rename(base / "ground_truth" / "blob" / "fehler ä_mask.png")
    base.rename(root / "wïdget x")
    out = tmp_path / "aus gabe ü"
    result = invoke("run", root, "--category", "wïdget x", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "scores.csv").open(encoding="utf-8")))
    assert any(r["path"].endswith("fehler ä.png") for r in rows)
    assert (out / "figures" / "blob_fehler ä.png").is_file()
    result = invoke("predict", "--model", out / "model.safetensors", base.parent / "wïdget x" / "test",
                    "--out", out / "vorhersage", "--no-progress", "--workers", "0")
    assert result.exit_code == 0 and (out / "vorhersage" / "heatmaps" / "blob__fehler ä.png").is_file()


def test_fewer_normal_images_than_feature_dimensions_keeps_covariance_well_defined(tmp_path):
    root = make_folder_dataset(tmp_path, np.random.default_rng(0), n_train=5)
    out = tmp_path / "o"
    result = invoke("run", root, "--category", "widget", "--out", out, "--no-figures",
                    "--image-size", "64", "--d", "48", "--no-progress", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "5 training images for 48 feature channels" in result.stderr
    model = Padim.load(out / "model.safetensors")
    assert torch.isfinite(model.scorer_.whitening.factor_of(slice(None))).all()
    assert np.isfinite(model.predict([texture(np.random.default_rng(7))]).scores).all()
    assert json.loads((out / "metrics.json").read_text())["overall"]["image_auroc"] is not None


# ------------------------------------------------------------------------ worker processes and numerics
def _cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "padim.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_worker_processes_report_warnings_and_errors_naming_the_file_without_a_traceback(tmp_path):
    root = make_folder_dataset(tmp_path, np.random.default_rng(0), n_train=8)
    good = root / "widget" / "train" / "good"
    Image.open(good / "000.png").convert("RGBA").save(good / "000.png")  # first batch: a warning
    (good / "007.png").write_bytes((good / "007.png").read_bytes()[:200])  # last batch: an error
    proc = _cli("fit", root, "--category", "widget", "--out", tmp_path / "o", "--image-size", "64", "--d", "8",
                "--no-progress", "--workers", "2", "--batch-size", "2")
    assert proc.returncode == 3, proc.stderr
    assert f"warning: {good / '000.png'}: transparency (RGBA) dropped" in proc.stderr
    assert "Traceback" not in proc.stderr and "DataLoader" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {good / '007.png'}: cannot decode image")


def test_non_finite_features_stop_the_fit_with_exit_5(tmp_path, monkeypatch):
    from padim.backbones.extractor import FeatureExtractor
    forward = FeatureExtractor.forward
    # in place: the features land in the fit's buffer, as a broken backbone's would
    monkeypatch.setattr(FeatureExtractor, "forward", lambda self, x, out=None, deep=None:
                        forward(self, x, out, deep).mul_(float("nan")))
    root = make_folder_dataset(tmp_path, np.random.default_rng(0), n_train=6)
    result = invoke("fit", root, "--category", "widget", "--out", tmp_path / "o", *FAST)
    assert_error(result, 5, "NaN or inf", "weights")
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_a_folder_copy_keeps_working_after_moving(tmp_path, model_file):
    # a model copied to another machine/folder is self-contained: no absolute paths inside
    moved = tmp_path / "elsewhere" / "copy.safetensors"
    moved.parent.mkdir()
    shutil.copy(model_file, moved)
    write_png(tmp_path / "img.png", texture(np.random.default_rng(4)))
    assert predict(moved, tmp_path / "img.png", tmp_path / "o").exit_code == 0
