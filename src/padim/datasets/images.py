"""Image and mask decoding, resizing, and a torch Dataset that feeds the backbone uint8 tensors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .samples import DatasetError

ImageSource = str | Path | Image.Image | np.ndarray


def _open(path: Path, draft_side: int | None = None) -> Image.Image:
    try:
        image = Image.open(path)
        if draft_side is not None and image.format == "JPEG":
            image.draft("RGB", (draft_side, draft_side))
        image.load()
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found") from exc
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"{path}: refused, too many pixels ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot decode image ({exc}); replace or remove the file") from exc
    return image


def read_image(source: ImageSource, size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image to RGB with its EXIF orientation applied, optionally resized to (h, w).

    JPEGs are decoded at a reduced DCT scale when that still covers ``size`` (much faster, and an
    anti-aliasing step of its own); the final resize is bilinear.
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = Image.fromarray(source)
    else:
        image = _open(Path(source), max(size) if size is not None else None)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit sensors: map 0..65535 onto 0..255 rather than clipping as PIL's convert() does
        array = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
    image = image.convert("RGB")
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return image


def read_mask(path: Path | None, size: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask as bool (h, w): anomaly wherever the stored value is not 0.

    ``path=None`` gives an all-False mask (normal image). Resizing uses nearest neighbour so class
    ids are never blended.
    """
    if path is None:
        return np.zeros(size, dtype=bool)
    mask = _open(Path(path))
    if mask.size != (size[1], size[0]):
        mask = mask.resize((size[1], size[0]), Image.Resampling.NEAREST)
    array = np.asarray(mask)
    if array.ndim == 3:
        array = array.max(axis=2)
    return array != 0


def to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 (3, h, w) tensor from an RGB PIL image."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class ImageFiles(torch.utils.data.Dataset):
    """Images (paths, PIL images or HxWx3 uint8 arrays) decoded and resized to uint8 (3, h, w)."""

    def __init__(self, sources: Sequence[ImageSource], size: tuple[int, int]):
        self.sources = list(sources)
        self.size = size

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_tensor(read_image(self.sources[index], self.size))
