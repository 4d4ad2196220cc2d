"""padim.backbones: registry, packaged weights, ResNet loading without network, feature taps."""

from __future__ import annotations

import pytest
import torch

from padim.backbones import BackboneError, FeatureExtractor, channel_index, get_spec, list_backbones
from padim.backbones.extractor import micro_batch_for


def test_registry_lists_the_four_backbones():
    assert {"mobilenet_v2", "efficientnet_lite0", "resnet18", "wide_resnet50_2"} <= set(list_backbones())
    with pytest.raises(BackboneError, match="unknown backbone"):
        get_spec("vgg")


@pytest.mark.parametrize("name, pretrained", [
    ("mobilenet_v2", True), ("efficientnet_lite0", True), ("resnet18", False), ("wide_resnet50_2", False),
    ("mobilenet_v2+efficientnet_lite0", True),
])
def test_taps_have_strides_4_8_16_and_declared_channels(name, pretrained):
    spec = get_spec(name)
    net = spec.build(None, pretrained).eval()
    with torch.inference_mode():
        maps = net(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape[1:]) for m in maps] == [
        (c, 64 // s, 96 // s) for c, s in zip(spec.channels, (4, 8, 16), strict=True)
    ]


def test_packaged_weights_are_real_imagenet_weights():
    # random init would give BatchNorm running_var == 1 everywhere; trained weights never do
    net = get_spec("mobilenet_v2").build(None, True)
    assert not torch.allclose(net.blocks[0][1].running_var, torch.ones(32))


def test_resnet_without_cached_weights_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(BackboneError, match="Nothing downloads at run time") as info:
        get_spec("resnet18").build(None, True)
    message = str(info.value)
    assert str(tmp_path / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "padim download weights resnet18" in message and "--weights" in message


def test_resnet_loads_a_weights_file_the_user_names(tmp_path):
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    assert get_spec("resnet18").build(path, True) is not None
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(BackboneError, match="bad.pth"):
        get_spec("resnet18").build(bad, True)


def test_channel_index_is_fixed_by_seed_and_validated():
    a = channel_index(152, 100, 0)
    assert torch.equal(a, channel_index(152, 100, 0)) and not torch.equal(a, channel_index(152, 100, 1))
    assert len(set(a.tolist())) == 100 and a.max() < 152
    with pytest.raises(ValueError):
        channel_index(152, 153, 0)


def test_extractor_normalizes_uint8_and_concatenates_at_stride_4():
    channels = channel_index(152, 40, 0)
    extractor = FeatureExtractor("mobilenet_v2", channels)
    out = extractor(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8))
    assert out.shape == (2, 40, 16 * 16) and out.dtype == torch.float32
    assert extractor.grids((64, 64)) == [(16, 16)]


def test_extractor_writes_into_a_reused_buffer_with_the_same_values():
    extractor = FeatureExtractor("mobilenet_v2", channel_index(152, 40, 0), scales=(1.0, 0.5))
    images = torch.randint(0, 255, (5, 3, 64, 64), dtype=torch.uint8)
    buffer = extractor.buffer(3, (64, 64))
    assert buffer.shape == (16 * 16 + 8 * 8, 3, 40)
    for batch in images.split(3):  # a full batch, then a smaller one in the same buffer
        out = extractor(batch, buffer)
        assert out.data_ptr() == buffer.data_ptr()
        assert torch.equal(out, extractor(batch))
    for micro_batch, n in [(1, 1), (None, 2), (2, 3), ("auto", 3)]:  # one image; the whole batch; in steps
        extractor.micro_batch = micro_batch
        out = extractor(images[:n], buffer)
        assert out.data_ptr() == buffer.data_ptr()
        assert torch.equal(out, extractor(images[:n]))
    with pytest.raises(ValueError, match="cannot hold"):
        extractor(images, buffer)  # 5 images, room for 3


def test_bfloat16_features_are_float32_close_to_float32_ones_and_float32_within_the_block():
    channels = channel_index(152, 152, 0)
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    exact = FeatureExtractor("mobilenet_v2", channels, feature_dtype="float32")(images)
    half = FeatureExtractor("mobilenet_v2", channels, feature_dtype="bfloat16")
    deep = FeatureExtractor("mobilenet_v2", channels, feature_dtype="bfloat16", deep=True)
    out, taps = half(images), []
    deep(images, deep=taps)
    assert out.dtype == torch.float32 and taps[0].dtype == torch.float32 and out.shape == exact.shape
    error = float((out - exact).norm() / exact.norm())
    assert 1e-4 < error < 0.1  # rounded (8 bits of mantissa), yet the same features
    with half.float32():  # an export traces the network in float32
        assert torch.equal(half(images), exact)
    assert half.bfloat16 and torch.equal(half(images), out)
    with pytest.raises(ValueError, match="feature_dtype"):
        FeatureExtractor("mobilenet_v2", channels, feature_dtype="float16")


def test_micro_batch_follows_the_input_pixels():
    assert [micro_batch_for(s) for s in [(64, 64), (256, 256), (320, 480), (224, 336), (512, 512), (4096, 4096)]] \
        == [64, 4, 2, 4, 1, 1]
    extractor = FeatureExtractor("mobilenet_v2", torch.arange(5))
    assert extractor.step((256, 256)) == 4
    extractor.micro_batch = None
    assert extractor.step((256, 256)) is None


def test_grids_are_probed_once_per_input_size(monkeypatch):
    extractor = FeatureExtractor("mobilenet_v2", torch.arange(5), scales=(1.0, 0.5))
    probes, forward = [], extractor.net.forward
    monkeypatch.setattr(extractor.net, "forward", lambda x: probes.append(tuple(x.shape)) or forward(x))
    assert extractor.grids((64, 64)) == extractor.grids((64, 64)) == [(16, 16), (8, 8)]
    assert probes == [(1, 3, 64, 64), (1, 3, 32, 32)]  # the second call ran no network


def test_concatenated_backbone_feeds_each_network_its_own_normalization():
    pair = get_spec("mobilenet_v2+efficientnet_lite0").build(None, True).eval()
    lite = get_spec("efficientnet_lite0").build(None, True).eval()
    raw = torch.rand(1, 3, 64, 64)  # RGB in [0, 1]
    imagenet = (raw - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        joint = pair(imagenet)
        alone = lite((raw - 0.5) / 0.5)
    torch.testing.assert_close(joint[2][:, 96:], alone[2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pool, resize", [(1, "nearest"), (3, "bilinear")])
def test_extractor_equals_pool_resize_concat_then_select(pool, resize):
    import torch.nn.functional as F

    channels = channel_index(152, 50, 3)
    extractor = FeatureExtractor("mobilenet_v2", channels, pool=pool, tap_resize=resize)
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        taps = extractor.net((images.float() - extractor.mean) / extractor.std)
        if pool > 1:
            taps = [F.avg_pool2d(t, pool, 1, pool // 2, count_include_pad=False) for t in taps]
        kw = {"align_corners": False} if resize == "bilinear" else {}
        full = torch.cat([taps[0]] + [F.interpolate(t, size=(16, 16), mode=resize, **kw) for t in taps[1:]], 1)
        # the kept channels, deepest tap first (taps of 24, 32 and 96 channels)
        tap = torch.bucketize(channels, torch.tensor([24, 56]), right=True)
        deep_first = channels[torch.argsort(-tap, stable=True)]
        torch.testing.assert_close(extractor(images), full[:, deep_first].flatten(2))


def test_extractor_works_when_a_tap_contributes_no_channel():
    extractor = FeatureExtractor("mobilenet_v2", torch.arange(5))  # all five from the first tap
    out = extractor(torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8))
    assert out.shape == (1, 5, 16 * 16)


def test_pyramid_levels_are_the_downscaled_inputs_positions_concatenated():
    import torch.nn.functional as F

    channels = channel_index(152, 30, 1)
    pyramid = FeatureExtractor("mobilenet_v2", channels, scales=(1.0, 0.5))
    single = FeatureExtractor("mobilenet_v2", channels)
    images = torch.randint(0, 255, (2, 3, 64, 96), dtype=torch.uint8)
    with torch.inference_mode():
        out = pyramid(images)
        x = (images.float() - single.mean) / single.std
        small = F.interpolate(x, size=(32, 48), mode="bilinear", align_corners=False, antialias=True)
        expected = torch.cat([single.features(x).flatten(2), single.features(small).flatten(2)], dim=2)
    assert pyramid.grids((64, 96)) == [(16, 24), (8, 12)]
    torch.testing.assert_close(out, expected)


def test_downscale_matrices_equal_antialiased_interpolation():
    import torch.nn.functional as F

    from padim.backbones.extractor import resize_matrix

    x = torch.rand(2, 3, 40, 60)
    rows, cols = resize_matrix(40, 28), resize_matrix(60, 42)
    expected = F.interpolate(x, size=(28, 42), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(rows @ x @ cols.T, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scales", [(), (0.0,), (1.0, 1.0), (1.5,)])
def test_bad_scales_are_refused(scales):
    with pytest.raises(ValueError, match="scales"):
        FeatureExtractor("mobilenet_v2", torch.arange(5), scales=scales)


def test_folding_batch_norms_keeps_the_function_and_removes_every_norm():
    from padim.backbones.extractor import fold_batch_norms

    net = get_spec("mobilenet_v2").build(None, True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        before = net(x)
        folded = fold_batch_norms(net)
        after = folded(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_mobilenet_v2_has_torchvisions_state_dict_keys_and_shapes():
    import torchvision

    from padim.backbones.mobilenet_v2 import mobilenet_v2_features

    ours, theirs = mobilenet_v2_features().state_dict(), torchvision.models.mobilenet_v2().features.state_dict()
    assert list(ours) == list(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_mobilenet_v2_with_torchvisions_random_weights_gives_its_outputs_at_the_taps():
    import torchvision

    from padim.backbones.mobilenet_v2 import mobilenet_v2_features
    from padim.backbones.packaged import SequentialTaps

    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2().features
    # random BatchNorm statistics too, so that every normalization is exercised in eval mode
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2)
                m.weight.normal_(1, 0.1), m.bias.normal_(0, 0.1)
    ours = mobilenet_v2_features()
    ours.load_state_dict(reference.state_dict(), strict=True)
    taps = (3, 6, 13, 16)
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        expected = SequentialTaps(reference, taps).eval()(x)
        got = SequentialTaps(ours, taps).eval()(x)
    assert len(got) == len(expected) == len(taps)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_mobilenet_v2_backbone_registered_names_still_build():
    for name, taps in [("mobilenet_v2", 3), ("mobilenet_v2_deep", 4)]:
        net = get_spec(name).build(None, False)
        assert len(net.taps) == taps and len(net.blocks) == net.taps[-1] + 1
