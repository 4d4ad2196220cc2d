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

import torch

from padim import Padim
from padim.datasets import load_split, read_image, read_mask
from padim.datasets.images import to_tensor
from padim.metrics import compute_metrics

BASE = dict(backbone="mobilenet_v2", image_size=256, d=100, sigma=4.0, pool=1, tap_resize="nearest",
            covariance="eps", top_k=1)

GRIDS = {
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


def run_row(split, config: dict, cache: dict) -> dict:
    params = {**BASE, **config}
    size = params["image_size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    train = _images([s.path for s in split.train], size, cache)
    test = _images([s.path for s in split.test], size, cache)
    model = Padim(**params)
    start = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    pred = model.predict(test)
    predict_s = time.perf_counter() - start
    masks = [read_mask(s.mask, size) for s in split.test]
    metrics = compute_metrics([s.label for s in split.test], pred.scores, [s.defects for s in split.test],
                              masks, list(pred.maps), model.threshold_)
    o = metrics["overall"]
    return {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()},
            "image_auroc": o["image_auroc"], "pixel_auroc": o["pixel_auroc"], "aupro": o["aupro"],
            "image_f1_max": o["image_f1_max"], "f1_at_threshold": metrics["at_threshold"]["f1"],
            "fit_s": round(fit_s, 1), "predict_s": round(predict_s, 1)}


def table(rows: list[dict]) -> str:
    head = "backbone | size | d | pool | taps | cov | score | sigma | img AUROC | pix AUROC | AUPRO | F1@thr | fit s"
    lines = [f"| {head} |", "|---" * 13 + "|"]
    for r in rows:
        c = r["config"]
        size = c["image_size"] if isinstance(c["image_size"], int) else "x".join(map(str, c["image_size"]))
        score = "max" if c["top_k"] == 1 else f"top{c['top_k']}"
        lines.append(f"| {c['backbone']} | {size} | {c['d']} | {c['pool']} | {c['tap_resize']} | {c['covariance']} "
                     f"| {score} | {c['sigma']:g} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} "
                     f"| {r['f1_at_threshold']:.3f} | {r['fit_s']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_root", type=Path)
    parser.add_argument("--category", default="fryum")
    parser.add_argument("--grid", choices=sorted(GRIDS), nargs="+", default=["core"])
    parser.add_argument("--config", type=json.loads, action="append", default=[],
                        help="extra row as JSON, e.g. '{\"pool\": 3, \"image_size\": 320}'")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy.jsonl"))
    args = parser.parse_args()
    split = load_split(args.data_root, args.category)
    configs = [c for g in args.grid for c in GRIDS[g]] + args.config
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows, cache = [], {}
    for config in configs:
        row = run_row(split, config, cache)
        rows.append(row)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))
    print(f"best image AUROC {max(r['image_auroc'] for r in rows):.3f}; rows appended to {args.out}")


if __name__ == "__main__":
    main()
