"""torchvision's published ImageNet weight files for the seed's backbones: where they are, where
torch keeps them, and ``padim download weights``, which fetches them only when asked.

The files are checked as ``torch.hub`` checks them (the sha256 starts with the hex digits in the
file name) and against their published size. Nothing here imports torch, so the command line
lists the backbones at once.
"""

from __future__ import annotations

import os
import re
import sys
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..checksums import sha256_of
from ..errors import BackboneError, DownloadError

HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")  # torch.hub's: the hash prefix in a weights file's name


@dataclass(frozen=True)
class WeightsFile:
    """One published weights file: its URL (torchvision's ``Weights.url``) and size in bytes."""

    backbone: str
    url: str
    size: int

    @property
    def name(self) -> str:
        """The file name, as torch caches it."""
        return PurePosixPath(urllib.parse.urlparse(self.url).path).name

    @property
    def hash_prefix(self) -> str:
        """The leading hex digits of the file's sha256 that its name carries."""
        return hash_prefix(self.name)


# ResNet18_Weights.IMAGENET1K_V1 and Wide_ResNet50_2_Weights.IMAGENET1K_V1 (tests pin the URLs
# against torchvision's and the sizes against its rounded ``_file_size``)
TORCHVISION_WEIGHTS: dict[str, WeightsFile] = {
    "resnet18": WeightsFile("resnet18", "https://download.pytorch.org/models/resnet18-f37072fd.pth", 46_830_571),
    "wide_resnet50_2": WeightsFile("wide_resnet50_2", "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
                                   138_223_492),
}


def hash_prefix(name: str) -> str:
    """The hash prefix in a file name (``resnet18-f37072fd.pth`` -> ``f37072fd``), '' without one."""
    match = HASH_REGEX.search(name)
    return match.group(1) if match else ""


def weights_file(backbone: str) -> WeightsFile:
    """The catalog entry of ``backbone``; BackboneError when it has no published weights file."""
    try:
        return TORCHVISION_WEIGHTS[backbone]
    except KeyError:
        raise BackboneError(f"{backbone!r} has no torchvision weights file to download; choose one of "
                            f"{', '.join(TORCHVISION_WEIGHTS)}") from None


def hub_dir() -> Path:
    """torch.hub's cache folder (``torch.hub.get_dir()``), found without importing torch when it
    is not imported yet: ``$TORCH_HOME/hub``, ``$TORCH_HOME`` defaulting to ``$XDG_CACHE_HOME/torch``."""
    if "torch" in sys.modules:  # honours torch.hub.set_dir()
        return Path(sys.modules["torch"].hub.get_dir())
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(home)) / "hub"


def checkpoints_dir() -> Path:
    """Where torch caches downloaded weights: ``<hub dir>/checkpoints``."""
    return hub_dir() / "checkpoints"


def cached_path(backbone: str) -> Path:
    """Where the backbone's weights file is looked for by default (and downloaded to)."""
    return checkpoints_dir() / weights_file(backbone).name


def mirrored(url: str, mirror: str | None) -> str:
    """``url`` with its scheme and host replaced by ``mirror`` (``http(s)://host[:port][/prefix]``;
    a prefix goes before the URL's path). ValueError for a mirror that is not such a URL."""
    if not mirror:
        return url
    parts = urllib.parse.urlparse(mirror)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"{mirror!r} is not a mirror URL like https://host[:port][/path]")
    return mirror.rstrip("/") + urllib.parse.urlparse(url).path


def file_problem(path: Path, entry: WeightsFile, source: str) -> str | None:
    """None when ``path`` is ``entry``'s file (its size, and its sha256 starting with the prefix in
    its name), else why not, naming ``source`` (the URL or the file)."""
    size = path.stat().st_size
    if size != entry.size:
        return f"{source}: the file has {size} bytes, expected {entry.size}"
    actual = sha256_of(path)
    if not actual.startswith(entry.hash_prefix):
        return f"{source}: the file has sha256 {actual}, which does not start with {entry.hash_prefix} (the hash " \
               "in its name)"
    return None


def download_weights(backbone: str, cache: Path | None = None, mirror: str | None = None, *, retries: int = 3,
                     retry_wait: float = 2.0, progress: bool = True,
                     echo: Callable[[str], None] = lambda _: None) -> Path:
    """Make ``cache`` (default: torch's checkpoints folder) hold ``backbone``'s checked weights file;
    returns its path. A file already there that checks out is kept (nothing is fetched); one that
    does not is deleted and fetched again. A download is resumed, checked, then renamed into place;
    a mismatch deletes it. Raises DownloadError (network, server, disk, size or hash mismatch)."""
    from ..fetch import download_file  # tqdm and urllib's HTTP client: only for a download

    entry = weights_file(backbone)
    cache = Path(cache) if cache is not None else checkpoints_dir()
    dest = cache / entry.name
    url = mirrored(entry.url, mirror)
    try:
        if dest.is_file():
            problem = file_problem(dest, entry, str(dest))
            if problem is None:
                echo(f"{dest}: already there and checked; nothing to do")
                return dest
            echo(f"{problem}; deleting it and downloading again")
            dest.unlink()
        cache.mkdir(parents=True, exist_ok=True)
        return download_file(url, dest, lambda part: file_problem(part, entry, url), size=entry.size,
                             retries=retries, retry_wait=retry_wait, progress=progress,
                             hint="check the mirror (--mirror)" if mirror else "check the URL", echo=echo,
                             after="; it was deleted. Run again; if this repeats, the server serves another file")
    except OSError as exc:  # local disk: full, read-only, permissions
        raise DownloadError(f"{exc.filename or cache}: {exc.strerror or exc}") from exc
