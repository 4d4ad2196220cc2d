"""Data sets in folders: the MVTec AD layout (``train/good``, ``test/<defect>``,
``ground_truth/<defect>/*_mask.png``) and the plain folder layout (the same without the ``_mask``
suffix requirement), and the image file names both accept."""

from __future__ import annotations

import logging
from pathlib import Path

from .samples import DatasetError, Sample, Split

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image_name(path: Path) -> bool:
    """An image suffix (any case) and not hidden: hidden files are macOS '._' sidecars, thumbnails
    or this tool's own temporary files."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; other files are skipped with a warning."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images = [p for p in files if is_image_name(p)]
    skipped = [p.name for p in files if p not in images]
    if skipped:
        shown = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        logger.warning("%s: skipped %d file(s) that are not images or are hidden: %s", folder, len(skipped), shown)
    return images


def is_mvtec(root: Path, category: str) -> bool:
    """True when ``root/category`` has ``train/good`` and ``ground_truth``."""
    base = root / category
    return (base / "train" / "good").is_dir() and (base / "ground_truth").is_dir()


def is_folder(root: Path, category: str) -> bool:
    """True when ``root/category`` has ``train/good`` and ``test``."""
    base = root / category
    return (base / "train" / "good").is_dir() and (base / "test").is_dir()


def _find_mask(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask", stem):
        for suffix in IMAGE_SUFFIXES:
            p = folder / f"{name}{suffix}"
            if p.is_file():
                return p
    return None


def load_folder(root: Path, category: str, layout: str = "folder") -> Split:
    """Load ``train/good`` for training and every ``test/<defect>`` folder for testing.

    Masks are looked up in ``ground_truth/<defect>/`` (or ``masks/<defect>/``) as ``<stem>_mask.*``
    or ``<stem>.*``.
    """
    base = root / category
    if not (base / "train" / "good").is_dir():
        raise DatasetError(f"{base / 'train' / 'good'}: folder not found; normal training images go there")
    train = [Sample(p, 0) for p in list_images(base / "train" / "good")]
    if not train:
        raise DatasetError(f"{base / 'train' / 'good'}: no training images; put normal images there "
                           f"({', '.join(IMAGE_SUFFIXES)})")
    test_dir = base / "test"
    if not test_dir.is_dir():
        raise DatasetError(f"{test_dir}: folder not found")
    test = []
    for defect_dir in sorted(d for d in test_dir.iterdir() if d.is_dir()):
        defect = defect_dir.name
        mask_dirs = [base / "ground_truth" / defect, base / "masks" / defect]
        for p in list_images(defect_dir):
            if defect == "good":
                test.append(Sample(p, 0))
                continue
            mask = next((m for d in mask_dirs if (m := _find_mask(d, p.stem))), None)
            test.append(Sample(p, 1, (defect,), mask))
    if not test:
        raise DatasetError(f"{test_dir}: no test images")
    return Split(train, test, layout, "train/test folders")
