"""Fetch one file over HTTP(S) the way every ``padim download`` command does: into ``NAME.part``
beside its destination, with a progress bar, resumed with an HTTP Range request after a dropped
connection (within the same call and on a later call), checked, then renamed into place.

A check that fails deletes the part file (resuming it cannot help) and raises one error whose
message says what differed.
"""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .errors import DownloadError

CHUNK = 1 << 20
TIMEOUT_S = 60.0


class Mismatch(DownloadError):
    """The file is not the one expected (size or checksum); it was deleted."""


class _Dropped(Exception):
    """The transfer stopped early; the part file keeps what arrived."""


def part_path(dest: Path) -> Path:
    """Where the download of ``dest`` goes until it is checked: ``dest`` + ``.part``."""
    return dest.with_name(dest.name + ".part")


def _content_range_start(value: str | None) -> int | None:
    match = re.fullmatch(r"bytes (\d+)-\d+/(?:\d+|\*)", (value or "").strip())
    return int(match.group(1)) if match else None


def _total_from_416(value: str | None) -> int | None:
    match = re.fullmatch(r"bytes \*/(\d+)", (value or "").strip())
    return int(match.group(1)) if match else None


def _fetch_once(url: str, part: Path, progress: bool, size: int | None, hint: str) -> None:
    """One request: resume ``part`` from its current size. Raises _Dropped on a short transfer and
    Mismatch (``part`` deleted) when the server offers or sends other than ``size`` bytes."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"visa-padim/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)  # noqa: S310 (http(s) URL from the user)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # Nothing left to send: the part is already whole (or longer than the file: start over).
            total = _total_from_416(exc.headers.get("Content-Range"))
            if total is not None and have > total:
                part.unlink()
                raise _Dropped(f"{part.name} was longer than the file on the server; restarting") from exc
            return
        if exc.code in (408, 429) or exc.code >= 500:
            raise _Dropped(f"server answered HTTP {exc.code} {exc.reason}") from exc
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}; {hint}") from exc
    with response:
        if have and response.status == 206 and _content_range_start(response.headers.get("Content-Range")) == have:
            mode = "ab"
        else:  # the server ignored the Range header (or answered another range): start from zero
            have, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        if size is not None and total is not None and total != size:
            part.unlink(missing_ok=True)
            raise Mismatch(f"{url}: the server offers {total} bytes, expected {size}")
        with part.open(mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                        desc=part.name.removesuffix(".part"), disable=not progress) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Dropped(f"connection lost ({exc})") from exc
                if not chunk:
                    break
                f.write(chunk)
                bar.update(len(chunk))
                if size is not None and f.tell() > size:  # a server without Content-Length: stop early
                    f.close()
                    part.unlink()
                    raise Mismatch(f"{url}: the server sends more than the expected {size} bytes")
            written = f.tell()
    if total is not None and written < total:
        raise _Dropped(f"connection closed after {written} of {total} bytes")


def fetch(url: str, part: Path, *, size: int | None = None, retries: int = 3, retry_wait: float = 2.0,
          progress: bool = True, hint: str = "check the URL", echo: Callable[[str], None] = lambda _: None) -> None:
    """Download ``url`` into ``part``, resuming what is already there; retry a dropped transfer.

    ``retries`` counts failures in a row: an attempt that added bytes to ``part`` resets the count,
    so a long download over a flaky line keeps going; 0 turns retrying off. ``size``, when given, is
    the file's expected length: a server that offers or sends another raises Mismatch (``part``
    deleted). ``hint`` ends the message of an HTTP client error. Raises DownloadError when the server
    cannot be reached or the transfer keeps failing; ``part`` is kept so that the next call resumes it.
    """
    host = urllib.parse.urlparse(url).netloc or url
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _fetch_once(url, part, progress, size, hint)
            return
        except _Dropped as exc:
            reason = str(exc)
        except urllib.error.URLError as exc:  # refused, DNS failure, unreachable, TLS: before any data
            reason = f"cannot reach {host} ({exc.reason})"
        except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            reason = f"cannot reach {host} ({exc})"
        except ValueError as exc:  # urllib: no scheme, unknown scheme
            raise DownloadError(f"{url}: not a usable URL ({exc})") from exc
        failures = 0 if part.exists() and part.stat().st_size > before else failures + 1
        if retries == 0 or failures > retries:
            break
        wait = retry_wait * 2 ** max(failures - 1, 0)
        echo(f"{reason}; retrying in {wait:.0f} s" + (f" ({failures}/{retries})" if failures else ""))
        time.sleep(wait)
    kept = f"; {part} ({part.stat().st_size} bytes) is kept and the next run resumes it" if part.exists() else ""
    raise DownloadError(f"download failed: {reason}. Check the network connection, or fetch {url} by other means "
                        f"and put it at {part.with_suffix('')}{kept}")


def download_file(url: str, dest: Path, check: Callable[[Path], str | None], *, size: int | None = None,
                  mismatch: type[Exception] = Mismatch, after: str = "; it was deleted", retries: int = 3,
                  retry_wait: float = 2.0, progress: bool = True, hint: str = "check the URL",
                  echo: Callable[[str], None] = lambda _: None) -> Path:
    """Download ``url`` to ``dest``: into ``dest.part`` (resumed if there), then ``check(part)``,
    then an atomic rename to ``dest``; returns ``dest``.

    ``check`` returns None for the expected file, else the one-line reason it is not; the part file
    is then deleted and ``mismatch(reason + after)`` raised, as for a file of other than ``size`` bytes.
    Network failures raise DownloadError (see :func:`fetch`) and keep the part file.
    """
    part = part_path(dest)
    if part.exists():
        echo(f"resuming {part} from {part.stat().st_size} bytes")
    echo(f"downloading {url}")
    try:
        fetch(url, part, size=size, retries=retries, retry_wait=retry_wait, progress=progress, hint=hint, echo=echo)
        got = part.stat().st_size
        problem = (f"{url}: the downloaded file has {got} bytes, expected {size}" if size is not None and got != size
                   else check(part))
    except Mismatch as exc:
        problem = str(exc)
    if problem is not None:
        part.unlink(missing_ok=True)
        raise mismatch(problem + after)
    os.replace(part, dest)
    return dest
