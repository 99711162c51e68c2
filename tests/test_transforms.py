"""Training augmentation: the seeded batch sampler and the exact transforms."""

from __future__ import annotations

import numpy as np

from chromoseg.config import params_from_dict
from chromoseg.data.synth import generate
from chromoseg.train import BatchSampler
from chromoseg.transforms import train_transform


def test_sampler_is_seeded_and_augment_changes_images():
    images, labels, _ = generate(params_from_dict({}).synth, n=12)
    base = {"batch_size": 4, "samples_per_epoch": 8}
    aug = BatchSampler(images, labels, params_from_dict({"train": base}))
    plain = BatchSampler(images, labels, params_from_dict({"train": {**base, "augment": False}}))
    # One epoch at a time: the sampler re-seeds its (shared) augmentation at the start of each.
    runs = [list(aug.epoch(3)), list(aug.epoch(3)), list(plain.epoch(3))]
    for (x0, y0), (x1, y1), (x2, _) in zip(*runs, strict=True):
        assert np.array_equal(x0, x1) and np.array_equal(y0, y1)  # same epoch, same batch
        assert not np.array_equal(x0, x2)  # augmented images differ from the plain ones
    assert not np.array_equal(runs[0][0][0], next(iter(aug.epoch(4)))[0])  # another epoch, other batches


def test_geometric_ops_move_image_and_label_together():
    """Flips and 90-degree rotations only: the label still covers exactly the bright pixels."""
    img = np.zeros((32, 32), np.uint8)
    img[4:10, 3:25] = 100
    lab = (img > 0).astype(np.uint8)
    t = train_transform(seed=1)
    for _ in range(20):
        out = t(image=img, mask=lab)
        np.testing.assert_array_equal(out["mask"] > 0, out["image"] > 40)
