"""Peak memory of ``padim evaluate`` against the size of the test set: a category's test images,
repeated through symbolic links, as the test split of a temporary VisA-layout data set.

    python benchmarks/eval_memory.py MODEL [--data ../shared/data/visa] [--category fryum]
        [--counts 500,5000] [--tmp /tmp] [--out benchmarks/results/eval-memory.json] [-- evaluate options]

For each count N it links the training images and N test images (the split's test images over and
over, with their masks and defect types) into ``TMP/padim-evalmem-N/`` (VisA layout: the split's
csv and image_anno.csv), runs ``padim evaluate`` there in a child process under
``/usr/bin/time -v`` and prints its peak RSS (``Maximum resident set size``), wall seconds and
overall metrics; the ratio of the largest count's peak to the smallest's comes last. Nothing is
copied: the data set holds links only, and it and the run folder are removed afterwards.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SCRIPT = Path(sys.executable).parent / "padim"
PADIM = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "padim.cli"]


def repeated_dataset(data: Path, category: str, n_test: int, dest: Path) -> Path:
    """A VisA-layout data set at ``dest`` (removed first): the category's training images and
    ``n_test`` test images, the split's test images cycled, all as symbolic links. Returns its root."""
    from padim.datasets import load_split

    split = load_split(data, category, "1cls", "auto")
    if dest.exists():
        shutil.rmtree(dest)
    images, masks = dest / category / "Data" / "Images", dest / category / "Data" / "Masks" / "Anomaly"
    for folder in (images / "Normal", images / "Anomaly", masks, dest / "split_csv"):
        folder.mkdir(parents=True)
    split_rows, anno_rows = [], []

    def link(sample, name: str, kind: str) -> None:
        sub = "Anomaly" if sample.label else "Normal"
        image = images / sub / f"{name}{sample.path.suffix}"
        image.symlink_to(sample.path.resolve())
        rel = image.relative_to(dest).as_posix()
        mask_rel = ""
        if sample.mask is not None:
            mask = masks / f"{name}{sample.mask.suffix}"
            mask.symlink_to(sample.mask.resolve())
            mask_rel = mask.relative_to(dest).as_posix()
        split_rows.append([category, kind, "anomaly" if sample.label else "normal", rel, mask_rel])
        anno_rows.append([rel, ",".join(sample.defects) if sample.label else "normal", mask_rel])

    for i, sample in enumerate(split.train):
        link(sample, f"train_{i:05d}", "train")
    for j in range(n_test):
        link(split.test[j % len(split.test)], f"test_{j:05d}", "test")
    with (dest / "split_csv" / "1cls.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["object", "split", "label", "image", "mask"], *split_rows])
    with (dest / category / "image_anno.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["image", "label", "mask"], *anno_rows])
    return dest


def evaluate(model: Path, root: Path, category: str, out: Path, extra: list[str]) -> dict:
    """One ``padim evaluate`` under ``/usr/bin/time -v``: peak RSS, wall seconds, overall metrics."""
    command = ["/usr/bin/time", "-v", *PADIM, "evaluate", str(root), "--category", category, "--model", str(model),
               "--out", str(out), "--no-progress", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    overall = json.loads((out / "metrics.json").read_text())["overall"]
    return {"peak_rss_mib": round(peak_kb / 1024), "wall_s": round(wall, 1),
            **{k: overall[k] for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_f1_max")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a fitted model file (or its folder)")
    parser.add_argument("--data", type=Path, default=SHARED / "visa", help="the data set whose test images repeat")
    parser.add_argument("--category", default="fryum")
    parser.add_argument("--counts", default="500,5000", help="comma-separated numbers of test images")
    parser.add_argument("--tmp", type=Path, default=Path("/tmp"), help="where the linked data sets and runs go")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args, extra = parser.parse_known_args()  # the rest (after --): options of padim evaluate
    args.extra = [a for a in extra if a != "--"]
    results = {}
    for n in [int(c) for c in args.counts.split(",")]:
        root = repeated_dataset(args.data, args.category, n, args.tmp / f"padim-evalmem-{n}")
        out = args.tmp / f"padim-evalmem-{n}-run"
        try:
            results[n] = r = evaluate(args.model, root, args.category, out, args.extra)
        finally:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
        print(f"{n:6d} test images: peak RSS {r['peak_rss_mib']:6d} MiB, {r['wall_s']:7.1f} s, "
              f"pixel AUROC {r['pixel_auroc']:.4f}, AUPRO {r['aupro']:.4f}", flush=True)
    counts = sorted(results)
    ratio = results[counts[-1]]["peak_rss_mib"] / results[counts[0]]["peak_rss_mib"]
    print(f"peak RSS at {counts[-1]} over at {counts[0]}: {ratio:.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"model": str(args.model), "data": str(args.data), "category": args.category,
                                        "extra": args.extra, "runs": results, "peak_ratio": round(ratio, 3)},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
