"""One benchmark summary (summary.csv/.md/.json, index.html) of complete ``padim benchmark`` run
folders that were made by separate commands (e.g. one data set or one configuration at a time,
into different output folders). Each folder's marker records the command that made it.

    python benchmarks/collect_summary.py --out DIR CONFIG=RUN_DIR [CONFIG=RUN_DIR ...]

RUN_DIR is a category's run folder, ``<out>/[<config>/]<data set>/<category>``; links in the page
are relative to DIR only where the run folders lie under it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from padim.benchmark import MARKER, Job, completed, result_row, write_summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("runs", nargs="+", metavar="CONFIG=RUN_DIR")
    args = ap.parse_args(argv)
    rows, options = [], {}
    for item in args.runs:
        config, _, folder = item.partition("=")
        run_dir = Path(folder)
        marker = json.loads((run_dir / MARKER).read_text())
        command = marker["command"]
        if completed(run_dir, command) is None:
            print(f"{run_dir}: not a complete run folder", file=sys.stderr)
            return 3
        job = Job(run_dir.parent.name, Path(command[1]), run_dir.name, command[command.index("--layout") + 1],
                  config=config)
        row = result_row(job, run_dir, marker, "ok")
        try:
            rel = run_dir.resolve().relative_to(args.out.resolve()).as_posix()
        except ValueError:
            rel = run_dir.resolve().as_posix()
        row.update(report=f"{rel}/report.html", log=f"{rel}/run.log")
        rows.append(row)
        options.setdefault(config, command[command.index("--out") + 2:])
    args.out.mkdir(parents=True, exist_ok=True)
    for path in write_summary(args.out, rows, options):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
