"""padim.params: the one list of model parameters, their defaults, checks and model-file form, and
the estimator's scikit-learn contract around it."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone

from padim import Padim
from padim.errors import BackboneError
from padim.params import PadimParams


def test_resolved_fills_the_derived_defaults_and_keeps_what_was_given():
    p = PadimParams(image_size=256).resolved()
    assert p.image_size == (256, 256) and p.d == 152 and p.sigma == 4.0  # every MobileNetV2 channel, 4 px at 256
    assert PadimParams(backbone="wide_resnet50_2").resolved().d == 100  # PaDiM's setting for a large backbone
    given = PadimParams(d=40, sigma=0.0, scales=[1, 0.5]).resolved()
    assert (given.d, given.sigma, given.scales) == (40, 0.0, (1.0, 0.5))
    assert PadimParams(eps=1e-9).resolved().factor_dtype == "float32"  # float16 could not hold the factor
    # the deep image score where the backbone has the tap and out-of-fold scores set its scale
    assert p.image_score == "deep" and PadimParams(calibration_images=0).resolved().image_score == "map"
    assert PadimParams(backbone="resnet18").resolved().image_score == "map"


@pytest.mark.parametrize(("change", "fragment"), [
    ({"target_fpr": 1.0}, "target_fpr must be a number in \\(0, 1\\)"),
    ({"calibration_images": -1}, "calibration_images"),
    ({"pool": 2}, "pool must be an odd integer"),
    ({"tap_resize": "cubic"}, "tap_resize must be nearest or bilinear"),
    ({"covariance": "ledoit"}, "covariance"),
    ({"factor_dtype": "int8"}, "factor_dtype"),
    ({"top_k": 0}, "top_k"),
    ({"image_score": "mean"}, "image_score must be map or levels or deep"),
    ({"image_score": "deep", "calibration_images": 0}, "needs calibration_images > 0"),
    ({"image_score": "deep", "backbone": "resnet18"}, "no deep tap"),
    ({"scales": (1.0, 1.0)}, "scales"),
    ({"d": 500}, "d must be in 1..152"),
    ({"image_size": (4, 4)}, "image_size"),
])
def test_a_bad_parameter_is_named(change, fragment):
    with pytest.raises(ValueError, match=fragment):
        PadimParams(**change).resolved()


def test_state_round_trips_through_json_values_and_names_a_bad_field():
    p = PadimParams(image_size=(64, 96), d=40, scales=(1.0, 0.5)).resolved()
    state = p.to_state()
    assert state["image_size"] == [64, 96] and state["scales"] == [1.0, 0.5]
    assert PadimParams.from_state({**state, "threshold": 3.0}) == p  # other fields of a model file are ignored
    with pytest.raises(ValueError, match="pool"):
        PadimParams.from_state({**state, "pool": True})
    old = {k: v for k, v in state.items() if k != "image_score"}  # a model file from before the option
    assert p.image_score == "deep" and PadimParams.from_state(old).image_score == "map"  # an older file keeps its score
    assert PadimParams.from_state(old).feature_dtype == "float32"  # an older file's features were float32
    levels = PadimParams(image_size=(64, 96), image_score="levels").resolved()
    assert PadimParams.from_state(levels.to_state()).image_score == "levels"
    del state["eps"]
    with pytest.raises(ValueError, match="eps missing"):
        PadimParams.from_state(state)


def test_the_estimator_stores_its_arguments_and_resolves_them_in_fit(rng):
    model = Padim(image_size=64, d=None, sigma=None, batch_size=4)
    assert (model.image_size, model.d, model.sigma) == (64, None, None)  # as given (scikit-learn's contract)
    params = model.get_params()
    assert list(params)[:len(PadimParams.names())] == list(PadimParams.names())
    assert params["batch_size"] == 4 and Padim(**params).get_params() == params
    assert clone(model).get_params() == params  # scikit-learn's clone checks each argument is kept as given
    assert model.model_params().d == 152 and not hasattr(model, "params_")
    model.set_params(d=8)
    model.fit(rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8))
    assert model.params_ == PadimParams(image_size=(64, 64), d=8).resolved()
    assert model.meta_["d"] == 8 and model.image_size_ == (64, 64)
    with pytest.raises(ValueError, match="unknown parameter"):
        model.set_params(depth=3)
    with pytest.raises(BackboneError, match="unknown backbone"):
        Padim(backbone="vgg").fit([])  # checked when fitting, not when constructed


def test_the_image_score_is_kept_in_the_model_file(rng, tmp_path):
    images = rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    model = Padim(image_size=64, d=8, scales=(1.0, 0.5), image_score="levels").fit(images)
    loaded = Padim.load(model.save(tmp_path / "model.safetensors"))
    assert loaded.params_.image_score == "levels" and loaded.scorer_.maps.score == "levels"
    np.testing.assert_allclose(loaded.predict(images).scores, model.predict(images).scores, rtol=1e-5)

