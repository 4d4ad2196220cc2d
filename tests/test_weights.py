"""padim.backbones.weights: ``padim download weights`` fetches torchvision's weight files into the
torch cache, resumed, size- and hash-checked as torch.hub checks them, from a mirror if asked; the
ResNet backbones then load them and the model records which file it used.

Never touches the internet: every download comes from a local HTTP server (tests/range_server.py)
through ``--mirror``, with the catalog entry replaced by one for the file the test serves.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner

from conftest import make_folder_dataset
from padim.backbones import BackboneError, get_spec
from padim.backbones.registry import weights_record
from padim.backbones.weights import (
    TORCHVISION_WEIGHTS,
    WeightsFile,
    download_weights,
    hash_prefix,
    hub_dir,
    mirrored,
)
from padim.cli import main
from padim.errors import DownloadError
from padim.model.io import read_model_file
from range_server import closed_port, serving


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish(monkeypatch, data: bytes, backbone: str = "resnet18") -> WeightsFile:
    """Make the catalog's entry for ``backbone`` the file ``data`` (named with its hash prefix, as
    torchvision names its files), at the real host's path."""
    entry = WeightsFile(backbone, f"https://download.pytorch.org/models/{backbone}-{sha(data)[:8]}.pth", len(data))
    monkeypatch.setitem(TORCHVISION_WEIGHTS, backbone, entry)
    return entry


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """TORCH_HOME in the test's folder: the cache is tmp/torch/hub/checkpoints."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def server():
    with serving() as pair:
        yield pair


@pytest.fixture(scope="module")
def resnet18_bytes() -> bytes:
    """A weights file written by torchvision's own resnet18() (random initial weights)."""
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(torchvision.models.resnet18().state_dict(), buf)
    return buf.getvalue()


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.output
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------------------ catalog


def test_catalog_is_torchvisions_files_with_their_published_sizes():
    for name, weights in (("resnet18", torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
                          ("wide_resnet50_2", torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1)):
        entry = TORCHVISION_WEIGHTS[name]
        assert entry.url == weights.url and entry.name == weights.url.rsplit("/", 1)[-1]
        # torchvision publishes the size in MiB, rounded to its last digit
        published = weights.meta["_file_size"]
        decimals = len(repr(published).split(".")[1])
        assert abs(entry.size / 2**20 - published) <= 0.5 * 10**-decimals, name
    assert hash_prefix("resnet18-f37072fd.pth") == "f37072fd" and hash_prefix("weights.pth") == ""


def test_hub_dir_is_torchs_with_and_without_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert hub_dir() == tmp_path / "th" / "hub" == __import__("pathlib").Path(torch.hub.get_dir())
    monkeypatch.delitem(sys.modules, "torch")  # the command line's case: torch not imported
    assert hub_dir() == tmp_path / "th" / "hub"
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_dir() == tmp_path / "xdg" / "torch" / "hub"


def test_mirror_replaces_scheme_and_host():
    url = TORCHVISION_WEIGHTS["resnet18"].url
    assert mirrored(url, None) == url
    assert mirrored(url, "http://10.0.0.5:8080") == "http://10.0.0.5:8080/models/resnet18-f37072fd.pth"
    assert mirrored(url, "https://m.plant/torch/") == "https://m.plant/torch/models/resnet18-f37072fd.pth"
    for bad in ("m.plant", "ftp://m.plant", "https://", "https://m.plant/?x=1"):
        with pytest.raises(ValueError, match="not a mirror URL"):
            mirrored(url, bad)
    result = invoke("download", "weights", "resnet18", "--mirror", "m.plant")
    assert result.exit_code == 2 and "not a mirror URL" in result.output


# ------------------------------------------------------------------------------------------ download


def test_good_file_lands_in_the_torch_cache_and_loads(monkeypatch, torch_home, server, resnet18_bytes):
    behaviour, base = server
    behaviour.data = resnet18_bytes
    entry = publish(monkeypatch, resnet18_bytes)
    result = invoke("download", "weights", "resnet18", "--mirror", base, "--no-progress")
    assert result.exit_code == 0, result.output
    assert behaviour.paths == [f"/models/{entry.name}"]  # the mirror got the published path
    assert "--backbone resnet18 finds it" in result.stdout
    assert sorted(p.name for p in torch_home.iterdir()) == [entry.name]
    assert (torch_home / entry.name).read_bytes() == resnet18_bytes
    net = get_spec("resnet18").build(None, True)  # from the cache, as 'padim fit --backbone resnet18' does
    saved = torch.load(io.BytesIO(resnet18_bytes), weights_only=True)
    assert torch.equal(net.stem[0].weight, saved["conv1.weight"])
    assert weights_record(net) == [{"file": entry.name, "sha256": sha(resnet18_bytes)}]
    again = invoke("download", "weights", "resnet18", "--mirror", base, "--no-progress")
    assert again.exit_code == 0 and "nothing to do" in again.output and len(behaviour.paths) == 1


@pytest.mark.parametrize("serve, fragment", [
    (lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:], "does not start with"),  # corrupt: one bit flipped
    (lambda d: d[:-1000], "offers 199000 bytes, expected 200000"),               # truncated
    (lambda d: d + b"\0" * 10, "offers 200010 bytes, expected 200000"),            # longer
])
def test_wrong_file_is_refused_and_leaves_nothing_in_the_cache(monkeypatch, torch_home, server, serve, fragment):
    behaviour, base = server
    data = np.random.default_rng(1).bytes(200_000)
    publish(monkeypatch, data)
    behaviour.data = serve(data)
    result = invoke("download", "weights", "resnet18", "--mirror", base, "--retries", "0", "--no-progress")
    assert result.exit_code == 6
    [line] = error_lines(result)
    assert fragment in line and "it was deleted" in line
    assert list(torch_home.iterdir()) == []  # neither the file nor a part of it


def test_server_without_length_sending_too_much_is_stopped(monkeypatch, torch_home, tmp_path):
    data = np.random.default_rng(2).bytes(10_000)
    entry = publish(monkeypatch, data)
    with serving() as (behaviour, base):
        behaviour.data, behaviour.send_length = data + b"x" * 5_000_000, False
        with pytest.raises(DownloadError, match="sends more than the expected 10000 bytes"):
            download_weights("resnet18", mirror=base, retries=0, progress=False)
    assert not (torch_home / entry.name).exists() and list(torch_home.iterdir()) == []


def test_interrupted_download_resumes_on_the_next_run(monkeypatch, torch_home, server):
    behaviour, base = server
    data = np.random.default_rng(3).bytes(300_000)
    entry = publish(monkeypatch, data)
    behaviour.data, behaviour.drops = data, 1
    first = invoke("download", "weights", "resnet18", "--mirror", base, "--retries", "0", "--no-progress")
    assert first.exit_code == 6 and "next run resumes it" in error_lines(first)[0]
    assert [p.name for p in torch_home.iterdir()] == [f"{entry.name}.part"]
    second = invoke("download", "weights", "resnet18", "--mirror", base, "--no-progress")
    assert second.exit_code == 0, second.output
    assert behaviour.requests == [None, f"bytes={len(data) // 2}-"]
    assert [p.name for p in torch_home.iterdir()] == [entry.name] and (torch_home / entry.name).read_bytes() == data


def test_dropped_transfer_resumes_within_the_same_run(monkeypatch, tmp_path, server):
    behaviour, base = server
    data = np.random.default_rng(4).bytes(300_000)
    entry = publish(monkeypatch, data)
    behaviour.data, behaviour.drops = data, 1
    path = download_weights("resnet18", tmp_path / "cache", base, retries=1, retry_wait=0.0, progress=False)
    assert path == tmp_path / "cache" / entry.name and path.read_bytes() == data
    assert behaviour.requests == [None, f"bytes={len(data) // 2}-"]


def test_all_fetches_every_backbone_into_the_named_cache(monkeypatch, tmp_path, server):
    behaviour, base = server
    data = np.random.default_rng(5).bytes(50_000)
    names = [publish(monkeypatch, data, b).name for b in TORCHVISION_WEIGHTS]
    behaviour.data = data
    result = invoke("download", "weights", "all", "--mirror", f"{base}/pytorch", "--cache", tmp_path / "w",
                    "--no-progress")
    assert result.exit_code == 0, result.output
    assert behaviour.paths == [f"/pytorch/models/{n}" for n in names]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == sorted(names)
    assert f"--weights {tmp_path / 'w' / names[0]}" in result.stdout


def test_damaged_file_in_the_cache_is_fetched_again(monkeypatch, torch_home, server):
    behaviour, base = server
    data = np.random.default_rng(6).bytes(20_000)
    entry = publish(monkeypatch, data)
    behaviour.data = data
    torch_home.mkdir(parents=True)
    (torch_home / entry.name).write_bytes(b"\0" * len(data))
    path = download_weights("resnet18", mirror=base, retries=0, progress=False)
    assert path.read_bytes() == data and len(behaviour.paths) == 1


def test_unreachable_server_gives_one_line_and_exit_6(monkeypatch, torch_home):
    publish(monkeypatch, b"x" * 100)
    result = invoke("download", "weights", "resnet18", "--mirror", closed_port(), "--retries", "0", "--no-progress")
    assert result.exit_code == 6
    [line] = error_lines(result)
    assert "cannot reach 127.0.0.1:" in line and "Check the network connection" in line
    assert not torch_home.exists() or list(torch_home.iterdir()) == []


def test_http_error_from_the_mirror_names_the_option(monkeypatch, torch_home, server):
    behaviour, base = server
    publish(monkeypatch, b"x" * 100)
    behaviour.status = 404
    result = invoke("download", "weights", "resnet18", "--mirror", base, "--retries", "0", "--no-progress")
    assert result.exit_code == 6 and "HTTP 404" in error_lines(result)[0] and "--mirror" in error_lines(result)[0]


# ------------------------------------------------------------------------------------------ loading


def test_damaged_cached_file_is_refused_at_load_naming_the_command(monkeypatch, torch_home, resnet18_bytes):
    entry = publish(monkeypatch, resnet18_bytes)
    torch_home.mkdir(parents=True)
    (torch_home / entry.name).write_bytes(resnet18_bytes[:-1] + bytes([resnet18_bytes[-1] ^ 0xFF]))
    with pytest.raises(BackboneError, match="padim download weights resnet18"):
        get_spec("resnet18").build(None, True)


def test_fit_without_weights_names_the_download_command(tmp_path, torch_home, rng):
    data = make_folder_dataset(tmp_path / "data", rng, n_train=4, n_good=1, n_bad=1)
    result = invoke("fit", data, "--category", "widget", "--backbone", "resnet18", "--image-size", "64",
                    "--out", tmp_path / "out", "--no-progress")
    assert result.exit_code == 5
    [line] = error_lines(result)
    assert "padim download weights resnet18" in line and str(torch_home / "resnet18-f37072fd.pth") in line
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_run_records_the_weights_file_in_the_model_metrics_and_report(tmp_path, rng, resnet18_bytes):
    data = make_folder_dataset(tmp_path / "data", rng, n_train=6, n_good=2, n_bad=2)
    weights = tmp_path / "r18.pth"
    weights.write_bytes(resnet18_bytes)
    result = invoke("run", data, "--category", "widget", "--backbone", "resnet18", "--weights", weights,
                    "--image-size", "64", "--scales", "1", "--out", tmp_path / "run", "--no-figures",
                    "--no-progress")
    assert result.exit_code == 0, result.output
    record = [{"file": "r18.pth", "sha256": sha(resnet18_bytes)}]
    assert read_model_file(tmp_path / "run" / "model.safetensors")[0]["backbone_weights"] == record
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["model"]["weights"] == record
    assert sha(resnet18_bytes) in (tmp_path / "run" / "report.html").read_text()
