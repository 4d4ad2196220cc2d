"""Data sets: find the images of a category on disk and split them into train and test."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DatasetError
from ..lazy import lazy_attributes
from .folders import is_folder, is_mvtec, list_images, load_folder
from .samples import Sample, Split
from .visa import is_visa, load_visa

if TYPE_CHECKING:
    from .checks import check_split
    from .images import ImageFiles, image_size, read_image, read_mask

LAYOUTS = ("auto", "visa", "mvtec", "folder")

__all__ = [
    "LAYOUTS", "DatasetError", "ImageFiles", "Sample", "Split", "check_split", "detect_layout", "image_size",
    "list_images", "load_split", "read_image", "read_mask",
]
# decoding needs numpy and Pillow: loaded on first use, so the command line starts fast
__getattr__ = lazy_attributes(__name__, {"check_split": ".checks", **dict.fromkeys(
    ("ImageFiles", "image_size", "read_image", "read_mask"), ".images")})


def detect_layout(root: Path, category: str) -> str:
    """Name the layout of ``root/category``: 'visa', 'mvtec' or 'folder'."""
    if not (root / category).is_dir():
        raise DatasetError(
            f"{root / category}: category folder not found. Point DATA_ROOT at the folder that "
            f"holds '{category}/' (for VisA, the folder with split_csv/)"
        )
    for name, test in (("visa", is_visa), ("mvtec", is_mvtec), ("folder", is_folder)):
        if test(root, category):
            return name
    if not any((root / category).iterdir()):
        raise DatasetError(f"{root / category}: the category folder is empty; put the data set's images there "
                           "(VisA Data/Images/, or train/good + test/ folders)")
    raise DatasetError(
        f"{root / category}: not a known layout (VisA Data/Images/, MVTec AD train/good + "
        "ground_truth/, or plain train/good + test/)"
    )


def load_split(root: str | Path, category: str, split: str = "1cls", layout: str = "auto") -> Split:
    """Load the train/test split of one category.

    ``split`` applies to VisA ('1cls' official, 'seed' the seed's protocol); the MVTec and folder
    layouts have a single fixed split. ``layout='auto'`` detects the layout from the folders.
    Masks are checked against their images (see :func:`check_split`).
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(root, category)
    from .checks import check_split

    if layout == "visa":
        return check_split(load_visa(root, category, split))
    return check_split(load_folder(root, category, layout))
