"""What a data set hands to the rest of the tool: labelled image paths, split into train and test."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DatasetError

__all__ = ["NORMAL", "DatasetError", "Sample", "Split"]

NORMAL = "normal"


@dataclass(frozen=True)
class Sample:
    """One image on disk.

    label is 0 for normal and 1 for anomalous; defects lists the defect types (empty for normal);
    mask is the ground-truth mask file, or None (normal images, or anomalies without a mask).
    """

    path: Path
    label: int
    defects: tuple[str, ...] = ()
    mask: Path | None = None

    @property
    def defect_type(self) -> str:
        """Defect types joined by '+', or 'normal'."""
        return "+".join(self.defects) if self.defects else NORMAL


@dataclass
class Split:
    """Training images (normal only) and test images (normal and anomalous) of one category."""

    train: list[Sample]
    test: list[Sample]
    layout: str
    name: str
    notes: list[str] = field(default_factory=list)

    @property
    def has_image_labels(self) -> bool:
        """True when the test set holds both classes, so image-level metrics are defined."""
        labels = {s.label for s in self.test}
        return labels == {0, 1}
