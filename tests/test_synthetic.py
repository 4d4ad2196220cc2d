"""padim.datasets.synthetic: defects pasted into normal images, with exact masks."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import texture
from padim.datasets.synthetic import KINDS, paste_defect


@pytest.mark.parametrize("kind", KINDS)
def test_a_pasted_defect_changes_exactly_its_mask(kind):
    rng = np.random.default_rng(1)
    image, donor = texture(rng, 96), texture(rng, 80)  # the donor of another size is resized
    out, mask = paste_defect(image, kind, np.random.default_rng(2), donor=donor)
    assert out.shape == image.shape and out.dtype == np.uint8 and mask.shape == image.shape[:2]
    changed = (out != image).any(axis=2)
    assert mask.any() and not (changed & ~mask).any()  # nothing outside the mask changes
    assert changed[mask].mean() > 0.5  # and most of the mask does
    again, _ = paste_defect(image, kind, np.random.default_rng(2), donor=donor)
    assert np.array_equal(out, again)  # a seed fixes it


def test_defects_are_sized_by_the_shorter_side_and_a_bad_kind_is_named():
    rng = np.random.default_rng(3)
    small = [paste_defect(texture(rng, 64), "blob", np.random.default_rng(s))[1].mean() for s in range(20)]
    large = [paste_defect(texture(rng, 192), "blob", np.random.default_rng(s))[1].mean() for s in range(20)]
    assert np.mean(small) == pytest.approx(np.mean(large), rel=0.25)  # about the same share (pixel rounding)
    with pytest.raises(ValueError, match="kind"):
        paste_defect(texture(rng), "crack", rng)
