"""The model's parameters in one place: their defaults, their checks, and their form in a model
file. Light on purpose (no torch): the command line reads the defaults before any heavy import."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace

# the model file in a run folder (padim fit / run write it, the other commands read it)
MODEL_FILE = "model.safetensors"
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 32, 4096  # 32: the deepest tap of a 4-tap backbone has stride 32
TAP_RESIZE = ("nearest", "bilinear")
FACTOR_DTYPES = ("float16", "float32")
FEATURE_DTYPES = ("float32", "bfloat16")
COVARIANCE_ESTIMATORS = ("eps", "oas")
# what the image score ranks: 'map' the smoothed, averaged anomaly map (PaDiM); 'levels' each
# pyramid level's own distances, unsmoothed, over 2x2 positions, averaged over the levels; 'deep'
# the map's score and a deep stride-32 tap's, each standardized by its out-of-fold spread, summed
IMAGE_SCORES = ("map", "levels", "deep")

# The named configurations of 'padim benchmark --configs', in one table: 'padim run' option values
# (by parameter name, parsed form) that replace the command's own. 'plain' is plain PaDiM at
# anomalib's settings (256 px square, a random 100 channels, one scale, no pooling, max image score),
# the reference every default is held against.
CONFIGS: dict[str, dict[str, object]] = {
    "default": {},
    "plain": {"image_size": 256, "aspect": "square", "d": 100, "scales": (1.0,), "pool": 1, "top_k": 1,
              "image_score": "map"},
    # the defaults with the image score of the map alone (the default before the deep score)
    "map": {"image_score": "map"},
    # the defaults with the image score from each level's unblurred distances (issue 28's candidate)
    "levels": {"image_score": "levels"},
}


def check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    """Validated pyramid scales: each in (0, 1], no repeats."""
    out = tuple(float(s) for s in scales)
    if not out or any(not 0.0 < s <= 1.0 for s in out) or len(set(out)) != len(out):
        raise ValueError(f"scales must be distinct numbers in (0, 1], got {list(scales)}")
    return out


def as_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) from N (N x N) or a pair."""
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = image_size
    return (int(h), int(w))


def default_d(backbone: str) -> int:
    """Every channel of a small backbone (<= 200), else PaDiM's 100."""
    from .backbones.registry import get_spec

    total = sum(get_spec(backbone).channels)
    return total if total <= 200 else 100


def deep_counts(count: float, channels: int) -> bool:
    """Whether ``count`` training images are enough for the deep image score's Gaussians of
    ``channels`` channels: more images than channels (else each covariance is rank-deficient and
    the out-of-fold distances of its training images run into the leave-one-out floor)."""
    return count > channels


def default_sigma(image_size: tuple[int, int]) -> float:
    """PaDiM's blur of 4 px at 256 px, scaled with the shorter input side."""
    return 4.0 * min(image_size) / 256


def is_int(v) -> bool:
    """An int in JSON's sense: not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite int or float, not a bool."""
    return (isinstance(v, float) or is_int(v)) and math.isfinite(v)


def _side(v) -> bool:
    return is_int(v) and MIN_IMAGE_SIDE <= v <= MAX_IMAGE_SIDE


# what a resolved value of each parameter must be: (check, description for messages)
CHECKS: dict[str, tuple[Callable, str]] = {
    "backbone": (lambda v: isinstance(v, str), "a backbone name"),
    "image_size": (lambda v: isinstance(v, list | tuple) and len(v) == 2 and all(_side(x) for x in v),
                   f"[h, w] in {MIN_IMAGE_SIDE}..{MAX_IMAGE_SIDE}"),
    "d": (lambda v: is_int(v) and v >= 1, "a positive integer"),
    "eps": (lambda v: is_number(v) and v >= 0, "a finite number >= 0"),
    "sigma": (lambda v: is_number(v) and 0 <= v <= MAX_IMAGE_SIDE, f"a number in 0..{MAX_IMAGE_SIDE}"),
    "seed": (lambda v: is_int(v) and v >= 0, "a non-negative integer"),
    "target_fpr": (lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "calibration_images": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "pool": (lambda v: is_int(v) and v >= 1 and v % 2 == 1, "an odd integer >= 1"),
    "tap_resize": (lambda v: v in TAP_RESIZE, " or ".join(TAP_RESIZE)),
    "factor_dtype": (lambda v: v in FACTOR_DTYPES, " or ".join(FACTOR_DTYPES)),
    "feature_dtype": (lambda v: v in FEATURE_DTYPES, " or ".join(FEATURE_DTYPES)),
    "covariance": (lambda v: v in COVARIANCE_ESTIMATORS, " or ".join(COVARIANCE_ESTIMATORS)),
    "top_k": (lambda v: is_int(v) and v >= 1, "a positive integer"),
    "image_score": (lambda v: v in IMAGE_SCORES, " or ".join(IMAGE_SCORES)),
    "scales": (lambda v: isinstance(v, list | tuple) and len(v) >= 1 and all(is_number(x) and 0 < x <= 1 for x in v)
               and len(set(v)) == len(v), "distinct numbers in (0, 1]"),
}


def check_param(name: str, value) -> None:
    """ValueError unless ``value`` is a valid resolved value of parameter ``name`` (see CHECKS)."""
    check, expected = CHECKS[name]
    if not check(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


# parameters added after the first model files, with the value that gives an older file's behaviour
OLDER_FILES: dict[str, object] = {"image_score": "map", "target_fpr": 0.01, "calibration_images": 0,
                                  "feature_dtype": "float32"}
# what a fitted model says of its training and its threshold (Padim.info_, kept in its file)
INFO_FIELDS = ("n_train", "n_calibration", "calibration_scores", "map_range", "calibration", "calibration_history",
               "map_threshold", "fusion_scores")


def stored_threshold(meta: dict) -> tuple[float | None, dict]:
    """(threshold, info) as a model file's metadata holds them (see INFO_FIELDS)."""
    return (None if meta.get("threshold") is None else float(meta["threshold"])), {k: meta.get(k) for k in INFO_FIELDS}


# parameters that only set the threshold: a recalibration may change them
THRESHOLD_PARAMS = ("target_fpr", "calibration_images")
# parameters of older files that no longer exist (their threshold was a hold-out's quantile)
RETIRED = ("calibration_fraction", "threshold_quantile")


@dataclass(frozen=True)
class PadimParams:
    """What defines a PaDiM model; ``d``, ``sigma`` and ``image_score`` may be None (a default
    derived from the backbone and the input size) until :meth:`resolved`.

    backbone: registered backbone name (see ``padim.backbones.list_backbones()``).
    image_size: (height, width) in pixels, or N for N x N; the CLI's default keeps the training
        images' aspect ratio at 320 px on the shorter side (VisA: 320x480).
    d: feature channels kept (a fixed random subset, PaDiM's reduction); None keeps every channel of
        a backbone with at most 200 (MobileNetV2: 152) and 100 of larger ones, since scoring costs
        d^2 per position.
    eps: added to each covariance diagonal; keeps it invertible with few images.
    sigma: Gaussian blur of the upsampled map, in input pixels (0 = none); None scales PaDiM's 4 px
        at 256 px with the input: 4 * shorter side / 256.
    seed: fixes the channel subset and which training images set the threshold.
    target_fpr: the false-alarm rate the stored threshold aims at on new normal images like the
        training ones (see :mod:`padim.model.calibration`).
    calibration_images: training images (at most; a random sample of them beyond) whose
        out-of-fold scores set the threshold: each is scored by the model of all the others, in
        closed form from the one fit (0 = no threshold).
    pool: average each feature tap over a pool x pool neighbourhood (1 = plain PaDiM).
    tap_resize: 'nearest' (PaDiM's) or 'bilinear' resizing of the deeper taps to the stride-4 grid.
        With 'nearest', where each deeper grid divides the finest evenly (320x480 and its 0.7 level
        do), fit and predict work once per deep cell and the model keeps its factor per cell
        (:mod:`padim.model.cells`): the same numbers, faster, in less memory, fewer stored values.
    factor_dtype: precision of the whitening factor kept and stored, 'float16' (half the model file)
        or 'float32'; scoring runs in float32 either way (see docs/model-size.md).
    covariance: 'eps' (sample covariance + eps*I, PaDiM) or 'oas' (OAS shrinkage + eps*I, fitted and
        scored per position: its coefficient differs at every position).
    top_k: image score = mean of the top_k largest map values (1 = max, PaDiM).
    scales: input scales of a feature pyramid: one Gaussian per position of each, the maps of all
        scales averaged ((1.0, 0.7) by default: the coarser level sees more context per patch,
        which helps large defects; (1.0,) = plain PaDiM).
    image_score: what the image score ranks: 'map' (the smoothed, averaged map, PaDiM), 'levels'
        (each pyramid level's own distances, 2x2-averaged, the max, averaged over the levels) or
        'deep' (the map's score plus a deep one: one Gaussian per position of a stride-32 tap, the
        mean of its 10 largest distances; each standardized by the median and spread of its
        out-of-fold training scores); None: 'deep' where the backbone has a deep tap and there are
        calibration images, else 'map'.
        The maps are the same for all three; masks and colours use the map's own threshold.
    feature_dtype: the precision the backbone computes in, 'float32' or 'bfloat16' (convolutions
        on bfloat16 inputs and weights, summing in float32; the taps turned back into float32 for
        everything after). A model scores in the precision it was fitted in, as its Gaussians hold
        that precision's rounding. bfloat16 features differ from float32 ones by several percent,
        which an ONNX export (float32) does not reproduce: see docs/performance.md.
    """

    backbone: str = "mobilenet_v2"
    image_size: tuple[int, int] = (320, 480)
    d: int | None = None
    eps: float = 0.01
    sigma: float | None = None
    seed: int = 0
    target_fpr: float = 0.01
    calibration_images: int = 512
    pool: int = 3
    tap_resize: str = "nearest"
    factor_dtype: str = "float16"
    covariance: str = "eps"
    top_k: int = 1
    scales: tuple[float, ...] = (1.0, 0.7)
    image_score: str | None = None
    feature_dtype: str = "float32"

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The parameters' names, in order."""
        return tuple(f.name for f in fields(cls))

    def resolved(self) -> PadimParams:
        """These parameters checked, with the derived defaults filled in: ``d`` (see
        :func:`default_d`), ``sigma`` (:func:`default_sigma`), ``image_score``, and a float32 factor where float16
        cannot hold it. ValueError (BackboneError for an unknown backbone) names a bad one."""
        from .backbones.registry import get_spec

        get_spec(self.backbone)
        size = as_size(self.image_size)
        # fp16 holds |W_ij| <= ||W|| <= 1/sqrt(eps) (cov >= eps I) only for eps >= 1e-8
        dtype = "float32" if self.factor_dtype == "float16" and self.eps < 1e-8 else self.factor_dtype
        out = replace(self, image_size=size, scales=check_scales(self.scales), factor_dtype=dtype,
                      d=default_d(self.backbone) if self.d is None else self.d,
                      sigma=default_sigma(size) if self.sigma is None else float(self.sigma),
                      image_score=self.image_score or ("deep" if get_spec(self.backbone).deep
                                                       and self.calibration_images > 0 else "map"))
        for name, value in asdict(out).items():
            check_param(name, value)
        if out.image_score == "deep" and not get_spec(self.backbone).deep:
            raise ValueError(f"backbone {self.backbone!r} has no deep tap for image_score 'deep'; use 'map'")
        if out.image_score == "deep" and out.calibration_images == 0:
            raise ValueError("image_score 'deep' needs calibration_images > 0: its two scores are put on one "
                             "scale by their out-of-fold spread")
        total = sum(get_spec(self.backbone).channels)
        if out.d > total:
            raise ValueError(f"d must be in 1..{total} for backbone {self.backbone!r}, got {out.d}")
        return out

    def model_state(self) -> dict:
        """:meth:`to_state` without the threshold's parameters: what two fits must share for their
        statistics to add up and their models to score alike."""
        return {k: v for k, v in self.to_state().items() if k not in THRESHOLD_PARAMS}

    def to_state(self) -> dict:
        """The parameters as JSON values (lists for tuples), as a model file stores them."""
        state = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in state.items()}

    @classmethod
    def from_state(cls, state: dict) -> PadimParams:
        """The resolved parameters of a :meth:`to_state` dict (other keys ignored); ValueError
        names a missing or bad one."""
        state = {**OLDER_FILES, **state}
        missing = [n for n in cls.names() if n not in state]
        if missing:
            raise ValueError(f"parameter(s) {', '.join(missing)} missing")
        values = {n: state[n] for n in cls.names()}
        for name in ("image_size", "scales"):
            if isinstance(values[name], list):
                values[name] = tuple(values[name])
        for name, value in values.items():  # before resolving, which would fill a missing d or sigma
            check, expected = CHECKS[name]
            if not check(value):
                raise ValueError(f"{name} is {value!r}, expected {expected}")
        return cls(**values).resolved()
