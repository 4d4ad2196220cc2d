"""A model that follows its line: update and merge against a fit on the union (VisA fryum), and a
drifting line's false alarms before and after ``padim calibrate`` / ``padim update`` (BSData).

    python benchmarks/line.py equality [--factor-dtype float32] [--out benchmarks/results/line-equality.json]
    python benchmarks/line.py drift [--out benchmarks/results/line-drift.json]

equality: fit on the first 250 training images of fryum's 1cls split, save, load, ``update`` with
the other 200; fit two halves and ``merge`` them; each against a fit on all 450: the largest
relative difference of the test images' distances (and maps), and the metrics of each.

drift: BSData ball_screw's test/good ordered by file name (time order), split into the earlier 60
and the later 61. The default model is fitted on train/good; then recalibrated with the earlier
half (``recalibrate``) and, separately, updated with it (``update``; also with ``--decay 0.5``).
For each: the threshold, false alarms on the later half, and the defects (test/pitting) caught.
Nothing here uses test labels to set anything: the earlier normals stand for the line's recent
normal images.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from padim import Padim
from padim.datasets import load_split
from padim.model.line import load_stats, merge, recalibrate, update
from padim.runs import DataArgs, evaluate_job

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def distances(model: Padim, paths) -> torch.Tensor:
    """(N, P) distances of images, batch by batch."""
    out = []
    with torch.inference_mode():
        scorer = model.scorer_
        for start in range(0, len(paths), 16):
            batch = torch.stack([torch.from_numpy(np.asarray(_read(p, scorer.image_size))).permute(2, 0, 1)
                                 for p in paths[start:start + 16]])
            out.append(scorer.whitening.distances(scorer.embedding(batch)))
    return torch.cat(out)


def _read(path, size):
    from padim.datasets import read_image

    return read_image(path, size)


def headline(metrics: dict) -> dict:
    o = metrics["overall"]
    return {k: round(o[k], 4) for k in ("image_auroc", "pixel_auroc", "aupro")}


def equality(work: Path, factor_dtype: str = "float16") -> dict:
    data = DataArgs(SHARED / "visa", "fryum")
    split = data.load()
    train = [s.path for s in split.train]
    test = [s.path for s in split.test]
    start = time.perf_counter()
    joint = Padim(factor_dtype=factor_dtype).fit(train)
    seconds = {"fit_450": time.perf_counter() - start}
    reference = distances(joint, test)
    out = {"n_train": len(train), "n_test": len(test), "factor_dtype": factor_dtype}

    start = time.perf_counter()
    first = Padim(factor_dtype=factor_dtype).fit(train[:250])
    path = first.save(work / "first.safetensors")
    seconds["fit_250"] = time.perf_counter() - start
    del first
    updated = Padim.load(path)
    start = time.perf_counter()
    update(updated, load_stats(updated, path), train[250:])
    seconds["update_200"] = time.perf_counter() - start

    a, b = Padim(factor_dtype=factor_dtype).fit(train[:225]), Padim(factor_dtype=factor_dtype).fit(train[225:])
    start = time.perf_counter()
    merged = merge([a, b], [a.stats_, b.stats_])
    seconds["merge"] = time.perf_counter() - start
    for name, model in (("update", updated), ("merge", merged)):
        got = distances(model, test)
        out[name] = {"max_rel_distance_diff": float((got - reference).abs().max() / reference.abs().max()),
                     "median_rel_distance_diff": float(((got - reference).abs() / reference).median())}
    for name, model in (("joint", joint), ("update", updated), ("merge", merged)):
        metrics = evaluate_job(model, data, split, work / name, figures=False, progress=False)
        out.setdefault(name, {})["metrics"] = headline(metrics)
    out["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    return out


def flagged(model: Padim, paths) -> int:
    return int((model.predict(paths).scores > model.threshold_).sum())


def drift(work: Path) -> dict:
    root = SHARED / "bsdata" / "ball_screw"
    good = sorted((root / "test" / "good").iterdir())
    early, late = good[:60], good[60:]
    defects = sorted((root / "test" / "pitting").iterdir())
    split = load_split(SHARED / "bsdata", "ball_screw")
    model = Padim(image_size=_size(split)).fit([s.path for s in split.train])
    path = model.save(work / "model.safetensors")
    rows = {}

    def row(name, m):
        point = m.info_["calibration"]
        rows[name] = {"threshold": round(m.threshold_, 3), "calibrated_on": f"{point['n']} {point['method']}",
                      "expected_fpr": round(point["expected_fpr"], 4),
                      "fpr_interval": [round(x, 4) for x in point["fpr_interval"]],
                      "late_false_alarms": f"{flagged(m, late)}/{len(late)}",
                      "early_false_alarms": f"{flagged(m, early)}/{len(early)}",
                      "defects_caught": f"{flagged(m, defects)}/{len(defects)}"}
        print(name, rows[name], flush=True)

    row("fitted", model)
    row("calibrated", recalibrate(Padim.load(path), early))
    for decay in (1.0, 0.5):
        m = Padim.load(path)
        row(f"updated (decay {decay:g})", update(m, load_stats(m, path), early, decay))
    return {"early": len(early), "late": len(late), "defects": len(defects), "rows": rows}


def _size(split) -> tuple[int, int]:
    from padim.datasets.images import keep_aspect

    return keep_aspect(320, split.train[0].path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["equality", "drift"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--factor-dtype", default="float16", help="equality: the models' factor precision")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = equality(Path(tmp), args.factor_dtype) if args.part == "equality" else drift(Path(tmp))
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
