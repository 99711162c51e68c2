"""Image scale from the grey image alone: how far to resize an image so its chromosomes are as wide as
the training images' (`chromoseg predict --scale auto`, `evaluate-external --width-from image`).

The network was trained at the 88 x 88 LowRes scale. Real microscope crops come at other scales (the
real-dev images are about twice as large), and an unlabelled image has no polygons to measure. Here
the chromosome width is measured on the image itself: the foreground is the brighter side of an Otsu
threshold (the darker side when the border is bright), components under a tenth of the largest are
dropped, holes are filled, and `estimate_width` (the labelme importer's medial-axis width) is taken
on that mask. The scale is `REFERENCE_WIDTH / width`, where `REFERENCE_WIDTH` is the median of the
same measurement on the default synthetic set, so the estimator's own biases (threshold level, the
wider ridge at a crossing) cancel.

Accuracy (BENCHMARKS E27): on the synthetic test split the measurement divided by the label width
has a spread (sd) of 7 %; on the ten real-dev images the scale is within -20 % / +7 % of the one
derived from the hand-drawn polygons (median 0 %).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from chromoseg.data.labelme import estimate_width

# Median `image_width` of the default synthetic set (`chromoseg synth`, 2,487 test-split images at
# 2026-12-05; tests/test_scale.py checks it against the generator). Its label width median is 11.3 px.
REFERENCE_WIDTH = 10.2
MIN_COMPONENT = 0.1  # components smaller than this fraction of the largest are not chromosomes


class ScaleError(ValueError):
    """The image shows no chromosome to measure (no contrast, or nothing but specks)."""


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """(H, W) grey -> bool mask of the objects: Otsu threshold, polarity from the border."""
    from skimage.filters import threshold_otsu

    g = np.asarray(image, dtype=np.float32)
    if g.ndim != 2:
        raise ScaleError(f"expected one (H, W) grey image, got shape {g.shape}")
    if g.size == 0 or float(g.max()) - float(g.min()) < 1e-6:
        raise ScaleError("the image is uniform (no contrast), so no chromosome width can be measured")
    t = threshold_otsu(g)
    border = np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])
    fg = g <= t if np.median(border) > t else g > t
    lab, n = ndi.label(fg)
    if n > 1:
        sizes = ndi.sum(fg, lab, range(1, n + 1))
        fg = np.isin(lab, 1 + np.flatnonzero(sizes >= MIN_COMPONENT * sizes.max()))
    return ndi.binary_fill_holes(fg)


def image_width(image: np.ndarray) -> float:
    """Chromosome width in px measured on the grey image (see the module docstring)."""
    fg = foreground_mask(image)
    if fg.all():
        raise ScaleError("the whole image is foreground, so no chromosome width can be measured")
    return estimate_width(fg)


def auto_scale(image: np.ndarray, reference: float = REFERENCE_WIDTH) -> float:
    """Resize factor that brings the image's chromosomes to the training width."""
    width = image_width(image)
    if not np.isfinite(width) or width < 1.0:
        raise ScaleError(
            f"measured chromosome width {width:.2f} px is too small to use; pass a numeric scale instead"
        )
    return float(reference / width)
