"""Shape measurements on masks and grey images, shared by the labelme reader, the scale estimate
and the post-processing: chromosome width, border level, foreground."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

MIN_COMPONENT = 0.1  # components smaller than this fraction of the largest are not chromosomes


class NoForegroundError(ValueError):
    """The image shows no chromosome to measure (no contrast, or nothing but specks)."""


def border_pixels(image: np.ndarray) -> np.ndarray:
    """The outermost rows and columns of an (H, W) image, flattened (for its background level)."""
    return np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])


def estimate_width(mask: np.ndarray) -> float:
    """Chromosome width in px of an (H, W) bool mask: twice the mean medial-axis distance, minus 1.

    Ridge pixels are the 3x3 local maxima of the Euclidean distance transform that are at least
    half of its maximum (this skips the thin branches near the ends). The `- 1` corrects the
    discrete distance (centre pixel to the first background pixel) to the pixel count across.
    """
    if not mask.any():
        return float("nan")
    dt = ndi.distance_transform_edt(np.pad(mask, 1))
    ridge = (dt >= ndi.maximum_filter(dt, size=3)) & (dt >= 0.5 * dt.max()) & (dt > 0)
    return float(2.0 * dt[ridge].mean() - 1.0)


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """(H, W) grey -> bool mask of the objects: Otsu threshold, polarity from the border; components
    under `MIN_COMPONENT` of the largest dropped, holes filled."""
    from skimage.filters import threshold_otsu

    g = np.asarray(image, dtype=np.float32)
    if g.ndim != 2:
        raise NoForegroundError(f"expected one (H, W) grey image, got shape {g.shape}")
    if g.size == 0 or float(g.max()) - float(g.min()) < 1e-6:
        raise NoForegroundError("the image is uniform (no contrast), so no chromosome width can be measured")
    t = threshold_otsu(g)
    fg = g <= t if np.median(border_pixels(g)) > t else g > t
    lab, n = ndi.label(fg)
    if n > 1:
        sizes = ndi.sum(fg, lab, range(1, n + 1))
        fg = np.isin(lab, 1 + np.flatnonzero(sizes >= MIN_COMPONENT * sizes.max()))
    return ndi.binary_fill_holes(fg)


def image_width(image: np.ndarray) -> float:
    """Chromosome width in px measured on the grey image: `estimate_width` of `foreground_mask`."""
    fg = foreground_mask(image)
    if fg.all():
        raise NoForegroundError("the whole image is foreground, so no chromosome width can be measured")
    return estimate_width(fg)
