"""Where a whole ``padim run`` spends its time: the stage breakdown on each shared data set.

    python benchmarks/stages.py [--out benchmarks/results/stages.json] [-- extra padim run options]

runs ``padim run`` with the defaults (or the options after ``--``) in a fresh process per data set:
VisA fryum (../shared/data/visa), KolektorSDD (../shared/data/kolektorsdd) and BSData
(../shared/data/bsdata). Prints the seconds of each stage (from metrics.json's ``timings``), the
process's wall time and peak RSS, the metrics, the threshold's promise and what it does on the test
set, and the ratio of the whole run to its fit + predict (the 'fit' stage: the backbone over the
training images, their statistics and the model's one factorization; 'predict': the test images;
the threshold's 'calibrate' stage, the out-of-fold scores, counts as overhead, as save, metrics,
figures, the report and the process's start and exit do).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {"fryum": (SHARED / "visa", "fryum"), "kolektor": (SHARED / "kolektorsdd", "kolektor"),
            "bsdata": (SHARED / "bsdata", "ball_screw")}
SCRIPT = Path(sys.executable).parent / "padim"
PADIM = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "padim.cli"]


def run(root: Path, category: str, out: Path, extra: list[str]) -> dict:
    """One ``padim run`` in a child process: its timings, wall seconds, peak RSS and metrics."""
    start = time.perf_counter()
    child = subprocess.Popen([*PADIM, "run", str(root), "--category", category, "--out", str(out), "--no-progress",
                              *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)  # the rusage of this child alone
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"padim run {root} --category {category}: exit {child.returncode}\n{output[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    overall = metrics["overall"]
    timings = metrics["timings"]
    core = timings["fit"] + timings["predict"]
    return {"timings": timings, "wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "fit_plus_predict_s": round(core, 2), "whole_over_fit_plus_predict": round(wall / core, 2),
            "model_mb": round((out / "model.safetensors").stat().st_size / 1e6, 1),
            "image_auroc": overall["image_auroc"], "pixel_auroc": overall["pixel_auroc"], "aupro": overall["aupro"],
            "image_f1_max": overall["image_f1_max"], "operating_point": metrics["model"].get("operating_point"),
            "at_threshold": metrics.get("at_threshold"), "recall_at_fpr": overall.get("recall_at_fpr")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--datasets", default="fryum,kolektor,bsdata", help="comma-separated: fryum, kolektor, bsdata")
    parser.add_argument("extra", nargs="*", help="options passed to padim run (after --)")
    args = parser.parse_args()
    results = {}
    for name in args.datasets.split(","):
        root, category = DATASETS[name]
        with tempfile.TemporaryDirectory(prefix=f"stages-{name}-") as tmp:
            r = results[name] = run(root, category, Path(tmp) / "run", args.extra)
        stages = "  ".join(f"{k} {v:.1f}" for k, v in r["timings"].items() if k != "total")
        print(f"{name}: {stages}  |  process {r['wall_s']:.1f} s = {r['whole_over_fit_plus_predict']:.2f}x "
              f"fit + predict ({r['fit_plus_predict_s']:.1f} s), peak RSS {r['peak_rss_mb']} MB, model "
              f"{r['model_mb']} MB; {r['image_auroc']:.3f} / {r['pixel_auroc']:.3f} / {r['aupro']:.3f}")
        point, t = r["operating_point"], r["at_threshold"]
        if point and t:
            print(f"  threshold {point['threshold']:.3f}: target {point['target_fpr']:.1%}, expected "
                  f"{point['expected_fpr']:.2%} ({point['fpr_interval'][0]:.2%}..{point['fpr_interval'][1]:.2%}) from "
                  f"{point['n']} scores; test false alarms {t['fp']}/{t['fp'] + t['tn']}, defects caught "
                  f"{t['tp']}/{t['tp'] + t['fn']}; recall at 1%/5% false alarms {r['recall_at_fpr']}")
    if args.out:
        args.out.write_text(json.dumps({"options": args.extra, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
