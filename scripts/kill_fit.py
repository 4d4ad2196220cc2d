"""kill -9 experiment: run `padim fit` on a synthetic data set and SIGKILL it after spread-out
delays, then check the output folder: the model is the previous one (same bytes) or the new one,
complete; never partial. Prints one line per kill and a summary.

    .venv/bin/python scripts/kill_fit.py [--kills 12] [--train 40] [--size 128] [--d 100]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_folder_dataset  # noqa: E402
from padim import Padim  # noqa: E402
from padim.datasets import load_split  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--train", type=int, default=40)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--d", type=int, default=100)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="padim-kill-"))
    root = make_folder_dataset(work / "data", np.random.default_rng(0), n_train=args.train, size=args.size)
    previous = work / "previous.safetensors"
    train = [s.path for s in load_split(root, "widget").train]
    Padim(image_size=args.size, d=args.d).fit(train).save(previous)
    old = previous.read_bytes()
    fit = [sys.executable, "-m", "padim.cli", "fit", str(root), "--category", "widget", "--image-size",
           str(args.size), "--d", str(args.d), "--seed", "1", "--no-progress", "--workers", "0"]

    start = time.monotonic()
    subprocess.run([*fit, "--out", str(work / "full")], check=True, capture_output=True)
    full = time.monotonic() - start
    print(f"model {len(old) / 1e6:.1f} MB; unkilled fit took {full:.1f} s")
    # spread over the run, denser at the end where the model is written
    delays = sorted({round(full * f, 2) for f in np.r_[np.linspace(0.1, 0.85, args.kills // 2),
                                                         np.linspace(0.88, 1.0, args.kills - args.kills // 2)]})
    outcomes: dict[str, int] = {}
    for i, delay in enumerate(delays):
        out = work / f"kill{i}"
        out.mkdir()
        shutil.copy(previous, out / "model.safetensors")
        child = subprocess.Popen([*fit, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        code = child.wait()
        model = out / "model.safetensors"
        visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        temps = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
        data = model.read_bytes() if model.exists() else b""
        try:
            Padim.load(model)
            loads = True
        except Exception:  # noqa: BLE001 - any failure to load is what this experiment looks for
            loads = False
        if code != -signal.SIGKILL:
            state = "finished before the kill"
        elif visible != ["model.safetensors"] or not loads:
            state = "BROKEN"
        elif data == old:
            state = "previous model intact" + (", temp left" if temps else "")
        else:
            state = "new model complete"
        if temps:
            Padim.load(previous).save(model)  # the next write cleans up
            state += ", cleaned by next write" if len(list(out.iterdir())) == 1 else ", NOT CLEANED"
        outcomes[state] = outcomes.get(state, 0) + 1
        print(f"kill at {delay:6.2f} s ({delay / full:5.1%}): {state}; files {visible} temps {temps}")
    print("summary:", "; ".join(f"{n} x {s}" for s, n in sorted(outcomes.items())))
    shutil.rmtree(work)
    return 1 if any("BROKEN" in s or "NOT" in s for s in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
