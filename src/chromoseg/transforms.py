"""Seeded albumentations 2.x pipelines for training."""

from __future__ import annotations

import albumentations as A


def train_transform(seed: int, enabled: bool = True) -> A.Compose:
    """Geometric + photometric augmentation for (H, W) uint8 images and their label masks.

    Labels follow the geometric ops with nearest-neighbour interpolation; photometric ops touch the
    image only. Border fill is 0 for both (black background, class background).

    Photometric ops are only those that keep the label where the image says it is: contrast (a
    grey scale factor, undone by the per-image normalisation) and zero-mean noise. Gamma, blur and
    brightness offsets move the visible edge off the label outline (the label is a fixed contour
    level of the image, see `chromoseg.data.synth`); trained with them, the network learns a fuzzy
    edge. The generator already varies blur, camera response and grey per image consistently.

    Geometric ops are flips and 90-degree rotations only, which are exact: an affine warp resamples
    the image bilinearly and the label by nearest neighbour, which puts the label up to half a pixel
    off the warped image's edge (and the generator varies pose and scale exactly already).
    """
    if not enabled:
        return A.Compose([], seed=seed)
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.25, p=0.5),
            A.GaussNoise(std_range=(0.005, 0.02), p=0.3),
        ],
        seed=seed,
    )
