"""ONNX vs native parity on a data set's whole test split: prints the numbers as JSON.

    python benchmarks/parity.py --model runs/fryum/model.safetensors --onnx runs/fryum/model.onnx \\
        --data ../shared/data/visa --category fryum
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from padim import Padim
from padim.datasets import load_split
from padim.export import OnnxModel
from padim.export.parity import parity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="native .safetensors model")
    parser.add_argument("--onnx", type=Path, required=True, help="the same model exported with 'padim export'")
    parser.add_argument("--data", type=Path, required=True, help="DATA_ROOT (e.g. ../shared/data/visa)")
    parser.add_argument("--category", default="fryum")
    parser.add_argument("--split", default="1cls")
    args = parser.parse_args()

    paths = [s.path for s in load_split(args.data, args.category, args.split).test]
    native, exported = Padim.load(args.model), OnnxModel.load(args.onnx)
    start = time.perf_counter()
    native_pred = native.predict(paths)
    native_s = time.perf_counter() - start
    start = time.perf_counter()
    onnx_pred = exported.predict(paths)
    onnx_s = time.perf_counter() - start
    report = parity(native_pred, onnx_pred)
    report.update({"threshold": native.threshold_, "native_predict_s": round(native_s, 2),
                   "onnx_predict_s": round(onnx_s, 2), "n_anomalous_native": int(native_pred.labels.sum()),
                   "n_anomalous_onnx": int(onnx_pred.labels.sum())})
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
