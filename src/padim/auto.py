"""Label-free choice among named configurations (``padim run --auto``, ``padim fit --auto``).

Each configuration is fitted on most of the training normals and scores the others, as they are and
with one synthetic defect pasted into each (:mod:`padim.datasets.synthetic`, kinds in turn); the one
that ranks the pasted defects best (image AUROC, pixel AUROC breaking ties) is then fitted on all
the training images. Nothing of the test split is read. The record of the choice goes into the
model file's metadata (``auto``), metrics.json and the report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .datasets.images import read_image
from .datasets.synthetic import KINDS, paste_defect
from .metrics import auroc
from .params import CONFIGS

AUTO_CONFIGS = ("default", "map", "plain")  # the deep image score, the map's alone, plain PaDiM
HOLD_OUT = 0.2  # share of the training images scored instead of fitted
PIXEL_STEP = 4  # every 4th pixel in each direction of the maps enters the pixel AUROC


def choose_config(paths: Sequence[Path], make: Callable[[dict], object], params: dict,
                  configs: Sequence[str] = AUTO_CONFIGS, seed: int = 0,
                  log: Callable[[str], None] = print) -> tuple[str, dict]:
    """(name, record): the configuration of ``configs`` (names in padim.params.CONFIGS, each
    replacing options of ``params``) whose model, made by ``make(options)`` and fitted on the
    training images ``paths`` but a held-out share, best ranks those held out with synthetic defects
    against those without; the record holds every configuration's synthetic scores."""
    n = len(paths)
    held_n = max(2, round(HOLD_OUT * n))
    if n - held_n < 3:
        raise ValueError(f"--auto needs at least {held_n + 3} training images (a fit and a held-out share), got {n}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    held, fit = (sorted(order[:held_n]), sorted(order[held_n:]))
    size = make(params).model_params().image_size  # the default's input: defects are pasted at that size
    normals = [np.asarray(read_image(paths[i], size)) for i in held]
    defective, masks = [], []
    for i, image in enumerate(normals):
        out, mask = paste_defect(image, KINDS[i % len(KINDS)], rng, donor=normals[(i + 1) % len(normals)])
        defective.append(out)
        masks.append(mask)
    labels = np.r_[np.zeros(len(normals)), np.ones(len(defective))]
    scores: dict[str, dict[str, float]] = {}
    for name in configs:
        model = make({**params, **CONFIGS[name]}).fit([paths[i] for i in fit])
        pred = model.predict([*normals, *defective])
        h, w = model.image_size_
        truth = [np.zeros((h, w), bool)] * len(normals) + [
            np.asarray(Image.fromarray(m).resize((w, h), Image.Resampling.NEAREST)) for m in masks]
        step = (slice(None), slice(None, None, PIXEL_STEP), slice(None, None, PIXEL_STEP))
        scores[name] = {"image_auroc": auroc(labels, pred.scores),
                        "pixel_auroc": auroc(np.stack(truth)[step].ravel(), pred.maps[step].ravel())}
        log(f"auto: {name:8s} synthetic image AUROC {scores[name]['image_auroc']:.3f}, "
            f"pixel AUROC {scores[name]['pixel_auroc']:.3f}")
    best = max(configs, key=lambda c: (scores[c]["image_auroc"], scores[c]["pixel_auroc"]))
    log(f"auto: chose {best}")
    return best, {"chosen": best, "synthetic": scores, "fit_images": len(fit), "held_out": len(held),
                  "kinds": list(KINDS), "seed": seed}
