"""Checks of a loaded split that need the files themselves: masks must match their images pixel for
pixel; anomalies without a mask are accepted with a warning (they count in image metrics only)."""

from __future__ import annotations

import logging

from .images import image_size
from .samples import DatasetError, Split

logger = logging.getLogger(__name__)


def check_split(split: Split) -> Split:
    """Refuse a mask whose size differs from its image; warn about anomalous images without a mask.

    A mask of another size is refused rather than resized: scaled ground truth is silently wrong
    at the defect's border and often a sign that the mask belongs to another image.
    """
    for s in split.test:
        if s.mask is None:
            continue
        mask_hw, image_hw = image_size(s.mask, upright=False), image_size(s.path)
        if mask_hw != image_hw:
            raise DatasetError(
                f"{s.mask}: mask is {mask_hw[1]}x{mask_hw[0]} px but its image {s.path} is "
                f"{image_hw[1]}x{image_hw[0]}; masks must match their image pixel for pixel: fix the mask "
                "or remove it (the image then counts in image metrics only)"
            )
    unmasked = [s.path for s in split.test if s.label == 1 and s.mask is None]
    if unmasked:
        shown = ", ".join(str(p) for p in unmasked[:3]) + (" ..." if len(unmasked) > 3 else "")
        logger.warning("%d anomalous test image(s) without a mask (%s): they count in image metrics, "
                       "not in pixel metrics", len(unmasked), shown)
    return split
