"""padim.model.line and padim.line_jobs: calibrate, update and merge a fitted model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_folder_dataset, texture, write_png
from padim import Padim
from padim.cli import main
from padim.model.io import stats_path
from padim.model.line import load_stats, merge, recalibrate, update

KW = {"image_size": 64, "d": 16, "sigma": 1.0, "factor_dtype": "float32", "num_workers": 0}


@pytest.fixture(scope="module")
def train() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [texture(rng) for _ in range(16)]


def distances(model: Padim, images) -> torch.Tensor:
    """The scales' distances and the deep image score's, side by side."""
    with torch.inference_mode():
        scorer = model.scorer_
        return torch.cat(scorer.distances(scorer.embedding(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))),
                         dim=1)


@pytest.fixture(scope="module")
def test_images() -> list[np.ndarray]:
    rng = np.random.default_rng(4)
    return [texture(rng, defect=i % 2 == 1) for i in range(4)]


def test_update_with_new_images_equals_a_fit_on_the_union(tmp_path, train, test_images):
    joint = Padim(**KW).fit(train)
    first = Padim(**KW).fit(train[:10])
    first.save(tmp_path / "m.safetensors")
    loaded = Padim.load(tmp_path / "m.safetensors")
    update(loaded, load_stats(loaded, tmp_path / "m.safetensors"), train[10:])
    torch.testing.assert_close(distances(loaded, test_images), distances(joint, test_images), rtol=1e-5, atol=1e-6)
    assert loaded.info_["n_train"] == 16 and loaded.info_["calibration"]["n"] == 6  # the new images set it
    assert [e["method"] for e in loaded.info_["calibration_history"]] == ["out-of-fold", "update"]


def test_merge_of_two_halves_equals_a_fit_on_all(train, test_images, caplog):
    joint = Padim(**KW).fit(train)
    a, b = Padim(**KW).fit(train[:8]), Padim(**KW).fit(train[8:])
    merged = merge([a, b], [a.stats_, b.stats_])
    assert "padim calibrate" in caplog.text  # the deep score's threshold, from the parts' scores
    torch.testing.assert_close(distances(merged, test_images), distances(joint, test_images), rtol=1e-5, atol=1e-6)
    assert merged.info_["calibration"]["n"] == 16 and merged.info_["n_train"] == 16


def test_decay_weighs_the_old_images_less(train):
    model = Padim(**KW).fit(train[:8])
    stats = model.stats_
    update(model, stats, train[8:], decay=0.5)
    assert model.stats_.count == pytest.approx(8 * 0.5 + 8)


def test_merge_refuses_models_of_different_settings(train):
    a, b = Padim(**KW).fit(train[:8]), Padim(**{**KW, "d": 12}).fit(train[8:])
    with pytest.raises(ValueError, match="different settings cannot be merged: d 16 vs 12"):
        merge([a, b], [a.stats_, b.stats_])


def test_recalibrate_sets_the_threshold_from_new_normal_images(train):
    model = Padim(**KW).fit(train[:12])
    recalibrate(model, train[12:], target_fpr=0.2)
    scores = model.predict(train[12:]).scores
    assert model.threshold_ == pytest.approx(scores.max(), rel=1e-6)  # 0.2 of 5: the largest of 4
    assert model.info_["calibration"]["method"] == "normal images" and model.meta_["target_fpr"] == 0.2
    assert "at" in model.info_["calibration_history"][-1]


# ----------------------------------------------------------------- the commands


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


FAST = ["--image-size", "64", "--d", "16", "--no-progress", "--workers", "0"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = make_folder_dataset(tmp_path_factory.mktemp("data"), np.random.default_rng(0), n_train=10)
    out = tmp_path_factory.mktemp("fit")
    result = invoke("fit", root, "--category", "widget", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    return root, out / "model.safetensors"


def test_calibrate_update_and_merge_commands_write_new_models(fitted, tmp_path):
    root, model = fitted
    normal = root / "widget" / "test" / "good"
    assert stats_path(model).stat().st_mode & 0o777 == model.stat().st_mode & 0o777  # the usual mode, not 0600
    result = invoke("calibrate", "--model", model, "--normal", normal, "--defective", root / "widget" / "test" / "blob",
                    "--out", tmp_path / "cal.safetensors", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "from 4 normal images (normal images)" in result.output and "defective images flagged:" in result.output
    assert stats_path(tmp_path / "cal.safetensors").is_file()  # the same fit: its statistics go along
    result = invoke("update", "--model", tmp_path / "cal.safetensors", normal, "--out", tmp_path / "up.safetensors",
                    "--no-progress")
    assert result.exit_code == 0, result.output
    assert "added 4 images to 10: the model of 14 images" in result.output
    result = invoke("merge", model, tmp_path / "up.safetensors", "--out", tmp_path / "merged.safetensors",
                    "--no-progress")
    assert result.exit_code == 0, result.output
    assert Padim.load(tmp_path / "merged.safetensors").info_["n_train"] == 24


def test_a_failed_calibration_keeps_the_old_file(fitted, tmp_path):
    _, model = fitted
    before = model.read_bytes()
    bad = write_png(tmp_path / "bad" / "broken.png", np.zeros((8, 8, 3), np.uint8))
    bad.write_bytes(b"not an image")
    result = invoke("calibrate", "--model", model, "--normal", bad.parent, "--no-progress")
    assert result.exit_code != 0 and "broken.png" in result.output
    assert model.read_bytes() == before


def test_bad_inputs_to_the_new_commands_give_one_line(fitted, tmp_path):
    root, model = fitted
    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes(model.read_bytes())  # a model without its statistics
    result = invoke("update", "--model", lonely, root / "widget" / "test" / "good", "--no-progress")
    assert result.exit_code == 4 and "statistics file not found" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = invoke("merge", model, "--out", tmp_path / "m.safetensors")
    assert result.exit_code == 2 and "at least two" in result.output
    other = tmp_path / "other"
    assert invoke("fit", root, "--category", "widget", "--out", other, *FAST[:2], "--d", "12", *FAST[4:]).exit_code == 0
    result = invoke("merge", model, other / "model.safetensors", "--out", tmp_path / "m.safetensors")
    assert result.exit_code != 0 and "different settings" in result.output
    result = invoke("calibrate", "--model", tmp_path / "nothing.safetensors", "--normal", root, "--no-progress")
    assert result.exit_code != 0
