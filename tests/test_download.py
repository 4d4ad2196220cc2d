"""padim.datasets.download: fetch, resume, verify and safely unpack a VisA-shaped archive.

Never touches the internet: a local HTTP server (tests/range_server.py, with Range support) in a
thread serves tars that the tests build from tiny synthetic images.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_visa_dataset
from padim.cli import main
from padim.datasets import load_split
from padim.datasets.download import (
    MARKER,
    ArchiveError,
    DownloadError,
    check_members,
    download_visa,
    is_complete,
)
from range_server import closed_port, serving

NAME = "VisA_20220922.tar"


@pytest.fixture
def server():
    with serving() as (behaviour, base):
        yield behaviour, f"{base}/{NAME}"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny VisA-layout tree (category 'widget' + split_csv) to pack."""
    return make_visa_dataset(tmp_path_factory.mktemp("src"), np.random.default_rng(0), n_normal=6, n_anomaly=2,
                             size=16)


def pack(source: Path, wrapper: str = "", extra=()) -> bytes:
    """The tree as an uncompressed tar (like the official one); ``extra`` = (TarInfo, bytes) appended."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for top in ("split_csv", "widget"):
            tar.add(source / top, arcname=f"{wrapper}/{top}" if wrapper else top)
        for info, payload in extra:
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload else None)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def closed_port_url() -> str:
    return f"{closed_port()}/{NAME}"


def get(url, root, data, **kw):
    kw = {"retries": 0, "retry_wait": 0.0, "progress": False} | kw
    return download_visa(root, url, sha(data), **kw)


def test_download_unpacks_the_layout_padim_reads(server, source, tmp_path):
    behaviour, url = server
    behaviour.data = pack(source)
    root = tmp_path / "visa"
    result = get(url, root, behaviour.data)
    assert result.downloaded and result.extracted and result.n_files == 2 + 6 + 2 + 2  # csvs, images, masks
    assert (root / "split_csv" / "1cls.csv").read_bytes() == (source / "split_csv" / "1cls.csv").read_bytes()
    split = load_split(root, "widget")
    assert len(split.train) == 2 and len(split.test) == 6
    assert sorted(p.name for p in root.iterdir()) == [MARKER, "split_csv", "widget"]  # archive deleted
    assert behaviour.requests == [None]


def test_second_run_does_nothing(server, source, tmp_path):
    behaviour, url = server
    behaviour.data = pack(source)
    root = tmp_path / "visa"
    get(url, root, behaviour.data)
    again = get(url, root, behaviour.data)
    assert not again.downloaded and not again.extracted and len(behaviour.requests) == 1
    assert is_complete(root, sha(behaviour.data))
    assert not is_complete(root, "0" * 64)  # another archive is another download


def test_presence_check_notices_missing_files(server, source, tmp_path):
    behaviour, url = server
    behaviour.data = pack(source)
    root = tmp_path / "visa"
    get(url, root, behaviour.data)
    next((root / "widget" / "Data" / "Images" / "Normal").iterdir()).unlink()
    assert not is_complete(root, sha(behaviour.data))
    result = get(url, root, behaviour.data)
    assert result.downloaded and len(behaviour.requests) == 2
    assert is_complete(root, sha(behaviour.data))


def test_dropped_connection_is_resumed_within_the_same_call(server, source, tmp_path):
    behaviour, url = server
    behaviour.data, behaviour.drops = pack(source), 1
    root = tmp_path / "visa"
    result = get(url, root, behaviour.data, retries=2)
    assert result.extracted and is_complete(root, sha(behaviour.data))
    half = len(behaviour.data) // 2
    assert behaviour.requests == [None, f"bytes={half}-"]


def test_dropped_connection_is_resumed_by_the_next_call(server, source, tmp_path):
    behaviour, url = server
    behaviour.data, behaviour.drops = pack(source), 1
    root = tmp_path / "visa"
    with pytest.raises(DownloadError, match="next run resumes it"):
        get(url, root, behaviour.data)
    part = root / f"{NAME}.part"
    assert part.stat().st_size == len(behaviour.data) // 2
    assert not (root / "widget").exists()
    get(url, root, behaviour.data)
    assert behaviour.requests == [None, f"bytes={len(behaviour.data) // 2}-"]
    assert is_complete(root, sha(behaviour.data)) and not part.exists()


def test_retries_count_only_failures_without_progress(server, source, tmp_path):
    behaviour, url = server
    behaviour.data, behaviour.drops = pack(source), 5
    root = tmp_path / "visa"
    get(url, root, behaviour.data, retries=1)  # five drops, each one brought bytes: it goes on
    assert len(behaviour.requests) == 6 and is_complete(root, sha(behaviour.data))


def test_server_that_ignores_range_restarts_from_zero(server, source, tmp_path):
    behaviour, url = server
    behaviour.data, behaviour.drops, behaviour.ignore_range = pack(source), 1, True
    root = tmp_path / "visa"
    get(url, root, behaviour.data, retries=1)
    assert is_complete(root, sha(behaviour.data))


def test_complete_part_file_gets_416_and_is_used(server, source, tmp_path):
    behaviour, url = server
    behaviour.data = pack(source)
    root = tmp_path / "visa"
    root.mkdir()
    (root / f"{NAME}.part").write_bytes(behaviour.data)
    get(url, root, behaviour.data)
    assert behaviour.requests == [f"bytes={len(behaviour.data)}-"] and is_complete(root, sha(behaviour.data))


def test_wrong_checksum_is_refused_and_nothing_is_unpacked(server, source, tmp_path):
    behaviour, url = server
    behaviour.data = pack(source)
    root = tmp_path / "visa"
    with pytest.raises(ArchiveError, match="expected 0000"):
        download_visa(root, url, "0" * 64, retries=0, progress=False)
    assert list(root.iterdir()) == []  # the bad download is deleted, since resuming it cannot help


def test_archive_already_in_root_is_verified_and_used_offline(source, tmp_path):
    data = pack(source)
    root = tmp_path / "visa"
    root.mkdir()
    (root / NAME).write_bytes(data)
    result = get(closed_port_url(), root, data, keep_archive=True)
    assert not result.downloaded and result.extracted and (root / NAME).is_file()
    assert is_complete(root, sha(data))


def test_wrapping_folder_is_stripped(server, source, tmp_path):
    behaviour, url = server
    behaviour.data = pack(source, wrapper="VisA")
    root = tmp_path / "visa"
    get(url, root, behaviour.data)
    assert (root / "split_csv" / "1cls.csv").is_file() and not (root / "VisA").exists()
    assert len(load_split(root, "widget").train) == 2


def test_archive_without_visa_layout_is_refused(server, tmp_path):
    behaviour, url = server
    info = tarfile.TarInfo("notes/readme.txt")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    behaviour.data = buf.getvalue()
    root = tmp_path / "visa"
    with pytest.raises(ArchiveError, match="not the VisA layout"):
        get(url, root, behaviour.data)
    assert not (root / "notes").exists()


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


def _malicious(outside: Path) -> dict[str, list]:
    evil = [(_member("widget/link/evil.txt"), b"pwned")]
    return {
        "dotdot": [(_member("../evil.txt"), b"pwned")],
        "dotdot-deep": [(_member("widget/Data/../../../evil.txt"), b"pwned")],
        "absolute": [(_member(str(outside / "evil.txt")), b"pwned")],
        "symlink-escape": [(_member("widget/link", tarfile.SYMTYPE, "../../outside"), b""), *evil],
        "symlink-absolute": [(_member("widget/link", tarfile.SYMTYPE, str(outside)), b""), *evil],
        "symlink-chain": [(_member("widget/link", tarfile.SYMTYPE, "."), b""),
                          (_member("widget/link/up", tarfile.SYMTYPE, ".."), b"")],
        "hardlink-escape": [(_member("widget/hard", tarfile.LNKTYPE, "../outside/evil.txt"), b"")],
        "char-device": [(_member("widget/dev", tarfile.CHRTYPE), b"")],
        "block-device": [(_member("widget/blk", tarfile.BLKTYPE), b"")],
        "fifo": [(_member("widget/fifo", tarfile.FIFOTYPE), b"")],
    }


@pytest.mark.parametrize("case", list(_malicious(Path("/x"))))
def test_malicious_archive_is_refused_and_nothing_is_written(server, source, tmp_path, case):
    behaviour, url = server
    outside = tmp_path / "outside"
    outside.mkdir()
    extra = _malicious(outside)[case]
    behaviour.data = pack(source, extra=extra)  # the bad member comes after good ones
    root = tmp_path / "work" / "visa"
    with pytest.raises(ArchiveError) as info:
        get(url, root, behaviour.data)
    bad = extra[-1][0].name if case != "symlink-escape" and case != "symlink-absolute" else extra[0][0].name
    assert f"member {bad!r} is unsafe" in str(info.value)
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in root.iterdir()) == [NAME]  # verified archive kept, nothing unpacked
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "work"]
    assert not (tmp_path / "work" / "evil.txt").exists()


def test_links_that_stay_inside_are_allowed(source, tmp_path):
    members = [_member("split_csv/1cls.csv"), _member("widget/Data/Images/Normal/000.JPG"),
               _member("widget/alias", tarfile.SYMTYPE, "Data/Images"),
               _member("widget/up", tarfile.SYMTYPE, "../split_csv/1cls.csv"),
               _member("widget/copy.JPG", tarfile.LNKTYPE, "widget/Data/Images/Normal/000.JPG")]
    kept = check_members(tmp_path / "a.tar", members)
    assert [m.name for m in kept] == [m.name for m in members]


def test_no_network_gives_a_clear_message(tmp_path):
    root = tmp_path / "visa"
    with pytest.raises(DownloadError, match=r"cannot reach 127\.0\.0\.1:\d+ .*Check the network connection"):
        download_visa(root, closed_port_url(), "0" * 64, retries=1, retry_wait=0.0, progress=False)


def test_malformed_url_is_reported(tmp_path):
    with pytest.raises(DownloadError, match="not a usable URL"):
        download_visa(tmp_path / "visa", "not-a-url/VisA.tar", "0" * 64, retries=0, progress=False)


def test_http_error_is_reported(server, tmp_path):
    behaviour, url = server
    behaviour.status = 404
    with pytest.raises(DownloadError, match="HTTP 404"):
        get(url, tmp_path / "visa", b"")
    assert len(behaviour.requests) == 1  # a client error is not retried


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_download_then_second_run(server, source, tmp_path):
    behaviour, url = server
    behaviour.data = pack(source)
    root = tmp_path / "visa"
    args = ("download", "visa", "--root", root, "--url", url, "--sha256", sha(behaviour.data), "--no-progress")
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert "VisA is ready" in first.output and (root / "widget" / "Data" / "Images").is_dir()
    second = invoke(*args)
    assert second.exit_code == 0 and "nothing to do" in second.output and len(behaviour.requests) == 1


def test_cli_no_network_exit_code_6_without_traceback(tmp_path):
    result = invoke("download", "visa", "--root", tmp_path / "visa", "--url", closed_port_url(), "--retries", "0",
                    "--no-progress")
    assert result.exit_code == 6
    assert "error: download failed: cannot reach" in result.output and "Traceback" not in result.output


def test_cli_bad_checksum_is_exit_3_and_bad_sha256_option_is_usage_error(server, source, tmp_path):
    behaviour, url = server
    behaviour.data = pack(source)
    result = invoke("download", "visa", "--root", tmp_path / "visa", "--url", url, "--sha256", "ab" * 32,
                    "--retries", "0", "--no-progress")
    assert result.exit_code == 3 and "sha256" in result.output and not (tmp_path / "visa" / "widget").exists()
    usage = invoke("download", "visa", "--root", tmp_path / "visa", "--sha256", "xyz")
    assert usage.exit_code == 2 and "64 hexadecimal digits" in usage.output
