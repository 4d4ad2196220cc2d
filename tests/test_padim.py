"""padim.model.padim and padim.model.io: the estimator on synthetic images, and model files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import defect_mask, texture, write_png
from padim import Padim
from padim.datasets import DatasetError
from padim.datasets.images import ImageFiles
from padim.metrics import auroc
from padim.model import ModelFileError, read_model_file
from padim.model.batches import STATS_GROUP, decode_workers, decoded_batches
from padim.model.calibration import operating_point
from padim.model.stats import GaussianStats, JointStats


@pytest.fixture(scope="module")
def fitted() -> Padim:
    rng = np.random.default_rng(1)
    train = [texture(rng) for _ in range(20)]
    return Padim(image_size=64, d=32, sigma=1.0, calibration_images=16).fit(train)


def test_fit_scores_a_sample_of_its_images_out_of_fold_for_the_threshold(fitted):
    assert fitted.info_["n_train"] == 20 and fitted.info_["n_calibration"] == 16
    point = fitted.info_["calibration"]
    assert point["method"] == "out-of-fold" and point["rank"] == 1  # 1% of 17: the largest of 16 scores
    assert fitted.threshold_ == max(point["scores"])
    low, high = fitted.info_["map_range"]
    assert low < fitted.info_["map_threshold"] < high  # the colour range is the map's


def test_defects_score_higher_and_maps_point_at_them(fitted):
    rng = np.random.default_rng(2)
    normal = [texture(rng) for _ in range(6)]
    bad = [texture(rng, defect=True) for _ in range(6)]
    pred = fitted.predict(normal + bad)
    assert pred.maps.shape == (12, 64, 64) and pred.labels is not None
    assert auroc(np.r_[np.zeros(6), np.ones(6)], pred.scores) > 0.9
    masks = np.stack([defect_mask(b) for b in bad])
    assert auroc(masks, pred.maps[6:]) > 0.8
    assert pred.labels[6:].sum() >= 4


def test_tensor_input_matches_array_input(fitted):
    rng = np.random.default_rng(3)
    images = [texture(rng) for _ in range(3)]
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    np.testing.assert_allclose(fitted.predict(tensor).scores, fitted.predict(images).scores, rtol=1e-6)


def test_save_load_round_trip_gives_identical_predictions(fitted, tmp_path):
    path = fitted.save(tmp_path / "m.safetensors")
    again = Padim.load(path)
    rng = np.random.default_rng(4)
    images = [texture(rng, defect=True) for _ in range(3)]
    np.testing.assert_allclose(again.predict(images).maps, fitted.predict(images).maps, rtol=1e-5, atol=1e-5)
    assert again.threshold_ == fitted.threshold_
    meta, tensors = read_model_file(path)
    assert meta["backbone"] == "mobilenet_v2" and meta["image_size"] == [64, 64] and meta["package_version"]
    assert meta["scales"] == [1.0, 0.7] and meta["grids"] == [[16, 16], [12, 12]]  # 0.7 x 64 px: 48 px, 12 cells
    # nearest tap resizing (the default): the factor per cell, in float16; no per-position factor
    assert meta["storage"] == "cells" and meta["factor_dtype"] == "float16" and "factor_tril" not in tensors
    assert tensors["w0_0_0"].dtype == torch.float16 and tensors["w0_0_0"].shape[0] == 4 * 4  # deepest cells


def test_same_seed_gives_the_same_model_bytes(tmp_path):
    rng = np.random.default_rng(5)
    train = [texture(rng) for _ in range(8)]
    a = Padim(image_size=64, d=16).fit(train).save(tmp_path / "a.safetensors")
    b = Padim(image_size=64, d=16).fit(train).save(tmp_path / "b.safetensors")
    strip = [json.dumps({k: v for k, v in read_model_file(p)[0].items() if k != "created"}) for p in (a, b)]
    assert strip[0] == strip[1]
    ta, tb = read_model_file(a)[1], read_model_file(b)[1]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_model_file_errors_are_clear(fitted, tmp_path):
    path = fitted.save(tmp_path / "m.safetensors")
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="t.safetensors"):
        Padim.load(truncated)
    other = tmp_path / "o.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ModelFileError, match="without padim metadata"):
        Padim.load(other)
    meta, tensors = read_model_file(path)
    tensors["mean"] = tensors["mean"][:-1].contiguous()
    wrong = tmp_path / "w.safetensors"
    save_file(tensors, str(wrong), metadata={"padim": json.dumps(meta)})
    with pytest.raises(ModelFileError, match="'mean'"):
        Padim.load(wrong)
    meta["format"] = "visa-padim/0"
    save_file(read_model_file(path)[1], str(wrong), metadata={"padim": json.dumps(meta)})
    with pytest.raises(ModelFileError, match="format"):
        Padim.load(wrong)
    with pytest.raises(ModelFileError, match="not found"):
        Padim.load(tmp_path / "missing.safetensors")


def test_too_few_images_and_unfitted_use_are_errors():
    with pytest.raises(ValueError, match="at least"):
        Padim(image_size=64, d=8).fit([texture(np.random.default_rng(0))])
    with pytest.raises(RuntimeError, match="not fitted"):
        Padim().predict([])


def test_sharded_accumulation_gives_the_same_model_as_fit():
    rng = np.random.default_rng(6)
    train = [texture(rng) for _ in range(10)]
    # a float32 factor: the merged sums differ in float64 rounding, which float16 could turn into an ulp
    whole = Padim(image_size=64, d=16, factor_dtype="float32").fit(train)
    sharded = Padim(image_size=64, d=16, factor_dtype="float32")
    stats = sharded.accumulate(train[:3]) + sharded.accumulate(train[3:])
    sharded.fit_from_stats(stats, train)
    fa, fb = (m.scorer_.whitening.factor_of(slice(None)) for m in (sharded, whole))
    torch.testing.assert_close(fa, fb, rtol=1e-5, atol=1e-6)
    # the deep score's factor: 10 images in 160 channels, so its covariance is ill-conditioned and
    # the float32 products of each shard (about their own shift) show in its small entries
    fa, fb = (m.scorer_.deep.factor_of(slice(None)) for m in (sharded, whole))
    assert float((fa - fb).abs().max()) < 1e-4 * float(fb.abs().max())
    # the out-of-fold images are kept in float16 about each fit's own shift: the map's threshold is
    # close; the deep score's out-of-fold distances, of 10 images in 160 channels, are not
    assert sharded.info_["map_threshold"] == pytest.approx(whole.info_["map_threshold"], rel=1e-3)


@pytest.mark.parametrize("tap_resize", ["nearest", "bilinear"])  # per cell, and per position
def test_statistics_are_updated_once_per_group_of_batches_and_equal_the_float64_sums(monkeypatch, tap_resize):
    rng = np.random.default_rng(7)
    n = 2 * STATS_GROUP + 3
    images = torch.stack([torch.from_numpy(texture(rng)).permute(2, 0, 1) for _ in range(n)])
    model = Padim(image_size=64, d=16, batch_size=2, tap_resize=tap_resize, image_score="map")
    groups, update = [], GaussianStats.update
    monkeypatch.setattr(GaussianStats, "update", lambda self, b: groups.append(b[0][0].shape[1]) or update(self, b))
    stats = model.accumulate(images)
    # full groups of STATS_GROUP batches of 2; the last group is 2 + 1 images
    assert groups == [2 * STATS_GROUP, 3] and stats.count == n
    with torch.inference_mode():
        x = model.feature_extractor()(images).double().permute(2, 0, 1)  # (P, N, d)
    total, outer = stats.sums()
    torch.testing.assert_close(total, x.sum(dim=1), rtol=1e-6, atol=1e-6 * float(x.abs().max()) * n)
    exact = x.transpose(1, 2) @ x
    assert float((outer - exact).abs().max()) < 1e-6 * float(exact.abs().max())


def test_the_deep_image_scores_statistics_are_the_float64_sums_of_the_deep_tap():
    rng = np.random.default_rng(8)
    images = torch.stack([torch.from_numpy(texture(rng, 96)).permute(2, 0, 1) for _ in range(7)])
    model = Padim(image_size=96, d=16, batch_size=3)
    stats = model.accumulate(images)
    assert isinstance(stats, JointStats) and stats.count == 7 and stats.deep.count == 7
    with torch.inference_mode():
        deep: list[torch.Tensor] = []
        model.feature_extractor()(images, deep=deep)
        x = torch.cat(deep).double().flatten(2).permute(2, 0, 1)  # (P', N, 160): the 3x3 grid of stride 32
    assert x.shape == (9, 7, 160)
    total, outer = stats.deep.sums()
    torch.testing.assert_close(total, x.sum(dim=1), rtol=1e-6, atol=1e-6 * float(x.abs().max()) * 7)
    exact = x.transpose(1, 2) @ x
    assert float((outer - exact).abs().max()) < 1e-6 * float(exact.abs().max())
    both = stats + model.accumulate(images[:2])  # shards add up, part by part
    assert both.count == 9 and both.deep.count == 9
    back = model.embedding().stats_from_state(stats.count, stats.state())
    assert all(torch.equal(a, b) for a, b in zip(back.deep.state().values(), stats.deep.state().values(), strict=True))
    with pytest.raises(ValueError, match="with and without"):
        stats += model.set_params(image_score="map").accumulate(images[:2])


def test_decoding_processes_only_on_cores_that_torch_leaves_free(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for cores, expected in [(2, 0), (3, 1), (16, 2)]:
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert decode_workers(None, 100, 16) == expected
    assert decode_workers(None, 16, 16) == 0  # one batch: nothing to overlap
    assert decode_workers(3, 16, 16) == 3  # as requested


def test_batches_decoded_on_threads_equal_the_data_loaders_in_order_and_name_a_bad_file(tmp_path):
    rng = np.random.default_rng(4)
    paths = [write_png(tmp_path / f"{i}.png", texture(rng, size=48)) for i in range(7)]
    files = ImageFiles(paths, (32, 40))
    want = list(torch.utils.data.DataLoader(files, batch_size=3))
    got = list(decoded_batches(files, 3, threads=2))
    assert [b.shape for b in got] == [(3, 3, 32, 40), (3, 3, 32, 40), (1, 3, 32, 40)]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    (tmp_path / "4.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="4.png"):
        list(decoded_batches(files, 3, threads=2))


def test_the_deep_score_is_fitted_out_of_fold_and_masks_keep_the_maps_own_threshold(tmp_path):
    rng = np.random.default_rng(9)
    model = Padim(image_size=64, d=16, num_workers=0).fit([texture(rng) for _ in range(24)])
    assert model.params_.image_score == "deep" and model.scorer_.deep is not None
    parts = model.info_["fusion_scores"]  # each training image's map and deep scores, out of fold
    assert len(parts["map"]) == len(parts["deep"]) == model.info_["n_calibration"] == 24
    centre = [float(np.median(np.float32(parts[k]))) for k in ("map", "deep")]
    assert model.scorer_.maps.fusion[0:4:2].tolist() == pytest.approx(centre, rel=1e-6)
    # the stored scores are the fused ones; masks and colours take the map's own threshold
    fused = model.scorer_.maps.fuse(*(torch.tensor(parts[k]) for k in ("map", "deep"))).numpy()
    np.testing.assert_allclose(model.info_["calibration"]["scores"], np.sort(fused), rtol=1e-5, atol=1e-5)
    at_map = operating_point(np.float32(parts["map"]), model.target_fpr)["threshold"]
    assert model.info_["map_threshold"] == pytest.approx(at_map) and model.info_["map_range"][1] > at_map
    test = [texture(rng, defect=i % 2 == 1) for i in range(4)]
    loaded = Padim.load(model.save(tmp_path / "m.safetensors"))
    assert loaded.info_["map_threshold"] == model.info_["map_threshold"]
    np.testing.assert_array_equal(loaded.predict(test).scores, model.predict(test).scores)
    # 24 images for 160 channels: the deep part is left out, the score is the map's, standardized
    assert model.scorer_.maps.fusion[4].item() == 0.0
    pred, f = model.predict(test), model.scorer_.maps.fusion
    np.testing.assert_allclose(pred.scores, (pred.maps.reshape(4, -1).max(1) - f[0].item()) / f[1].item(), rtol=1e-5)


def test_the_deep_part_counts_once_there_are_more_training_images_than_its_channels():
    rng = np.random.default_rng(10)
    images = np.stack([texture(rng, 32) for _ in range(170)])
    model = Padim(image_size=32, d=8, num_workers=0, scales=(1.0,)).fit(images)
    assert model.scorer_.maps.fusion[4].item() == 1.0  # 170 > 160: the deep score takes part
