"""kill -9 experiment: run `padim fit` on a synthetic data set and SIGKILL it after spread-out
delays, then check the output folder: the model is the previous one (same bytes) or the new one,
complete; never partial. Prints one line per kill and a summary.

    .venv/bin/python scripts/kill_fit.py [--kills 12] [--write-kills 6] [--train 40] [--size 128] [--d 100]

Timed kills rarely land in the short model write, so --write-kills more runs watch the output folder
and kill the fit a few milliseconds after the model's temporary file appears.
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
    parser.add_argument("--write-kills", type=int, default=6)
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
    after_temp = [0.001 * 3**i for i in range(args.write_kills)]  # 1, 3, 9, 27, ... ms after the temp appears
    outcomes: dict[str, int] = {}
    for i, delay in enumerate([*delays, *(-d for d in after_temp)]):
        out = work / f"kill{i}"
        out.mkdir()
        shutil.copy(previous, out / "model.safetensors")
        child = subprocess.Popen([*fit, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if delay >= 0:
            time.sleep(delay)
        else:
            while child.poll() is None and not list(out.glob(".model.*.tmp.safetensors")):
                time.sleep(0.0005)
            time.sleep(-delay)
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
        when = f"{delay:6.2f} s ({delay / full:5.1%})" if delay >= 0 else f"{-delay * 1000:g} ms after temp appeared"
        print(f"kill at {when}: {state}; files {visible} temps {temps}", flush=True)
    print("summary:", "; ".join(f"{n} x {s}" for s, n in sorted(outcomes.items())))
    shutil.rmtree(work)
    return 1 if any("BROKEN" in s or "NOT" in s for s in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
