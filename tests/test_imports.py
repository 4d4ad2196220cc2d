"""The command line's import contract: ``padim --help`` and usage errors need no heavy library."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

HEAVY = ("torch", "torchvision", "sklearn", "matplotlib", "scipy", "dask", "distributed", "onnx", "onnxruntime",
         "fastapi", "uvicorn", "jinja2", "PIL", "numpy")
PREDICT_UNUSED = ("torchvision", "sklearn", "matplotlib", "scipy", "skimage", "dask", "distributed", "onnx",
                  "onnxruntime", "fastapi", "uvicorn", "jinja2")


def _imported(code: str) -> set[str]:
    """Top-level names of the modules ``python -X importtime -c code`` imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                            check=True)
    names = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.mark.parametrize("code", ["import padim.cli", "import padim", "from padim.errors import exit_code"])
def test_the_command_line_and_the_package_import_no_heavy_library(code):
    heavy = sorted(set(HEAVY) & _imported(code))
    assert not heavy, f"{code!r} imports {heavy}"


def test_help_and_usage_errors_stay_light():
    probe = ("import sys\nfrom padim.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
             f"heavy = sorted(set({HEAVY!r}) & {{m.split('.')[0] for m in sys.modules}})\n"
             "print('HEAVY', heavy, code)")
    for args in (["--help"], ["fit", "--help"], ["run", "--help"], ["fit", "--scales", "2", "x", "--category", "c",
                                                                    "--out", "o"]):
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True).stdout
        assert "HEAVY [] " in out, (args, out[-300:])
    assert "HEAVY [] 2" in out  # the bad --scales is a usage error, found before any heavy import


def test_the_default_backbone_is_built_without_torchvision():
    # torchvision.models imports torch._dynamo (through torchvision.ops), the largest import of a
    # cold one-image prediction; the default backbone is defined in plain torch.nn
    probe = ("import sys\nfrom padim.backbones import FeatureExtractor, channel_index\n"
             "FeatureExtractor('mobilenet_v2', channel_index(152, 40, 0))\n"
             "print('LOADED', sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "LOADED []" in out, out[-300:]


def test_predicting_one_image_imports_only_what_scoring_needs(tmp_path):
    # scoring one image and writing its heat map needs torch, numpy, PIL and safetensors; the
    # reports' and metrics' libraries, torchvision and the optional extras stay out
    from conftest import texture, write_png
    from padim import Padim

    rng = np.random.default_rng(0)
    model = Padim(image_size=64, d=16, num_workers=0, progress=False).fit(np.stack([texture(rng) for _ in range(6)]))
    path = model.save(tmp_path / "model.safetensors")
    image = write_png(tmp_path / "one.png", texture(rng, defect=True))
    probe = ("import sys\nfrom padim.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
             "print('LOADED', sorted({m for m in sys.modules if m.split('.')[0] in "
             f"{PREDICT_UNUSED!r} or m == 'torch._dynamo'}}), code)")
    out = subprocess.run([sys.executable, "-c", probe, "predict", "--model", str(path), str(image), "--out",
                          str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True)
    assert "LOADED [] 0" in out.stdout, (out.stdout[-300:], out.stderr[-2000:])
    assert (tmp_path / "out" / "heatmaps" / "one.png").is_file()


def test_predicting_with_an_exported_model_runs_without_torch(tmp_path):
    # the ONNX runner decodes with PIL and runs onnxruntime: a fresh process imports neither torch
    # nor onnx (only onnxruntime), the fastest cold start for scripts and cron jobs
    pytest.importorskip("onnxruntime")
    from conftest import texture, write_png
    from padim import Padim
    from padim.export import export_onnx

    rng = np.random.default_rng(0)
    model = Padim(image_size=64, d=16, num_workers=0, progress=False).fit(np.stack([texture(rng) for _ in range(6)]))
    path = export_onnx(model, tmp_path / "model.onnx")
    image = write_png(tmp_path / "one.png", texture(rng, defect=True))
    probe = ("import sys\nfrom padim.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
             "print('LOADED', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnx', 'torchvision'}), code)")
    out = subprocess.run([sys.executable, "-c", probe, "predict", "--model", str(path), str(image), "--out",
                          str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True)
    assert "LOADED [] 0" in out.stdout, (out.stdout[-300:], out.stderr[-2000:])
    assert (tmp_path / "out" / "heatmaps" / "one.png").is_file()


def test_int8_and_openvino_models_predict_and_serve_without_torch(tmp_path):
    # an INT8 ONNX file and an OpenVINO IR are opened as the float ONNX file is: by predict and by
    # the service's model loader, in fresh processes that never import torch
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    from conftest import texture, write_png
    from padim import Padim
    from padim.export import export_onnx
    from padim.export.openvino import export_openvino
    from padim.export.quantize import quantize_onnx

    rng = np.random.default_rng(0)
    train = [texture(rng) for _ in range(6)]
    model = Padim(image_size=64, d=16, num_workers=0, progress=False).fit(np.stack(train))
    float_path = export_onnx(model, tmp_path / "model.onnx")
    calibration = [write_png(tmp_path / "cal" / f"{i}.png", image) for i, image in enumerate(train[:2])]
    int8 = quantize_onnx(float_path, tmp_path / "model.int8.onnx", calibration)
    files = [int8, export_openvino(float_path, tmp_path / "model.xml"), export_openvino(int8, tmp_path / "int8.xml")]
    image = write_png(tmp_path / "one.png", texture(rng, defect=True))
    loaded = "print('LOADED', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnx', 'torchvision'}), code)"
    predict = ("import sys\nfrom padim.cli import main\n"
               "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n" + loaded)
    serve = ("import sys\nfrom padim.serve.inspector import Inspector, decode\n"
             "inspector = Inspector.open(sys.argv[1])\n"
             "array = decode(open(sys.argv[2], 'rb').read(), 'one.png', inspector.image_size, inspector.limits)[0]\n"
             "code = inspector.format + str(inspector.score([array])[0].shape)\n" + loaded)
    for path in files:
        out = subprocess.run([sys.executable, "-c", predict, "predict", "--model", str(path), str(image), "--out",
                              str(tmp_path / path.stem), "--no-progress"], capture_output=True, text=True)
        assert "LOADED [] 0" in out.stdout, (path.name, out.stdout[-300:], out.stderr[-2000:])
        out = subprocess.run([sys.executable, "-c", serve, str(path), str(image)], capture_output=True, text=True)
        expected = "onnx(1,)" if path.suffix == ".onnx" else "openvino(1,)"
        assert f"LOADED [] {expected}" in out.stdout, (path.name, out.stdout[-300:], out.stderr[-2000:])
