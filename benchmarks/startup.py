"""Start-up times of the command line, as a user meets them: each a median of fresh processes.

    python benchmarks/startup.py --model runs/fryum/model.safetensors --image IMAGE [--runs 5]

prints (and with --out writes as JSON) the median wall seconds of:
- ``padim --help`` and ``padim fit --help``;
- a usage error (``padim fit`` without arguments: exit 2);
- ``padim predict --model M IMAGE`` cold: load the model, score one image, write its heat map
  (and the same with an exported ``--onnx`` model, which runs without torch);
- ``padim serve --model M`` until ``/health`` answers (with --serve);
- ``python -c "import torch"``, the floor of every command that runs the model.

The cases run round-robin, one process of each per round, so that the machine's drift in speed
touches them all alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# the console script users run, beside this interpreter
SCRIPT = Path(sys.executable).parent / "padim"
PADIM = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "padim.cli"]


def run(args: list[str], expect: int = 0) -> float:
    """Wall seconds of one fresh process; fails on another exit status."""
    start = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != expect:
        raise SystemExit(f"{' '.join(args)}: exit {result.returncode}\n{result.stderr[-2000:]}")
    return seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_until_healthy(model: Path, timeout: float = 120.0) -> float:
    """Wall seconds from starting ``padim serve`` to the first answer of ``/health``."""
    port = free_port()
    start = time.perf_counter()
    server = subprocess.Popen([*PADIM, "serve", "--model", str(model), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < timeout:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
                    if answer.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.02)
        raise SystemExit(f"padim serve did not answer /health within {timeout:.0f} s")
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model for predict (and serve)")
    parser.add_argument("--image", type=Path, help="one image for predict")
    parser.add_argument("--onnx", type=Path, help="the model exported by padim export, for predict")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--serve", action="store_true", help="also time padim serve until /health answers")
    parser.add_argument("--out", type=Path, help="write the medians as JSON")
    args = parser.parse_args()

    cases = {
        "padim --help": lambda: run([*PADIM, "--help"]),
        "padim fit --help": lambda: run([*PADIM, "fit", "--help"]),
        "usage error (exit 2)": lambda: run([*PADIM, "fit"], expect=2),
    }
    if args.model and args.image:
        out = Path(tempfile.mkdtemp(prefix="padim-startup-"))
        cases["predict one image, cold"] = lambda: run([*PADIM, "predict", "--model", str(args.model),
                                                         str(args.image), "--out", str(out), "--no-progress"])
        if args.onnx:
            cases["predict one image, cold, ONNX"] = lambda: run([*PADIM, "predict", "--model", str(args.onnx),
                                                                   str(args.image), "--out", str(out), "--no-progress"])
    if args.serve and args.model:
        cases["serve until /health"] = lambda: serve_until_healthy(args.model)
    cases["import torch alone"] = lambda: run([sys.executable, "-c", "import torch"])
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, case in cases.items():
            times[name].append(case())
    results = {}
    for name, t in times.items():
        results[name] = {"median_s": round(statistics.median(t), 3), "runs": [round(x, 3) for x in t]}
        print(f"{name:28s} median {statistics.median(t):6.2f} s   (runs: {', '.join(f'{x:.2f}' for x in t)})")
    if args.out:
        args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                        "model": str(args.model) if args.model else None,
                                        "model_bytes": args.model.stat().st_size if args.model else None,
                                        "onnx_bytes": args.onnx.stat().st_size if args.onnx else None,
                                        "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
