"""Image and mask decoding, resizing, and a data set of images that feeds the backbone uint8 tensors.

Decoding is strict: truncated files, files that are not images and images over Pillow's
decompression-bomb limit are refused with a :class:`DatasetError` naming the file. Images in other
modes (grayscale, palette, RGBA, 16-bit) are converted to RGB.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from ..errors import DatasetError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ImageSource = str | Path | Image.Image | np.ndarray

# the format each suffix promises, to warn when a file's content says otherwise
_SUFFIX_FORMATS = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
    ".webp": "WEBP",
}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")
EXIF_ORIENTATION = 0x0112


# catch_warnings swaps the process's one list of warning filters: images are decoded on several
# threads, so one of them at a time opens a file under its own filters (opening reads the header only)
_FILTERS = threading.Lock()


def _max_pixels() -> int:
    # Pillow's own guard (about 89 Mpx); read at call time so a caller can raise it deliberately
    return int(Image.MAX_IMAGE_PIXELS or 0)


def _open(path: Path, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open and fully decode ``path``; every failure becomes a DatasetError naming the file."""
    try:
        if path.stat().st_size == 0:
            raise DatasetError(f"{path}: empty file (0 bytes); replace or remove it")
        with _FILTERS, warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its limit; refuse the whole range instead
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
        expected = _SUFFIX_FORMATS.get(path.suffix.lower())
        if expected is not None and image.format is not None and image.format != expected:
            logger.warning("%s: the file is a %s image despite its %s suffix; read as %s",
                           path, image.format, path.suffix, image.format)
        if draft is not None:
            draft_jpeg(image, draft)
        image.load()
    except DatasetError:
        raise
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DatasetError(
            f"{path}: refused, more pixels than the decompression-bomb limit of {_max_pixels()} "
            f"({exc}); downscale the image"
        ) from exc
    except PermissionError as exc:
        raise DatasetError(f"{path}: cannot read the file (permission denied)") from exc
    except IsADirectoryError as exc:
        raise DatasetError(f"{path}: is a folder, expected an image file") from exc
    except Exception as exc:  # noqa: BLE001 - a malformed file can make any decoder step fail
        raise DatasetError(f"{path}: cannot decode image ({exc}); replace or remove the file") from exc
    return image


def swaps_sides(image: Image.Image) -> bool:
    """The image's EXIF orientation turns it by 90 degrees: displayed width = stored height."""
    return image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)


def draft_jpeg(image: Image.Image, size: tuple[int, int]) -> None:
    """Before ``image.load()``: let a JPEG decode at a reduced DCT scale (1/2, 1/4 or 1/8) while the
    result still covers the (h, w) target once EXIF-rotated; other formats are left as they are."""
    if image.format == "JPEG":
        h, w = size
        image.draft("RGB", (h, w) if swaps_sides(image) else (w, h))


def _to_rgb(image: Image.Image, name: object, owned: bool = False) -> Image.Image:
    """Apply the EXIF orientation and convert any mode to 8-bit RGB. An ``owned`` image (one this
    module decoded) is changed in place where possible instead of copied: each copy of a decoded
    photo costs about a quarter of its (reduced-scale) decoding."""
    if owned:
        ImageOps.exif_transpose(image, in_place=True)
    else:
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT:
        # 16-bit sensors: map 0..65535 onto 0..255 rather than clipping as PIL's convert() does
        logger.warning("%s: %s image scaled to 8 bits per channel", name, image.mode)
        array = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
    elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        logger.warning("%s: transparency (%s) dropped, colour channels kept", name, image.mode)
    return image if owned and image.mode == "RGB" else image.convert("RGB")


def read_image(source: ImageSource, size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image to RGB with its EXIF orientation applied, optionally resized to (h, w).

    JPEGs are decoded at a reduced DCT scale when that still covers ``size`` (much faster, and an
    anti-aliasing step of its own); the final resize is bilinear.
    """
    if isinstance(source, Image.Image):
        image = _to_rgb(source, "image")
    elif isinstance(source, np.ndarray):
        image = _to_rgb(Image.fromarray(source), "array")
    else:
        path = Path(source)
        image = _open(path, size)
        try:
            image = _to_rgb(image, path, owned=True)
        except Exception as exc:  # noqa: BLE001 - corrupt EXIF or pixel data
            raise DatasetError(f"{path}: cannot convert image ({exc}); replace or remove the file") from exc
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return image


def image_size(path: Path, upright: bool = True) -> tuple[int, int]:
    """(height, width) of an image file as displayed (EXIF rotation applied; as stored without
    ``upright``, how :func:`read_mask` reads a mask), from its header only (a PNG's EXIF may follow
    its pixels: reading it decodes the whole file, which ``upright=False`` never does)."""
    try:
        with _FILTERS, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if upright and swaps_sides(im):
                    w, h = h, w
    except Exception as exc:  # noqa: BLE001 - the full decode later reports it with the same name
        raise DatasetError(f"{path}: cannot read image header ({exc}); replace or remove the file") from exc
    return h, w


def keep_aspect(short_side: int, path: Path, multiple: int = 16) -> tuple[int, int]:
    """(h, w) with the shorter side ``short_side`` and the aspect ratio of the image at ``path``;
    the longer side is rounded to a multiple of ``multiple`` (the backbone's coarsest tap stride)."""
    h, w = image_size(path)
    long = max(multiple, int(round(short_side * max(h, w) / min(h, w) / multiple)) * multiple)
    return (short_side, long) if h <= w else (long, short_side)


def read_mask(path: Path | None, size: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask as bool (h, w): anomaly wherever the stored value is not 0.

    ``path=None`` gives an all-False mask (normal image). Resizing uses nearest neighbour so class
    ids are never blended.
    """
    if path is None:
        return np.zeros(size, dtype=bool)
    mask = _open(Path(path))
    if mask.mode in ("RGBA", "LA", "PA"):
        mask = mask.convert(mask.mode[:-1])  # an opaque alpha channel would mark every pixel
    if mask.size != (size[1], size[0]):
        mask = mask.resize((size[1], size[0]), Image.Resampling.NEAREST)
    array = np.asarray(mask)
    if array.ndim == 3:
        array = array.max(axis=2)
    return array != 0


def to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 (3, h, w) tensor from an RGB PIL image."""
    import torch  # here, not at the top: reading images and masks needs no torch

    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class ImageFiles:
    """Images (paths, PIL images or HxWx3 uint8 arrays) decoded and resized to uint8 (3, h, w): a
    map-style data set for torch's DataLoader."""

    def __init__(self, sources: Sequence[ImageSource], size: tuple[int, int]):
        self.sources = list(sources)
        self.size = size

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_tensor(read_image(self.sources[index], self.size))
