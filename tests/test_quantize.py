"""padim.export.quantize and padim.export.openvino: an INT8 backbone and the OpenVINO IR, checked against
the float export; files of another model or broken files are model-file errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import VISA_ROOT, require, texture, write_png
from padim import Padim
from padim.cli import main
from padim.errors import ModelFileError
from padim.export import OnnxModel, export_onnx, open_model
from padim.export.parity import parity
from padim.export.quantize import BACKBONE_PREFIX, quantize_onnx
from padim.metrics import auroc

IMAGE_AUROC_BOUND, PIXEL_AUROC_BOUND = 0.005, 0.002  # the bounds, INT8 against the float model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model on synthetic textures (64 px, 16 channels), its float export, calibration images on disk."""
    require("onnxruntime")
    folder = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    train = [texture(rng) for _ in range(12)]
    model = Padim(image_size=64, d=16, num_workers=0, progress=False).fit(train)
    path = model.save(folder / "model.safetensors")
    calibration = [write_png(folder / "calibration" / f"{i}.png", image) for i, image in enumerate(train[:6])]
    onnx_path = export_onnx(model, folder / "model.onnx", source=path)
    test = [write_png(folder / "test" / f"{i}.png", texture(rng, defect=i % 2 == 1)) for i in range(6)]
    int8_path = quantize_onnx(onnx_path, folder / "model.int8.onnx", calibration, method="minmax")
    return path, onnx_path, calibration, test, int8_path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_only_the_backbone_is_quantized_and_the_metadata_says_how(tiny, tmp_path):
    onnx = require("onnx")
    _, _, calibration, test, out = tiny
    proto = onnx.load(str(out))
    weights = {i.name: i for i in proto.graph.initializer}
    consumers = {}
    for node in proto.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    # INT8 weights (dequantized from an integer initializer) feed backbone nodes only
    int8_weights = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    assert int8_weights and all(c.name.startswith(BACKBONE_PREFIX) for n in int8_weights
                                for c in consumers[n.output[0]])
    # the scoring's weights (Mahalanobis factor, blur and resize matrices) are untouched floats
    producers = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        if node.op_type == "MatMul":
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input)
    assert all(weights[n].data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
               for n in weights if n.startswith("scorer.whitening"))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["padim"])
    q = meta["quantization"]
    assert q["dtype"] == "int8" and q["calibration_images"] == len(calibration) and q["calibration_method"] == "minmax"
    assert q["format"] == "QDQ" and q["per_channel_weights"] and q["source_model_id"] == meta["model_id"]
    model = open_model(out)
    assert isinstance(model, OnnxModel) and model.meta_["quantization"] == q
    prediction = model.predict([str(p) for p in test])
    assert prediction.maps.shape == (6, 64, 64) and np.isfinite(prediction.maps).all()


def test_cli_int8_export_then_predict(tiny, tmp_path):
    path, _, calibration, test, _ = tiny
    result = invoke("export", "--model", path, "--out", tmp_path / "m.int8.onnx", "--int8", "--calibration",
                    calibration[0].parent, "--calibration-images", 4)
    assert result.exit_code == 0, result.output
    assert "INT8 backbone, calibrated on 4 images (minmax, QDQ, per-channel weights)" in result.output
    result = invoke("predict", "--model", tmp_path / "m.int8.onnx", test[0].parent, "--out", tmp_path / "o",
                    "--no-heatmaps", "--no-progress")
    assert result.exit_code == 0 and "scored 6 images" in result.output, result.output
    for args, says in ((["--int8"], "--calibration"), (["--calibration", calibration[0]], "--int8"),
                       (["--format", "openvino"], "NAME.xml")):
        result = invoke("export", "--model", path, "--out", tmp_path / "x.onnx", *args)
        assert result.exit_code == 2 and says in result.output, result.output
        assert not (tmp_path / "x.onnx").exists()


def test_openvino_float_and_int8_match_their_onnx_graphs(tiny, tmp_path):
    require("openvino")
    from padim.export.openvino import OpenVinoModel, export_openvino

    path, float_path, _, test, int8_path = tiny
    files = [str(p) for p in test]
    native = Padim.load(path).predict(files)
    for source, name in ((float_path, "m.xml"), (int8_path, "m.int8.xml")):
        out = export_openvino(source, tmp_path / name)
        assert out.with_suffix(".bin").is_file()
        ov = open_model(out)
        assert isinstance(ov, OpenVinoModel) and ov.meta_["model_id"] == OnnxModel.load(source).meta_["model_id"]
        assert ov.meta_["runtime"].startswith("openvino") and ov.threshold_ == OnnxModel.load(source).threshold_
        if source == float_path:  # the same float graph: the native numbers
            report = parity(native, ov.predict(files))
            assert report["rel_map_diff"] < 1e-4 and report["label_mismatches"] == 0, report
        else:  # the same INT8 graph as onnxruntime runs it, up to rounding at the quantization steps
            a, b = OnnxModel.load(source).predict(files), ov.predict(files)
            assert np.abs(a.scores - b.scores).max() < 0.05 * (native.scores.max() - native.scores.min())


def test_files_of_another_model_and_broken_files_are_model_errors(tiny, tmp_path):
    onnx = require("onnx")
    *_, test, int8 = tiny
    proto = onnx.load(str(int8))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props["padim"])

    def variant(name, **changes):
        changed = {**meta, **changes}
        del proto.metadata_props[:]
        onnx.helper.set_model_props(proto, {**props, "padim": json.dumps(changed)})
        onnx.save(proto, str(tmp_path / name))
        return tmp_path / name

    relabelled = variant("relabelled.onnx", model_id="0123456789ab")  # another model's metadata on this graph
    resized = variant("resized.onnx", image_size=[96, 96])
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(int8.read_bytes()[: int8.stat().st_size // 2])
    for bad, says in ((relabelled, "quantized for model"), (resized, "another model"),
                      (truncated, "not a readable ONNX model")):
        with pytest.raises(ModelFileError, match=says):
            open_model(bad)
        result = invoke("predict", "--model", bad, test[0], "--out", tmp_path / "o")
        assert result.exit_code == 4, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and bad.name in lines[0] and says in lines[0], result.output


def test_broken_openvino_files_are_model_errors(tiny, tmp_path):
    require("openvino")
    from padim.export.openvino import export_openvino

    _, float_path, _, test, _ = tiny
    good = export_openvino(float_path, tmp_path / "m.xml")
    garbage = tmp_path / "garbage.xml"
    garbage.write_text("<net>not a model")
    garbage.with_suffix(".bin").write_bytes(b"\0" * 16)
    no_bin = tmp_path / "nobin.xml"
    no_bin.write_bytes(good.read_bytes())
    for bad, says in ((garbage, "not a readable OpenVINO model"), (no_bin, "nobin.bin: model file not found")):
        result = invoke("predict", "--model", bad, test[0], "--out", tmp_path / "o")
        assert result.exit_code == 4, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and says in lines[0], result.output


@pytest.fixture(scope="module")
def fryum_aurocs(fryum_small, tmp_path_factory):
    """Image and pixel AUROC of the float export, the INT8 export and both as OpenVINO IR, and of the INT8
    export with the backbone's first 3 blocks float, on 24 normal and 24 anomalous fryum test images (the
    small 128 px model; INT8 calibrated on 16 training images the fit did not use)."""
    require("onnxruntime")
    require("openvino")
    from padim.datasets import load_split
    from padim.datasets.images import read_mask
    from padim.export.openvino import export_openvino

    folder = tmp_path_factory.mktemp("fryum_int8")
    path, test = fryum_small
    calibration = [s.path for s in load_split(VISA_ROOT, "fryum").train[40:56]]
    float_path = export_onnx(Padim.load(path), folder / "m.onnx", source=path)
    int8_path = quantize_onnx(float_path, folder / "m.int8.onnx", calibration)
    float3_path = quantize_onnx(float_path, folder / "m.int8-float3.onnx", calibration, skip_blocks=3)
    samples = [s for s in test if s.label == 0][:24] + [s for s in test if s.label == 1][:24]
    files = [str(s.path) for s in samples]
    labels = np.array([s.label for s in samples])
    masks = np.stack([read_mask(s.mask, (128, 128)) if s.mask is not None else np.zeros((128, 128), bool)
                      for s in samples]).ravel()
    out = {}
    for name, file in (("float", float_path), ("int8", int8_path),
                       ("openvino", export_openvino(float_path, folder / "m.xml")),
                       ("openvino-int8", export_openvino(int8_path, folder / "m.int8.xml")),
                       ("int8-float3", float3_path)):
        got = open_model(file).predict(files)
        out[name] = (auroc(labels, got.scores), auroc(masks, got.maps.ravel()))
    print(out)
    return out


@pytest.mark.real_data
def test_openvino_agrees_with_the_float_model_on_real_images(fryum_aurocs):
    image_ref, pixel_ref = fryum_aurocs["float"]
    image, pixel = fryum_aurocs["openvino"]
    assert abs(image - image_ref) <= IMAGE_AUROC_BOUND and abs(pixel - pixel_ref) <= PIXEL_AUROC_BOUND
    assert all(0 < v <= 1 for name in ("int8", "openvino-int8") for v in fryum_aurocs[name])  # they load and run


@pytest.mark.real_data
@pytest.mark.xfail(strict=True, reason="measured (docs/deploy.md): a whole INT8 backbone loses more than the "
                   "bounds (this 128 px model: image AUROC 0.905 -> 0.830, pixel 0.981 -> 0.827; the default models: "
                   "fryum pixel 0.961 -> 0.879, KolektorSDD image 0.918 -> 0.895, BSData image 0.930 -> 0.806); "
                   "strict, so that a change to the whole-backbone scheme which meets them shows up here")
def test_int8_agrees_with_the_float_model_within_the_bounds(fryum_aurocs):
    image_ref, pixel_ref = fryum_aurocs["float"]
    for name in ("int8", "openvino-int8"):
        image, pixel = fryum_aurocs[name]
        assert abs(image - image_ref) <= IMAGE_AUROC_BOUND and abs(pixel - pixel_ref) <= PIXEL_AUROC_BOUND, name


@pytest.mark.real_data
def test_int8_from_block_3_on_agrees_with_the_float_model_within_the_bounds(fryum_aurocs):
    """``--float-blocks 3``: the blocks whose rounding the whitened maps amplify stay float (docs/deploy.md)."""
    image_ref, pixel_ref = fryum_aurocs["float"]
    image, pixel = fryum_aurocs["int8-float3"]
    assert abs(image - image_ref) <= IMAGE_AUROC_BOUND and abs(pixel - pixel_ref) <= PIXEL_AUROC_BOUND


def test_the_node_selections_the_benchmark_compared(tiny):
    onnx = require("onnx")
    from padim.export.quantize import backbone_nodes, tap_nodes

    proto = onnx.load(str(tiny[1]))
    every = backbone_nodes(proto)
    ops = {n.name: n for n in proto.graph.node}
    assert every and all(ops[n].op_type in ("Conv", "Clip", "Relu", "Add") for n in every)
    grouped = [n for n in every if any(a.name == "group" and a.i > 1 for a in ops[n].attribute)]
    assert grouped and not set(grouped) & set(backbone_nodes(proto, depthwise=False))
    early = backbone_nodes(proto, blocks=4)
    assert early and all(int(n.split("blocks.")[1].split("/")[0].split("_")[0].split(".")[0]) < 4 for n in early)
    assert set(backbone_nodes(proto, skip_blocks=4)) == set(every) - set(early)
    # the taps: backbone outputs read outside the backbone (pooled into features), 3 depths x 2 scales
    taps = tap_nodes(proto, 1)
    assert len(taps) == 6 and taps < tap_nodes(proto, 2)


def test_calibration_images_come_one_batch_at_a_time_for_the_strided_calibration(tiny):
    from padim.export.quantize import CalibrationImages

    _, _, calibration, _, _ = tiny
    reader = CalibrationImages(calibration[:5], (64, 64), batch=2)
    assert len(reader) == 3  # 2 + 2 + 1 images
    whole = []
    while (batch := reader.get_next()) is not None:
        whole.append(batch["images"])
    assert [b.shape for b in whole] == [(2, 3, 64, 64)] * 2 + [(1, 3, 64, 64)]
    reader.set_range(1, 3)  # what the quantizer asks for: batches 1 and 2 only, then nothing
    assert np.array_equal(reader.get_next()["images"], whole[1])
    assert np.array_equal(reader.get_next()["images"], whole[2])
    assert reader.get_next() is None
    reader.set_range(0, 1)
    assert np.array_equal(reader.get_next()["images"], whole[0]) and reader.get_next() is None


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibrations_quantize_and_say_so(tiny, tmp_path, method):
    """Percentile and entropy ranges come from histograms folded batch by batch (not every
    activation of every image held at once); the file runs and its metadata names the method."""
    _, onnx_path, calibration, test, _ = tiny
    out = quantize_onnx(onnx_path, tmp_path / f"{method}.onnx", calibration, method=method)
    model = open_model(out)
    assert model.meta_["quantization"]["calibration_method"] == method
    scores = model.predict([str(p) for p in test]).scores
    assert np.isfinite(scores).all()


def test_cli_float_blocks_keeps_the_first_blocks_float(tiny, tmp_path):
    onnx = require("onnx")
    from padim.export.quantize import backbone_nodes

    path, onnx_path, calibration, _, int8_path = tiny
    result = invoke("export", "--model", path, "--out", tmp_path / "m.onnx", "--int8", "--calibration",
                    calibration[0].parent, "--calibration-images", 4, "--float-blocks", 3)
    assert result.exit_code == 0 and "blocks 0-2 float" in result.output, result.output
    meta = open_model(tmp_path / "m.onnx").meta_["quantization"]
    assert meta["blocks"] == [3, None]
    proto = onnx.load(str(tmp_path / "m.onnx"))
    quantized = {n.name for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    assert quantized  # INT8 from block 3 on; nothing before it reads an INT8 weight
    producers = {o: n for n in proto.graph.node for o in n.output}
    early = set(backbone_nodes(onnx.load(str(onnx_path)), blocks=3))
    int8_fed = {n.name for n in proto.graph.node for i in n.input
                if i in producers and producers[i].op_type == "DequantizeLinear"}
    assert early and not early & int8_fed
    assert int8_fed & set(backbone_nodes(onnx.load(str(onnx_path)), skip_blocks=3))
    for args, says in ((["--float-blocks", 99, "--int8", "--calibration", calibration[0]], "no backbone nodes left"),
                       (["--float-blocks", 3], "--int8")):
        result = invoke("export", "--model", path, "--out", tmp_path / "x.onnx", *args)
        assert result.exit_code == 2 and says in result.output, result.output
        assert not (tmp_path / "x.onnx").exists()
