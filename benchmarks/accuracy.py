"""Accuracy sweep: fit + evaluate PaDiM variants on one VisA category and write one table.

Every row runs the product code (``padim.Padim`` fit/predict and ``padim.metrics``) on the
official split; only the decoded, resized images are cached between rows of the same input size.
Nothing is selected on test labels here: the table is for choosing defaults by reasons.

    .venv/bin/python benchmarks/accuracy.py ../shared/data/visa --category fryum --grid core \
        --out benchmarks/results/accuracy-fryum.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from padim import Padim
from padim.datasets import load_split, read_image, read_mask
from padim.datasets.images import to_tensor
from padim.metrics import aupro, auroc, confusion, f1_max
from padim.model.scorer import AnomalyMaps, GaussianBlur, image_scores

BASE = dict(backbone="mobilenet_v2", image_size=256, d=100, sigma=4.0, pool=1, tap_resize="nearest",
            covariance="eps", top_k=1, scales=(1.0,))

GRIDS = {
    "next": [
        {"pool": 3, "tap_resize": "bilinear"},
        {"pool": 3, "image_size": (384, 576), "tap_resize": "bilinear", "sigma": 6.0},
        {"image_size": (384, 576), "tap_resize": "bilinear", "sigma": 6.0},
        {"image_size": (256, 384), "tap_resize": "bilinear"},
        {"pool": 3, "image_size": (256, 384), "tap_resize": "bilinear"},
        {"backbone": "mobilenet_v2+efficientnet_lite0", "pool": 3, "tap_resize": "bilinear"},
        {"pool": 3, "tap_resize": "bilinear", "covariance": "oas"},
        {"pool": 3, "tap_resize": "bilinear", "top_k": 100},
        {"backbone": "efficientnet_lite0"},
    ],
    "focus": [
        {"pool": 3, "image_size": (320, 480), "tap_resize": "bilinear", "sigma": 5.0},
        {"image_size": (320, 480), "tap_resize": "bilinear", "sigma": 5.0},
        {"pool": 3, "image_size": (384, 576), "tap_resize": "bilinear", "sigma": 6.0},
        {"pool": 3, "image_size": (320, 480), "tap_resize": "bilinear", "sigma": 5.0, "d": 152},
    ],
    "pyramid": [
        {"pool": 3, "image_size": (320, 480), "tap_resize": "bilinear", "sigma": 5.0, "d": 152,
         "scales": (1.0, 0.7)},
        {"pool": 3, "image_size": (320, 480), "tap_resize": "bilinear", "sigma": 5.0, "d": 152,
         "scales": (1.0, 0.5)},
        {"pool": 3, "image_size": (224, 336), "tap_resize": "bilinear", "sigma": 3.5, "d": 152},
    ],
    "deep": [
        {"backbone": "mobilenet_v2_deep", "pool": 3, "image_size": (320, 480), "tap_resize": "bilinear", "sigma": 5.0},
        {"backbone": "mobilenet_v2_deep", "image_size": (320, 480), "tap_resize": "bilinear", "sigma": 5.0},
    ],
    "core": [
        {},
        {"pool": 3},
        {"pool": 3, "tap_resize": "bilinear"},
        {"pool": 3, "covariance": "oas"},
        {"pool": 3, "top_k": 100},
        {"pool": 3, "d": 152},
        {"backbone": "efficientnet_lite0"},
        {"backbone": "efficientnet_lite0", "pool": 3},
    ],
    "size": [
        {"pool": 3, "image_size": 384, "sigma": 6.0},
        {"pool": 3, "image_size": 512, "sigma": 8.0},
        {"pool": 3, "image_size": 512, "sigma": 4.0},
        {"pool": 3, "image_size": (256, 384), "sigma": 4.0},
        {"pool": 3, "image_size": (320, 480), "sigma": 5.0},
        {"pool": 3, "image_size": (384, 576), "sigma": 6.0},
    ],
}


def _images(paths: list[Path], size: tuple[int, int], cache: dict) -> torch.Tensor:
    key = (tuple(paths), size)
    if key not in cache:
        cache.clear()  # one input size at a time keeps memory flat
        cache[key] = torch.stack([to_tensor(read_image(p, size)) for p in paths])
    return cache[key]


def _row(params: dict, labels, scores, masks, maps, threshold_f1, fit_s, predict_s) -> dict:
    return {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()},
            "image_auroc": auroc(labels, scores), "pixel_auroc": auroc(masks, maps),
            "aupro": aupro(masks, maps), "image_f1_max": f1_max(labels, scores)[0],
            "f1_at_threshold": threshold_f1, "fit_s": fit_s, "predict_s": predict_s}


def run_rows(split, config: dict, cache: dict, sigmas: list[float], top_ks: list[int]) -> list[dict]:
    """Fit once; score with each blur sigma and image-score top-k.

    The scorer blurs the upsampled distance map, so the map for sigma s is exactly the unblurred
    map blurred with s: one prediction serves every sigma. The stored threshold belongs to the
    configured sigma and top-k only, so F1 at the threshold is reported for that row alone.
    """
    params = {**BASE, **config}
    size = params["image_size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    train = _images([s.path for s in split.train], size, cache)
    test = _images([s.path for s in split.test], size, cache)
    model = Padim(**params)
    start = time.perf_counter()
    model.fit(train)
    fit_s = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    pred = model.predict(test)
    predict_s = round(time.perf_counter() - start, 1)
    labels = np.array([s.label for s in split.test])
    masks = np.stack([read_mask(s.mask, size) for s in split.test])
    rows = []
    own = confusion(labels, model.labels(pred.scores))["f1"]
    rows.append(_row(params, labels, pred.scores, masks, pred.maps, own, fit_s, predict_s))
    extra_sigmas = [x for x in sigmas if x != params["sigma"]]
    extra_ks = [k for k in top_ks if k != params["top_k"]]
    if not extra_sigmas and not extra_ks:
        return rows
    model.scorer_.maps = AnomalyMaps(model.scorer_.maps.grids, model.image_size_, 0.0, model.params_.top_k)  # unblurred
    raw = model.predict(test).maps
    for sigma in [params["sigma"], *extra_sigmas]:
        with torch.inference_mode():
            maps = GaussianBlur(sigma)(torch.from_numpy(raw)[:, None])[:, 0] if sigma > 0 else torch.from_numpy(raw)
        for k in [params["top_k"], *extra_ks]:
            if sigma == params["sigma"] and k == params["top_k"]:
                continue
            scores = image_scores(maps, k).numpy()
            rows.append(_row({**params, "sigma": sigma, "top_k": k}, labels, scores, masks, maps.numpy(),
                             None, fit_s, predict_s))
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(rows: list[dict]) -> str:
    head = ("backbone | size | scales | d | pool | taps | cov | eps | score | sigma | img AUROC | pix AUROC | AUPRO "
            "| F1@thr")
    lines = [f"| {head} |", "|---" * 14 + "|"]
    for r in rows:
        c = r["config"]
        size = c["image_size"] if isinstance(c["image_size"], int) else "x".join(map(str, c["image_size"]))
        score = "max" if c["top_k"] == 1 else f"top{c['top_k']}"
        scales = ",".join(f"{x:g}" for x in c.get("scales", [1.0]))
        lines.append(f"| {c['backbone']} | {size} | {scales} | {c['d']} | {c['pool']} | {c['tap_resize']} "
                     f"| {c['covariance']} "
                     f"| {c.get('eps', 0.01):g} | {score} | {c['sigma']:g} | {r['image_auroc']:.3f} "
                     f"| {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {_fmt(r['f1_at_threshold'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_root", type=Path)
    parser.add_argument("--category", default="fryum")
    parser.add_argument("--grid", choices=sorted(GRIDS), nargs="+", default=["core"])
    parser.add_argument("--skip", type=int, default=0, help="skip the first N rows of the grid (already run)")
    parser.add_argument("--config", type=json.loads, action="append", default=[],
                        help="extra row as JSON, e.g. '{\"pool\": 3, \"image_size\": 320}'")
    parser.add_argument("--sigmas", type=float, nargs="*", default=[],
                        help="also score each fitted model with these blur sigmas")
    parser.add_argument("--top-ks", type=int, nargs="*", default=[],
                        help="also score each fitted model with these image-score top-k")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy.jsonl"))
    parser.add_argument("--table-only", action="store_true", help="print the table of the rows in --out and stop")
    args = parser.parse_args()
    if args.table_only:
        rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
        unique = {json.dumps(r["config"], sort_keys=True): r for r in rows}  # a re-run row replaces its twin
        print(table(list(unique.values())))
        return
    split = load_split(args.data_root, args.category)
    configs = ([c for g in args.grid for c in GRIDS[g]] + args.config)[args.skip:]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows, cache = [], {}
    for config in configs:
        for row in run_rows(split, config, cache, args.sigmas, args.top_ks):
            rows.append(row)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))
    print(f"best image AUROC {max(r['image_auroc'] for r in rows):.3f}; rows appended to {args.out}")


if __name__ == "__main__":
    main()
