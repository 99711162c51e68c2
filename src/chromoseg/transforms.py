"""Seeded albumentations 2.x pipelines for training."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

CHROMOSOME_GREY_RANGE = 1.3  # factor in [1 / range, range], log-uniform
CHROMOSOME_GREY_SIGMA = 1.0  # px: the mask is blurred so the grey change follows the optics' edge


def train_transform(seed: int, enabled: bool = True, affine_p: float = 0.5) -> A.Compose:
    """Geometric + photometric augmentation for (H, W) uint8 images and their label masks.

    Labels follow the geometric ops with nearest-neighbour interpolation; photometric ops touch the
    image only. Border fill is 0 for both (black background, class background).

    Photometric ops are only those that keep the label where the image says it is: contrast (a
    grey scale factor, undone by the per-image normalisation) and zero-mean noise. Gamma, blur and
    brightness offsets move the visible edge off the label outline (the label is a fixed contour
    level of the image, see `chromoseg.data.synth`); trained with them, the network learns a fuzzy
    edge. The generator already varies blur, camera response and grey per image consistently.

    The affine warp (probability `affine_p`) is not exact either: bilinear image and nearest-neighbour
    label resampling put the label up to half a pixel off the warped image's edge. Flips and 90-degree
    rotations are exact.
    """
    if not enabled:
        return A.Compose([], seed=seed)
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.Affine(
                scale=(0.85, 1.15),
                rotate=(-30, 30),
                translate_percent=(-0.06, 0.06),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=affine_p,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.25, p=0.5),
            A.GaussNoise(std_range=(0.005, 0.02), p=0.3),
        ],
        seed=seed,
    )


def chromosome_grey(image: np.ndarray, labels4: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One chromosome of the pair (A or B at random, with the overlap) made brighter or darker.

    (H, W) uint8 image and 4-class labels -> (H, W) uint8. The image is multiplied by
    1 + (k - 1) * blur(mask), k log-uniform in [1 / 1.3, 1.3]: a pair whose chromosomes differ in
    grey more than the generator's own range, with the edge change as soft as the optics'. The
    outline stays where the image falls to a fixed fraction of the chromosome's grey, so the label
    still matches the image. The overlap keeps being brighter than either chromosome.
    """
    which = 1 + int(rng.integers(2))
    k = float(np.exp(rng.uniform(-np.log(CHROMOSOME_GREY_RANGE), np.log(CHROMOSOME_GREY_RANGE))))
    mask = ((labels4 == which) | (labels4 == 3)).astype(np.float32)
    field = 1.0 + (k - 1.0) * cv2.GaussianBlur(mask, (0, 0), CHROMOSOME_GREY_SIGMA)
    return np.clip(np.rint(image.astype(np.float32) * field), 0, 255).astype(np.uint8)
