"""padim.model.calibration: out-of-fold scores in closed form, and what a threshold promises."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from padim import Padim
from padim.model.calibration import KeptEmbeddings, calibration_sample, leave_one_out, operating_point


def test_leave_one_out_equals_the_distance_to_the_model_of_the_other_images():
    rng = np.random.default_rng(0)
    n, d, eps = 9, 5, 0.01
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))

    def distance(v, rows, eps):
        mean, cov = rows.mean(0), np.cov(rows, rowvar=False) + eps * np.eye(d)
        return np.sqrt((v - mean) @ np.linalg.solve(cov, v - mean))

    inside = torch.tensor([[distance(v, x, eps)] for v in x])
    got = leave_one_out(inside, n).numpy().ravel()
    # the model without image i, its eps scaled by (n - 1) / (n - 2) as the closed form has it
    expected = [distance(x[i], np.delete(x, i, 0), eps * (n - 1) / (n - 2)) for i in range(n)]
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert (got > inside.numpy().ravel()).all()  # an image is farther from a model that has not seen it


def test_out_of_fold_scores_of_a_fit_match_refits_without_each_image():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (10, 3, 64, 64), dtype=np.uint8))
    kw = {"image_size": 64, "d": 16, "sigma": 1.0, "pretrained": False, "factor_dtype": "float32", "scales": (1.0,),
          "image_score": "map"}
    torch.manual_seed(0)
    full = Padim(**kw).fit(images)
    refits = []
    for i in range(len(images)):
        torch.manual_seed(0)  # the same random backbone
        rest = torch.cat([images[:i], images[i + 1:]])
        m = Padim(**kw, eps=0.01 * 9 / 8, calibration_images=0).fit(rest)
        refits.append(float(m.predict(images[i:i + 1]).scores[0]))
    # the kept embeddings are float16 (about the statistics' shift): a few parts in 10^4
    np.testing.assert_allclose(full.info_["calibration"]["scores"], np.sort(refits), rtol=1e-3)


def test_kept_embeddings_keep_the_chosen_images_of_a_stream():
    kept = KeptEmbeddings(np.array([1, 4, 5]))
    shift = [[torch.full((2, 3), 10.0)]]
    for start in (0, 3):
        blocks = [[torch.arange(start, start + 3, dtype=torch.float32).view(1, 3, 1).expand(2, 3, 3) + 10]]
        kept.offer(blocks, shift)
    back = torch.cat([b[0][0] for b in kept.batches(2)], dim=1)
    assert len(kept) == 3 and back[0, :, 0].tolist() == [11.0, 14.0, 15.0]


def test_calibration_sample_is_all_images_up_to_the_limit_and_a_fixed_sample_beyond():
    assert calibration_sample(5, 8, 0).tolist() == [0, 1, 2, 3, 4]
    a, b = calibration_sample(100, 10, 3), calibration_sample(100, 10, 3)
    assert a.tolist() == b.tolist() == sorted(set(a.tolist())) and len(a) == 10


@pytest.mark.parametrize("n, target, rank", [(99, 0.01, 1), (450, 0.01, 4), (10, 0.01, 1), (199, 0.05, 10)])
def test_operating_point_takes_the_kth_largest_score(n, target, rank):
    scores = np.random.default_rng(0).normal(size=n)
    point = operating_point(scores, target)
    assert point["rank"] == rank and point["threshold"] == np.sort(scores)[-rank]
    assert point["expected_fpr"] == pytest.approx(rank / (n + 1))
    low, high = point["fpr_interval"]
    assert low < point["expected_fpr"] < high


def test_the_stated_interval_covers_the_false_alarm_rate_of_new_normal_images():
    """Draw n calibration scores, set the threshold, measure the true false-alarm rate (known for a
    normal distribution): about 90% of draws fall inside the stated 90% interval."""
    from scipy.stats import norm

    rng = np.random.default_rng(1)
    inside, rates = 0, []
    for _ in range(400):
        point = operating_point(rng.normal(size=300), 0.01)
        rate = norm.sf(point["threshold"])
        rates.append(rate)
        inside += point["fpr_interval"][0] <= rate <= point["fpr_interval"][1]
    assert 0.85 <= inside / 400 <= 0.95
    assert np.mean(rates) <= 0.01 + 0.001  # the promise: at most the target on average
