"""End to end on the real VisA fryum data (../shared/data/visa), kept small so CI stays quick."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from padim import Padim
from padim.checksums import sha256_of
from padim.cli import main
from padim.datasets import load_split, read_image, read_mask
from padim.datasets.images import to_tensor
from padim.metrics import aupro, auroc
from padim.model import PadimScorer, read_model_file
from padim.model.embedding import embedding_for

pytestmark = pytest.mark.real_data


def test_official_split_is_read_as_published(visa_root):
    split = load_split(visa_root, "fryum")
    assert len(split.train) == 450 and all(s.label == 0 for s in split.train)
    assert sum(s.label == 0 for s in split.test) == 50 and sum(s.label == 1 for s in split.test) == 100
    assert all(s.mask is not None for s in split.test if s.label)
    assert any(len(s.defects) > 1 for s in split.test)  # quoted multi-label rows


def test_small_fit_detects_real_fryum_defects(visa_root):
    split = load_split(visa_root, "fryum")
    normal = [s for s in split.test if s.label == 0][:10]
    anomalous = [s for s in split.test if s.label == 1][:20]
    model = Padim(image_size=128).fit([s.path for s in split.train[:40]])
    pred = model.predict([s.path for s in normal + anomalous])
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    masks = np.stack([read_mask(s.mask, model.image_size_) for s in normal + anomalous])
    assert auroc(labels, pred.scores) > 0.7
    assert auroc(masks, pred.maps) > 0.85
    assert aupro(masks, pred.maps) > 0.4


def test_cli_seed_protocol_on_fryum(visa_root, tmp_path):
    result = CliRunner().invoke(main, [
        "run", str(visa_root), "--category", "fryum", "--split", "seed", "--image-size", "128",
        "--out", str(tmp_path), "--no-figures", "--no-progress",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model"]["n_train"] == 100 and metrics["dataset"]["n_test_anomalous"] == 100
    assert metrics["overall"]["image_auroc"] is None
    assert metrics["overall"]["pixel_auroc"] > 0.85


def test_cli_fit_resnet18_with_a_torchvision_weights_file_on_fryum(visa_root, tmp_path, monkeypatch):
    # a file written by torchvision's own resnet18() and torch.save, as the published one is: the
    # same loading path (torch.load weights_only, strict state dict) as with the real weights
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "resnet18-random.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    # a few real fryum images, linked (read in place) into the plain-folder layout
    split = load_split(visa_root, "fryum")
    data = tmp_path / "data" / "fryum"
    for folder, samples in (("train/good", split.train[:12]), ("test/good", [s for s in split.test if not s.label][:1]),
                            ("test/bad", [s for s in split.test if s.label][:1])):
        (data / folder).mkdir(parents=True)
        for sample in samples:
            (data / folder / sample.path.name).symlink_to(sample.path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache: only --weights has them
    fit = ["fit", str(tmp_path / "data"), "--category", "fryum", "--backbone", "resnet18", "--image-size", "64",
           "--scales", "1", "--d", "20", "--out", str(tmp_path / "out"), "--no-progress"]
    missing = CliRunner().invoke(main, fit)
    assert missing.exit_code == 5 and "padim download weights resnet18" in missing.stderr
    result = CliRunner().invoke(main, [*fit, "--weights", str(weights)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    path = tmp_path / "out" / "model.safetensors"
    meta = read_model_file(path)[0]
    assert meta["backbone"] == "resnet18" and meta["n_train"] == 12
    assert meta["backbone_weights"] == [{"file": weights.name, "sha256": sha256_of(weights)}]
    pred = Padim.load(path, weights=weights).predict(sorted((data / "test").rglob("*.JPG")))
    assert pred.maps.shape[1:] == (64, 96) and np.isfinite(pred.scores).all()


def test_cell_by_cell_fit_on_real_fryum_equals_the_position_by_position_one(visa_root):
    split = load_split(visa_root, "fryum")
    train = torch.stack([to_tensor(read_image(s.path, (128, 128))) for s in split.train[:30]])
    test = torch.stack([to_tensor(read_image(s.path, (128, 128))) for s in split.test[45:55]])
    # float32 factor: this compares the arithmetic of the two forms (float16 rounding is pinned in test_cells)
    model = Padim(image_size=128, tap_resize="nearest", calibration_images=0, factor_dtype="float32").fit(train)
    assert model.scorer_.storage == "cells"  # 128 px and its 96 px level: every tap grid nests
    positions = embedding_for(model.feature_extractor(), model.image_size_, storage="positions")
    stats = positions.stats()
    with torch.inference_mode():
        stats.update(positions(train))
        expected = PadimScorer.fit(positions, stats, model.params_)(test)[1].numpy()
    got = model.predict(test).maps
    assert np.abs(got - expected).max() < 1e-5 * np.abs(expected).max()
