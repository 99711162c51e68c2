"""Seeded albumentations 2.x pipelines for training."""

from __future__ import annotations

import albumentations as A
import cv2


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
