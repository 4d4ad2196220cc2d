"""``padim benchmark``: fit and evaluate every category under one or more data roots, one
``padim run`` child process per category, and summarize them (summary.csv/.md/.json, index.html).

Each category runs in its own process so that its peak RSS is its own and a crash or an
out-of-memory kill in one category cannot take the others down. A category's run folder gets a
small marker (``benchmark.json``) written atomically after the run succeeded; a later benchmark with
the same options skips the categories whose run folder is complete. With named configurations
(``--configs``, :data:`padim.params.CONFIGS`) every category runs under each, into
``OUT/<config>/<data set>/<category>/``, and the summary has a row per configuration and category.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from . import __version__
from .atomic import csv_text, write_text
from .datasets import detect_layout
from .errors import DatasetError
from .params import MODEL_FILE

MARKER = "benchmark.json"
LOG_FILE = "run.log"
REPORT_FILE = "report.html"
METRICS_FILE = "metrics.json"
SUMMARY_FILES = ("summary.csv", "summary.md", "summary.json", "index.html")
METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")
SECONDS = ("fit_s", "predict_s", "total_s", "wall_s")
CSV_COLUMNS = ("config", "dataset", "category", "status", "n_train", "n_test", *METRICS, *SECONDS, "peak_rss_mib",
               "report", "error")
# (heading, row key, digits) of the tables in summary.md and index.html
TABLE = (("config", "config", None), ("data set", "dataset", None), ("category", "category", None),
         ("train", "n_train", 0), ("test", "n_test", 0), ("image AUROC", "image_auroc", 3),
         ("pixel AUROC", "pixel_auroc", 3), ("AUPRO", "aupro", 3), ("F1-max", "image_f1_max", 3), ("fit s", "fit_s", 1),
         ("predict s", "predict_s", 1), ("total s", "total_s", 1), ("peak RSS MiB", "peak_rss_mib", 0),
         ("status", "status", None))


@dataclass(frozen=True)
class Job:
    """One category to benchmark: the data set's name (its root folder's), root, category, layout,
    and the named configuration it runs under; ``folder`` is that configuration's subfolder of the
    output ('' when the benchmark runs one unnamed configuration)."""

    dataset: str
    root: Path
    category: str
    layout: str
    config: str = "default"
    folder: str = ""

    @property
    def path(self) -> str:
        """The run folder relative to the output folder, '/'-separated."""
        return "/".join(p for p in (self.folder, self.dataset, self.category) if p)

    @property
    def name(self) -> str:
        return self.path

    def run_dir(self, out: Path) -> Path:
        return Path(out) / self.path


def visa_categories(root: Path) -> list[str] | None:
    """The categories ``root/split_csv/1cls.csv`` lists whose folder exists (None: no split file)."""
    source = root / "split_csv" / "1cls.csv"
    if not source.is_file():
        return None
    try:
        with source.open(newline="", encoding="utf-8-sig") as f:
            listed = {row.get("object") or "" for row in csv.DictReader(f)}
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{source}: not a readable CSV file ({exc})") from exc
    return sorted(c for c in listed if c and (root / c).is_dir())


def discover(roots: Sequence[Path], categories: Iterable[str] | None = None) -> list[Job]:
    """The categories under each root: for VisA (``split_csv/1cls.csv`` present) those its split
    lists that exist, else every subfolder in a layout :func:`detect_layout` recognizes.

    ``categories`` keeps only those names; a name found under no root is an error.
    """
    jobs: list[Job] = []
    names: set[str] = set()
    for root in map(Path, roots):
        if not root.is_dir():
            raise DatasetError(f"{root}: no such folder")
        # the data set is named after its folder; a second root of the same name gets a suffix
        base = root.resolve().name or "data"
        dataset, k = base, 1
        while dataset in names:
            k += 1
            dataset = f"{base}-{k}"
        names.add(dataset)
        found = []
        listed = visa_categories(root)
        if listed is not None:
            found = [Job(dataset, root, c, "visa") for c in listed]
        else:
            for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
                try:
                    found.append(Job(dataset, root, folder.name, detect_layout(root, folder.name)))
                except DatasetError:
                    continue  # not a category (notes, licences, other files)
        if not found:
            raise DatasetError(f"{root}: no category found; expected VisA (split_csv/1cls.csv and its category "
                               "folders) or category folders with train/good and test/")
        jobs += found
    if categories is not None:
        wanted = [c for c in dict.fromkeys(categories) if c]
        missing = [c for c in wanted if c not in {j.category for j in jobs}]
        if missing:
            raise DatasetError(f"--categories: {', '.join(missing)} not found under "
                               f"{', '.join(map(str, roots))}")
        jobs = [j for j in jobs if j.category in wanted]
    return jobs


def run_command(job: Job, out: Path, args: Sequence[str]) -> list[str]:
    """The ``padim run`` arguments of ``job`` (without the interpreter): what the marker records.
    Absolute paths, so that a rerun from another folder finds the same command."""
    return ["run", str(job.root.absolute()), "--category", job.category, "--layout", job.layout, "--out",
            str(job.run_dir(out).absolute()), *args]


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def completed(run_dir: Path, command: Sequence[str]) -> dict | None:
    """The marker of a complete run folder made by ``command``, else None.

    Complete: the model, metrics.json (parseable, with metrics and timings), report.html and the
    marker, which records the command: a run with other options is not reused.
    """
    if not ((run_dir / MODEL_FILE).is_file() and (run_dir / REPORT_FILE).is_file()):
        return None
    metrics = _read_json(run_dir / METRICS_FILE)
    marker = _read_json(run_dir / MARKER)
    if metrics is None or marker is None or "overall" not in metrics or "timings" not in metrics:
        return None
    return marker if marker.get("command") == list(command) else None


def _row(job: Job, status: str, **values) -> dict:
    row = {"config": job.config, "dataset": job.dataset, "category": job.category, "status": status, "n_train": None,
           "n_test": None, **dict.fromkeys(METRICS), **dict.fromkeys(SECONDS), "peak_rss_mib": None, "report": "",
           "log": f"{job.path}/{LOG_FILE}", "error": "", "exit_code": 0}
    row.update(values)
    return row


def result_row(job: Job, run_dir: Path, marker: dict, status: str) -> dict:
    """A category's summary row from its run folder's metrics.json and marker."""
    metrics = _read_json(run_dir / METRICS_FILE) or {}
    overall, timings = metrics.get("overall", {}), metrics.get("timings", {})
    return _row(job, status, n_train=metrics.get("model", {}).get("n_train"),
                n_test=metrics.get("dataset", {}).get("n_test"), **{m: overall.get(m) for m in METRICS},
                # fit = the statistics, the factor and the out-of-fold threshold, as 'padim fit' says
                fit_s=round(timings.get("fit", 0.0) + timings.get("calibrate", 0.0), 3),
                predict_s=timings.get("predict"), total_s=timings.get("total"), wall_s=marker.get("wall_s"),
                peak_rss_mib=marker.get("peak_rss_mib"), report=f"{job.path}/{REPORT_FILE}")


def _failure(log: Path, code: int) -> str:
    """What went wrong in a child: its 'error:' line, else how it ended and its last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    errors = [ln for ln in lines if ln.startswith("error:")]
    if errors:
        return errors[-1].removeprefix("error:").strip()
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        why = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{why}"
    last = lines[-1] if len(lines) > 1 else ""
    return f"exit code {code}" + (f": {last}" if last else "")


def run_category(job: Job, out: Path, args: Sequence[str]) -> dict:
    """Run ``padim run`` for ``job`` in a child process into ``out/<dataset>/<category>/``; returns
    its summary row (status 'ok' or 'failed' with the error). Its output goes to ``run.log`` there.

    The child imports the same padim as this process; its peak RSS comes from ``wait4``.
    """
    run_dir = job.run_dir(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).unlink(missing_ok=True)  # the folder is incomplete until the run has succeeded
    command = run_command(job, out, args)
    src = str(Path(__file__).resolve().parents[1])
    # unbuffered: run.log shows how far a long (or killed) run got
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
           "PYTHONUNBUFFERED": "1"}
    log = run_dir / LOG_FILE
    start = time.perf_counter()
    with log.open("w") as f:
        f.write(f"$ padim {shlex.join(command)}\n")
        f.flush()
        child = subprocess.Popen([sys.executable, "-m", "padim.cli", *command], stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env)
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except BaseException:
            # interrupted: the child got the same Ctrl-C; give it a moment, then make sure it is gone
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            raise
        child.returncode = code = os.waitstatus_to_exitcode(status)
    marker = {"command": command, "wall_s": round(time.perf_counter() - start, 3),
              "peak_rss_mib": round(usage.ru_maxrss / 1024),  # ru_maxrss is in KiB on Linux
              "finished_at": datetime.now(UTC).isoformat(timespec="seconds"), "version": __version__}
    if code == 0 and _read_json(run_dir / METRICS_FILE) is not None and (run_dir / REPORT_FILE).is_file():
        write_text(run_dir / MARKER, json.dumps(marker, indent=2))
        return result_row(job, run_dir, marker, "ok")
    return _row(job, "failed", error=_failure(log, code) if code else "the run folder is incomplete",
                exit_code=code if code > 0 else 1, wall_s=marker["wall_s"], peak_rss_mib=marker["peak_rss_mib"])


def failed_row(job: Job, error: str, exit_code: int = 1) -> dict:
    """The row of a category that could not be run at all (e.g. its cluster task was lost)."""
    return _row(job, "failed", error=error, exit_code=exit_code)


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r["status"] != "failed" and r[key] is not None]
    return sum(values) / len(values) if values else None


def _config(row: dict) -> str:
    return row.get("config", "default")


def mean_rows(rows: list[dict]) -> list[dict]:
    """Per configuration, a mean row per data set and one over all its categories: the metrics,
    seconds and peak RSS averaged over the categories that succeeded (undefined values left out);
    status 'k/n ok'."""
    out = []
    for config in dict.fromkeys(map(_config, rows)):
        mine = [r for r in rows if _config(r) == config]
        groups = {r["dataset"]: [] for r in mine}
        for r in mine:
            groups[r["dataset"]].append(r)
        for dataset, group in [*groups.items(), ("all", mine)]:
            ok = sum(r["status"] != "failed" for r in group)
            out.append({"config": config, "dataset": dataset, "category": "mean", "status": f"{ok}/{len(group)} ok",
                        "n_train": None, "n_test": None,
                        **{k: _mean(group, k) for k in (*METRICS, *SECONDS, "peak_rss_mib")},
                        "report": "", "log": "", "error": "", "exit_code": 0})
    return out


def table_rows(rows: list[dict]) -> list[dict]:
    """The rows in table order: per configuration, each data set's categories followed by its mean,
    then the configuration's overall mean."""
    ordered = []
    for mean in mean_rows(rows):
        if mean["dataset"] != "all":
            ordered += [r for r in rows if _config(r) == mean["config"] and r["dataset"] == mean["dataset"]]
        ordered.append(mean)
    return ordered


def fmt(value, digits: int | None) -> str:
    """A table cell: n/a for an undefined number."""
    if digits is None:
        return str(value)
    return "n/a" if value is None else f"{value:.{digits}f}"


def cells_of(row: dict) -> list[str]:
    """A row's table cells; a mean row leaves the image counts empty."""
    mean = row["category"] == "mean"
    return ["" if mean and k in ("n_train", "n_test") else fmt(row[k], d) for _, k, d in TABLE]


def _csv_value(value):
    return "" if value is None else round(value, 4) if isinstance(value, float) else value


def summary_markdown(rows: list[dict]) -> str:
    """summary.md: one table row per category, the means, then the errors of failed categories."""
    lines = ["| " + " | ".join(h for h, _, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    for r in table_rows(rows):
        cells = cells_of(r)
        if r["category"] == "mean":
            cells = [f"**{c}**" if c and c != "n/a" else c for c in cells]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed:", ""] + [f"- {r['log'].removesuffix('/' + LOG_FILE)}: {r['error']} (see {r['log']})"
                                        for r in failed]
    return "\n".join(lines) + "\n"


def config_args(args: Sequence[str] | Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """The ``padim run`` options of each configuration: a plain list is the one 'default'."""
    if isinstance(args, Mapping):
        return {name: list(a) for name, a in args.items()}
    return {"default": list(args)}


def write_summary(out: Path, rows: list[dict], options: Sequence[str] | Mapping[str, Sequence[str]]) -> list[Path]:
    """Write summary.csv, summary.md, summary.json and index.html into ``out``; returns their paths.
    ``options``: the ``padim run`` options, or those of each named configuration."""
    out = Path(out)
    ordered = table_rows(rows)
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    write_text(out / "summary.csv", csv_text(CSV_COLUMNS, [[_csv_value(r[c]) for c in CSV_COLUMNS] for r in ordered]))
    write_text(out / "summary.md", summary_markdown(rows))
    configs = config_args(options)
    document = {"generated_at": generated, "version": __version__,
                "options": configs["default"] if not isinstance(options, Mapping) else None, "configs": configs,
                "categories": rows, "means": mean_rows(rows)}
    write_text(out / "summary.json", json.dumps(document, indent=2))
    write_text(out / "index.html", render_index(ordered, options, generated))
    return [out / name for name in SUMMARY_FILES]


def render_index(ordered: list[dict], options: Sequence[str] | Mapping[str, Sequence[str]], generated: str) -> str:
    """index.html: the summary table on one self-contained page, each category linking its report."""
    import jinja2  # only when a summary is written: the command line stays light

    env = jinja2.Environment(loader=jinja2.PackageLoader("padim.reports", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    cats = [r for r in ordered if r["category"] != "mean"]
    rows = [{"cells": cells_of(r), "mean": r["category"] == "mean", "report": r["report"],
             "log": r["log"], "failed": r["status"] == "failed", "error": r["error"]} for r in ordered]
    return env.get_template("benchmark.html.j2").render(
        headings=[h for h, _, _ in TABLE], numeric=[d is not None for _, _, d in TABLE], rows=rows,
        n=len(cats), n_failed=sum(r["status"] == "failed" for r in cats),
        datasets=list(dict.fromkeys(r["dataset"] for r in cats)), link=[k for _, k, _ in TABLE].index("category"),
        configs={name: shlex.join(a) for name, a in config_args(options).items()},
        nested=isinstance(options, Mapping),
        generated=generated.replace("T", " ").replace("+00:00", " UTC"), version=__version__)


def benchmark(roots: Sequence[Path], out: Path, args: Sequence[str] | Mapping[str, Sequence[str]],
              categories: Iterable[str] | None = None, dask_address: str | None = None, progress: bool = True,
              echo: Callable[[str], None] = print) -> list[dict]:
    """Run (or reuse) every category under ``roots`` with the ``padim run`` options ``args`` and
    write the summary files into ``out`` after each category; returns the category rows.

    ``args`` as a mapping {configuration name: options} runs every category under each, into
    ``out/<name>/``; a list runs them once, into ``out``."""
    from tqdm.auto import tqdm

    out = Path(out)
    found = discover(roots, categories)
    if isinstance(args, Mapping):
        options = {name: list(a) for name, a in args.items()}
        jobs = [replace(job, config=name, folder=name) for name in options for job in found]
    else:
        options, jobs = {"default": list(args)}, found
    args_of = {job: options[job.config] for job in jobs}
    rows: dict[Job, dict] = {}
    todo = []
    for job in jobs:
        marker = completed(job.run_dir(out), run_command(job, out, args_of[job]))
        if marker is None:
            todo.append(job)
        else:
            rows[job] = result_row(job, job.run_dir(out), marker, "reused")
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="categories", unit="cat", disable=not progress)
    say = bar.write if progress else echo
    if rows:
        say(f"reusing {len(rows)} complete run folder(s): {', '.join(j.name for j in rows)}")

    def finished(job: Job, row: dict) -> None:
        rows[job] = row
        bar.update(1)
        if row["status"] == "failed":
            say(f"{job.name}: failed: {row['error']} (see {out / row['log']})")
        else:
            say(f"{job.name}: image AUROC {fmt(row['image_auroc'], 3)}, pixel AUROC {fmt(row['pixel_auroc'], 3)}, "
                f"AUPRO {fmt(row['aupro'], 3)} in {fmt(row['wall_s'], 0)} s, peak RSS {row['peak_rss_mib']} MiB")
        # the summary is rewritten after every category: an interrupted benchmark still has one
        write_summary(out, [rows[j] for j in jobs if j in rows], args)

    try:
        if dask_address and todo:
            _run_on_cluster(todo, out, args_of, dask_address, finished, bar)
        else:
            for job in todo:
                bar.set_postfix_str(job.name)
                finished(job, run_category(job, out, args_of[job]))
    finally:
        bar.close()
    result = [rows[j] for j in jobs]
    write_summary(out, result, args)
    return result


def _run_on_cluster(jobs: list[Job], out: Path, args_of: Mapping[Job, Sequence[str]], address: str,
                    finished: Callable[[Job, dict], None], bar) -> None:
    """One task per category on the Dask cluster at ``address``; each runs :func:`run_category` on a
    worker (which must see the data and ``out`` at the same paths)."""
    from distributed import as_completed

    from .distributed import connect, prepare

    with connect(address) as client:
        prepare(client, probe=jobs[0].root)
        # pure=False: a rerun must run again; retries=0: a failure is recorded, not repeated
        futures = {client.submit(run_category, job, out, list(args_of[job]), pure=False, retries=0): job
                   for job in jobs}
        bar.set_postfix_str(f"{len(jobs)} task(s) on {address}")
        for future in as_completed(futures):
            job = futures[future]
            try:
                row = future.result()
            except Exception as exc:  # noqa: BLE001 - a lost task is one failed category, not the end
                row = failed_row(job, f"cluster task failed: {type(exc).__name__}: {exc}")
            finished(job, row)
