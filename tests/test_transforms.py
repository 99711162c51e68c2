"""Training augmentation: the per-chromosome grey change and the seeded batch sampler."""

from __future__ import annotations

import numpy as np
import pytest

from chromoseg.config import params_from_dict
from chromoseg.data.synth import generate
from chromoseg.train import BatchSampler
from chromoseg.transforms import CHROMOSOME_GREY_RANGE, chromosome_grey


def _crossing() -> tuple[np.ndarray, np.ndarray]:
    """A hand-made pair: A a horizontal bar (grey 60), B a vertical bar (grey 90), overlap 140."""
    lab = np.zeros((64, 64), np.uint8)
    lab[28:36, 8:56] = 1
    lab[8:56, 28:36] += 2
    grey = np.array([0, 60, 90, 140], np.uint8)
    return grey[lab], lab


def test_chromosome_grey_scales_one_chromosome_and_its_overlap():
    img, lab = _crossing()
    seen = set()
    for seed in range(40):
        out = chromosome_grey(img, lab, np.random.default_rng(seed))
        # Deterministic for a seed; the background a few pixels away and the label are untouched.
        assert np.array_equal(out, chromosome_grey(img, lab, np.random.default_rng(seed)))
        far = np.ones_like(lab, bool)
        far[24:40, 4:60] = far[4:60, 24:40] = False
        assert np.array_equal(out[far], img[far])
        # Inside (2 px from the edges) one chromosome and the overlap change by the same factor k.
        ka = out[30:34, 12:22].astype(float) / 60
        kb = out[12:22, 30:34].astype(float) / 90
        ko = out[30:34, 30:34].astype(float) / 140
        a_changed = abs(ka.mean() - 1) > abs(kb.mean() - 1)
        k, other = (ka, kb) if a_changed else (kb, ka)
        assert np.allclose(other, 1.0, atol=0.02)
        assert np.allclose(ko, k.mean(), atol=0.02) and np.allclose(k, k.mean(), atol=0.02)
        assert 1 / CHROMOSOME_GREY_RANGE - 0.02 <= k.mean() <= CHROMOSOME_GREY_RANGE + 0.02
        seen.add(("A" if a_changed else "B", k.mean() > 1))
    assert len(seen) == 4  # both chromosomes, brighter and darker


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_sampler_is_seeded_and_p0_leaves_images_alone(p):
    images, labels, _ = generate(params_from_dict({}).synth, n=12)
    base = {"train": {"batch_size": 4, "samples_per_epoch": 8}}
    plain = BatchSampler(images, labels, params_from_dict(base))
    grey = BatchSampler(
        images, labels, params_from_dict({"train": {**base["train"], "chromosome_grey_p": p}})
    )
    # One epoch at a time: the sampler re-seeds its (shared) augmentation at the start of each.
    runs = [list(plain.epoch(3)), list(grey.epoch(3)), list(grey.epoch(3))]
    for (x0, y0), (x1, y1), (x2, y2) in zip(*runs, strict=True):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)  # same epoch, same batch
        assert np.array_equal(y0, y1)  # the labels never change
        assert np.array_equal(x0, x1) is (p == 0.0)
