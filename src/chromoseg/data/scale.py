"""Image scale from the grey image alone: how far to resize an image so its chromosomes are as wide as
the training images' (`chromoseg predict --scale auto`, the server's `scale` param "auto",
`evaluate-external --width-from image`).

The network was trained at the 88 x 88 LowRes scale. Real microscope crops come at other scales (the
real-dev images are about twice as large), and an unlabelled image has no polygons to measure. Here
the chromosome width is measured on the image itself: the foreground is the brighter side of an Otsu
threshold (the darker side when the border is bright), components under a tenth of the largest are
dropped, holes are filled, and `chromoseg.geometry.estimate_width` (the medial-axis width) is
taken on that mask. The scale is `REFERENCE_WIDTH / width`, where `REFERENCE_WIDTH` is the median of the
same measurement on the default synthetic set, so the estimator's own biases (threshold level, the
wider ridge at a crossing) cancel.

Accuracy (BENCHMARKS.md): on the synthetic test split the measurement divided by the label width
has a spread (sd) of 7 %; on the ten real-dev images the scale is within -21 % / +6 % of the one
derived from the hand-drawn polygons (median -1 %).
"""

from __future__ import annotations

import numpy as np

from chromoseg.geometry import NoForegroundError, image_width

# Median `image_width` of the default synthetic set's test split (`chromoseg synth`; tests/test_scale.py
# checks it against the generator). Its label width median is 11.3 px.
REFERENCE_WIDTH = 10.2
AUTO = "auto"  # a scale measured on each image (`parse_scale`)
# The training labels' widths span `SynthConfig.width_range` (10.3-14.3 px) around their median
# 11.3 px; measured on the image that is REFERENCE_WIDTH * (10.3, 14.3) / 11.3, widened by the
# measurement's own spread (sd 7 %). An image whose chromosomes measure inside that band is at a
# scale the network was trained on and is left as it is (a resize would only cost a resample).
LABEL_WIDTH_MEDIAN = 11.3
MEASUREMENT_SPREAD = 0.07
TRAINED_WIDTHS = (
    REFERENCE_WIDTH * 10.3 / LABEL_WIDTH_MEDIAN * (1 - MEASUREMENT_SPREAD),
    REFERENCE_WIDTH * 14.3 / LABEL_WIDTH_MEDIAN * (1 + MEASUREMENT_SPREAD),
)


# The geometry's "nothing to measure" is the scale's error: one except clause catches both.
ScaleError = NoForegroundError


def auto_scale(image: np.ndarray, reference: float = REFERENCE_WIDTH) -> float:
    """Resize factor that brings the image's chromosomes to the training width."""
    width = image_width(image)
    if not np.isfinite(width) or width < 1.0:
        raise ScaleError(
            f"measured chromosome width {width:.2f} px is too small to use; pass a numeric scale instead"
        )
    return float(reference / width)


def parse_scale(value: str | float | None, default: float | str = 1.0) -> float | str:
    """A user's scale: a number > 0 (as text or a number) or ``auto``; None or "" gives `default`."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise ScaleError(f"scale must be a number > 0 or 'auto', got {value!r}") from None
    if not np.isfinite(scale) or scale <= 0:
        raise ScaleError(f"scale must be > 0, got {value}; use 0.5 for images at twice the 88 x 88 scale")
    return scale


def image_scales(images: list[np.ndarray], scale: float | str, names: list[str] | None = None) -> list[float]:
    """One resize factor per image: `scale` itself, or with ``auto`` each image's measured one (1
    when its chromosomes measure inside `TRAINED_WIDTHS`, so images at a training scale stay as they are).

    Raises ScaleError naming the image (`names[i]`, else its index) that cannot be measured.
    """
    if scale != AUTO:
        return [float(scale)] * len(images)
    out = []
    for i, im in enumerate(images):
        try:
            s = auto_scale(im)
            trained = TRAINED_WIDTHS[0] <= REFERENCE_WIDTH / s <= TRAINED_WIDTHS[1]
            out.append(1.0 if trained else s)
        except ScaleError as exc:
            raise ScaleError(f"{names[i] if names else f'image {i}'}: {exc}") from None
    return out


def scaled_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def resize(image: np.ndarray, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """(H, W) uint8 or float32 -> `shape` (rows, cols); bilinear for images, nearest for label maps."""
    from PIL import Image

    if image.shape == shape:
        return image
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), method))
