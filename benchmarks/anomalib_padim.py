"""anomalib 2.7's PaDiM on fryum, end to end, for the speed comparison at anomalib's settings.

anomalib is not a dependency of this project: install it in a venv of its own
(``python -m venv /tmp/anomvenv && /tmp/anomvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
anomalib==2.7.0``). Then

    python benchmarks/anomalib_padim.py prep /tmp/fryum_mv          # this project's venv
    /usr/bin/time -v /tmp/anomvenv/bin/python benchmarks/anomalib_padim.py run /tmp/fryum_mv

``prep`` lays fryum's official 1cls split out as an MVTec-style folder of symlinks (binary masks
written beside them, outside the repository); ``run`` fits and tests anomalib's default PaDiM
(ResNet-18, 256 x 256, d = 100) on the CPU. Its backbone weights come from the network, which this
machine lacks, so it runs with ``pre_trained=False``: the time does not depend on the weights, the
metrics do (compare accuracy with docs/accuracy.md's anomalib rows, run with weights). Compare the
wall time with ``python benchmarks/stages.py --datasets fryum -- --image-size 256 --aspect square
--d 100 --scales 1 --pool 1`` in the same window.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def prep(out: Path) -> None:
    import numpy as np
    from PIL import Image

    from padim.datasets import load_split

    split = load_split(Path(__file__).resolve().parents[2] / "shared" / "data" / "visa", "fryum")
    base = out / "fryum"
    for d in ("train/good", "test/good", "test/bad", "ground_truth/bad"):
        (base / d).mkdir(parents=True, exist_ok=True)
    for s in split.train:
        os.symlink(s.path.resolve(), base / "train/good" / s.path.name)
    for s in split.test:
        os.symlink(s.path.resolve(), base / "test" / ("bad" if s.label else "good") / s.path.name)
        if s.label:
            mask = np.asarray(Image.open(s.mask)) != 0  # VisA masks hold class ids
            Image.fromarray(mask.astype(np.uint8) * 255).save(base / "ground_truth/bad" / f"{s.path.stem}_mask.png")


def run(root: Path, workers: int = 2) -> None:
    start = time.perf_counter()
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from anomalib.models import Padim

    data = Folder(name="fryum", root=root / "fryum", normal_dir="train/good", abnormal_dir="test/bad",
                  normal_test_dir="test/good", mask_dir="ground_truth/bad", train_batch_size=32,
                  eval_batch_size=32, num_workers=workers)
    model = Padim(pre_trained=False)
    engine = Engine(accelerator="cpu", devices=1, default_root_dir=root / "results", logger=False)
    engine.fit(model=model, datamodule=data)
    print(engine.test(model=model, datamodule=data))
    print(f"anomalib PaDiM fit + test in process: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    {"prep": prep, "run": run}[sys.argv[1]](Path(sys.argv[2]))
