"""Download the official VisA archive, verify its pinned sha256, and unpack it safely in place.

The archive is fetched into ``ROOT/<name>.part`` by :func:`padim.fetch.download_file` (resumed
with an HTTP Range request after a dropped connection, within the same call and on a later call),
checked against the sha256 before anything is unpacked, and extracted only when no member could
write outside ROOT. A marker file written atomically after a successful extraction makes a second call a no-op.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from ..atomic import write_text
from ..checksums import sha256_of
from ..errors import DatasetError, DownloadError
from ..fetch import download_file
from .visa import VISA_SHA256, VISA_URL

MARKER = ".padim-download.json"


class ArchiveError(DatasetError):
    """The archive is not the one expected (checksum) or not safe or not VisA-shaped (members)."""


@dataclass(frozen=True)
class DownloadResult:
    """What :func:`download_visa` did: ``root`` holds the data; ``downloaded``/``extracted`` are
    False when that step was not needed."""

    root: Path
    downloaded: bool
    extracted: bool
    n_files: int


def archive_name(url: str) -> str:
    """The file name of the archive at ``url`` (its last path component)."""
    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    return name or "download.tar"


# ---------------------------------------------------------------------------------------------- done?


def is_complete(root: Path, sha256: str) -> bool:
    """True when ``root`` holds a finished extraction of the archive with this sha256.

    The marker must name this checksum, and every top-level entry it lists must still be there with
    at least as many files as were unpacked (so a deleted category makes the data incomplete).
    """
    try:
        marker = json.loads((root / MARKER).read_text(encoding="utf-8"))
        if marker["sha256"] != sha256.lower():
            return False
        entries: dict[str, int] = marker["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for name, n_files in entries.items():
        path = root / name
        if not path.exists():
            return False
        if path.is_dir() and sum(len(files) for _, _, files in os.walk(path)) < n_files:
            return False
    return True


# ------------------------------------------------------------------------------------------- extract


def _parts(name: str) -> tuple[str, ...]:
    return tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))


def _leaves(parts: tuple[str, ...]) -> bool:
    """True when walking ``parts`` from a folder climbs above it (lexically)."""
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else 1
        if depth < 0:
            return True
    return False


def _is_absolute(name: str) -> bool:
    return name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) is not None


def _wrapper(names: list[tuple[str, ...]]) -> str:
    """The single top-level folder that wraps everything, when there is one and it holds split_csv/."""
    tops = {p[0] for p in names if p}
    if len(tops) == 1 and any(p[1:2] == ("split_csv",) for p in names):
        return tops.pop()
    return ""


def check_members(archive: Path, members: list[tarfile.TarInfo]) -> list[tarfile.TarInfo]:
    """Refuse the archive unless every member stays inside ROOT and it has the VisA layout.

    Returns the members to unpack, named relative to ROOT (a single wrapping folder, if the archive
    has one, is stripped; the official archive has the categories at its top). Raises ArchiveError
    naming the first bad member, before anything is written.
    """

    def refuse(m: tarfile.TarInfo, why: str) -> ArchiveError:
        return ArchiveError(f"{archive}: refusing to unpack: member {m.name!r} is unsafe ({why}); nothing was unpacked")

    for m in members:
        if _is_absolute(m.name):
            raise refuse(m, "absolute path")
        if ".." in _parts(m.name):
            raise refuse(m, "path with '..'")
        if m.isdev() or not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
            raise refuse(m, "device or special file")
    wrapper = _wrapper([_parts(m.name) for m in members])
    skip = 1 if wrapper else 0
    kept: list[tarfile.TarInfo] = []
    links: set[tuple[str, ...]] = set()
    for m in members:
        parts = _parts(m.name)[skip:]
        if not parts:
            continue  # the wrapping folder itself
        if any(parts[:i] in links for i in range(1, len(parts) + 1)):
            raise refuse(m, "path through a link")  # writing through a link could land wherever it points
        changes: dict[str, str] = {"name": "/".join(parts)}
        if m.issym() or m.islnk():
            if _is_absolute(m.linkname):
                raise refuse(m, f"link to absolute path {m.linkname!r}")
            target = _parts(m.linkname)
            if m.islnk():  # a hard link names an archive member: it moves with the wrapper
                if wrapper and target[:1] != (wrapper,):
                    raise refuse(m, f"link to {m.linkname!r} leaves the folder")
                target = target[skip:]
                changes["linkname"] = "/".join(target)
            else:  # a symlink is relative to its own folder
                target = parts[:-1] + target
            if _leaves(target):
                raise refuse(m, f"link to {m.linkname!r} leaves the folder")
            links.add(parts)
        kept.append(m.replace(**changes, deep=False))
    names = [_parts(m.name) for m in kept]
    if ("split_csv", "1cls.csv") not in names or not any(p[1:3] == ("Data", "Images") for p in names):
        raise ArchiveError(f"{archive}: not the VisA layout (need split_csv/1cls.csv and <category>/Data/Images/ at "
                           "the top of the archive); nothing was unpacked")
    return kept


def extract(archive: Path, root: Path, progress: bool = True) -> dict[str, int]:
    """Unpack ``archive`` into ``root`` after :func:`check_members`; return files per top-level entry."""
    if not hasattr(tarfile, "data_filter"):
        raise DownloadError("safe extraction needs Python 3.11.4 or newer (tarfile extraction filters)")
    try:
        with tarfile.open(archive) as tar:
            members = check_members(archive, tar.getmembers())
            entries: dict[str, int] = {}
            for m in members:
                top = m.name.split("/")[0]
                entries[top] = entries.get(top, 0) + (0 if m.isdir() else 1)
            # tarfile's "data" filter is the second line of defence behind check_members.
            tar.extractall(root, members=tqdm(members, desc="unpacking", unit="file", disable=not progress),
                           filter="data")
    except tarfile.FilterError as exc:
        raise ArchiveError(f"{archive}: refusing to unpack: {exc}") from exc
    except tarfile.TarError as exc:
        raise ArchiveError(f"{archive}: not a readable tar archive ({exc})") from exc
    return entries


# --------------------------------------------------------------------------------------------- whole


def download_visa(root: str | Path, url: str = VISA_URL, sha256: str = VISA_SHA256, *, retries: int = 3,
                  retry_wait: float = 2.0, keep_archive: bool = False, progress: bool = True,
                  echo: Callable[[str], None] = lambda _: None) -> DownloadResult:
    """Make ``root`` hold the VisA data set as distributed (``root/<category>/Data/...``, ``root/split_csv``).

    Does nothing when a previous call finished. Otherwise resumes or starts the download into
    ``root/<archive>.part``, verifies ``sha256`` (a mismatch deletes the part file: resuming it
    cannot help), renames it to ``root/<archive>``, refuses unsafe members, unpacks, writes the
    marker, and deletes the archive unless ``keep_archive``. An archive already at
    ``root/<archive>`` (downloaded by other means) is verified and used.

    Raises DownloadError (network, server, disk) or ArchiveError (checksum, unsafe or non-VisA
    archive: nothing is unpacked).
    """
    root = Path(root)
    sha256 = sha256.lower()
    if is_complete(root, sha256):
        echo(f"{root}: VisA is already downloaded and unpacked; nothing to do")
        return DownloadResult(root, False, False, 0)
    archive = root / archive_name(url)
    downloaded = False
    try:
        root.mkdir(parents=True, exist_ok=True)
        if archive.is_file():
            echo(f"found {archive}; verifying its sha256")
            actual = sha256_of(archive)
            if actual != sha256:
                raise ArchiveError(f"{archive}: sha256 {actual} does not match the expected {sha256}; delete the "
                                   "file and run again to download it")
        else:
            def check(path: Path) -> str | None:
                echo("verifying sha256")
                actual = sha256_of(path)
                return None if actual == sha256 else f"{url}: the downloaded file has sha256 {actual}, " \
                                                     f"expected {sha256}"

            download_file(url, archive, check, mismatch=ArchiveError, retries=retries, retry_wait=retry_wait,
                          progress=progress, hint="check the URL (--url)", echo=echo,
                          after="; it was deleted and nothing was unpacked. Run again; if this repeats, the server "
                                "serves a different file (for a mirror with another archive, pass --sha256)")
            downloaded = True
        entries = extract(archive, root, progress)
        write_text(root / MARKER, json.dumps({"url": url, "sha256": sha256, "archive": archive.name,
                                              "entries": entries}, indent=1) + "\n")
        if not keep_archive:
            archive.unlink()
    except OSError as exc:  # local disk: full, read-only, permissions
        raise DownloadError(f"{exc.filename or root}: {exc.strerror or exc}") from exc
    n_files = sum(entries.values())
    echo(f"{root}: {n_files} files unpacked ({', '.join(sorted(entries))})")
    return DownloadResult(root, downloaded, True, n_files)
