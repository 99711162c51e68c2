"""Synthetic generator: determinism, chunking, label properties, file format."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import h5py
import numpy as np
import pytest

from chromoseg.config import SynthConfig
from chromoseg.data import synth
from chromoseg.data.io import KEY_RAW, SOURCE_KEY, read_dataset
from chromoseg.data.synth import generate, synthesize_to_file
from chromoseg.data.validate import check_labels

CFG = SynthConfig(n_images=64, workers=1)


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return generate(CFG)


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_shapes_and_dtypes(batch):
    images, labels, groups = batch
    assert images.shape == labels.shape == (64, 88, 88)
    assert images.dtype == labels.dtype == np.uint8
    assert groups.shape == (64,) and groups.dtype == np.int32
    assert groups.min() >= 0 and groups.max() < CFG.n_sources


def test_same_seed_same_file_bytes(tmp_path):
    a = synthesize_to_file(CFG, out=tmp_path / "a.h5", n=20)
    b = synthesize_to_file(CFG, out=tmp_path / "b.h5", n=20)
    assert _md5(a) == _md5(b)
    c = synthesize_to_file(replace(CFG, seed=CFG.seed + 1), out=tmp_path / "c.h5", n=20)
    assert _md5(a) != _md5(c)


def test_chunked_equals_one_shot(batch):
    images, labels, groups = batch
    parts = [generate(CFG, n=16, start=s) for s in (0, 16, 32, 48)]
    for k, whole in enumerate((images, labels, groups)):
        assert np.array_equal(np.concatenate([p[k] for p in parts]), whole)
    # A single image in the middle depends only on (seed, index).
    one = generate(CFG, n=1, start=37)
    assert np.array_equal(one[0][0], images[37]) and np.array_equal(one[1][0], labels[37])


def test_process_pool_matches_single_process(monkeypatch):
    monkeypatch.setattr(synth, "_CHUNK", 8)  # small chunks, so the pool path runs on few images
    n = 40
    single = generate(replace(CFG, workers=1), n=n)
    pooled = generate(replace(CFG, workers=2), n=n)
    for a, b in zip(single, pooled, strict=True):
        assert np.array_equal(a, b)


def test_labels_are_exact_and_plausible(batch):
    images, labels, _ = batch
    assert labels.max() <= 3
    for lab in labels:
        assert (lab == 1).any() or (lab == 3).any()
        assert (lab == 2).any() or (lab == 3).any()
    # Intensities add where chromosomes overlap: overlap pixels are much brighter than single ones.
    single = images[(labels == 1) | (labels == 2)].mean()
    overlap = images[labels == 3].mean()
    assert overlap > 1.4 * single
    # Background is dark, chromosomes about 70 grey.
    assert images[labels == 0].mean() < 5 and 50 < single < 95
    # Objects stay inside the frame: no label on the outermost pixel ring.
    ring = np.ones((88, 88), bool)
    ring[1:-1, 1:-1] = False
    assert not labels[:, ring].any()


def test_some_pairs_only_touch(batch):
    _, labels, _ = batch
    has_overlap = (labels == 3).any(axis=(1, 2))
    assert 0 < (~has_overlap).sum() < len(labels) // 2


def test_labels_pass_validation(batch):
    images, labels, _ = batch
    _, _, keep, report = check_labels(images, labels, policy="none")
    assert len(keep) == len(labels)
    assert report["affected_images"] == 0


def test_sources_repeat_across_images():
    groups = generate(replace(CFG, n_sources=5), n=40)[2]
    assert len(np.unique(groups)) <= 5
    assert np.bincount(groups).max() > 1


def test_file_format(tmp_path):
    path = synthesize_to_file(CFG, out=tmp_path / "sub" / "s.h5", n=8)
    with h5py.File(path, "r") as f:
        assert f[KEY_RAW].shape == (8, 88, 88, 2) and f[KEY_RAW].dtype == np.uint8
        assert f[SOURCE_KEY].shape == (8,)
    ds = read_dataset(path)
    images, labels, groups = generate(CFG, n=8)
    assert np.array_equal(ds.images, images) and np.array_equal(ds.labels, labels)
    assert np.array_equal(ds.source_ids, groups)
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.h5"]  # no temp file left


def test_bad_n_is_an_error():
    with pytest.raises(ValueError, match="n must be >= 1"):
        generate(CFG, n=0)


@pytest.mark.parametrize(("soft", "sigma", "gamma"), [(0.8, 1.1, 1.0), (1.6, 1.7, 0.85), (1.2, 1.4, 1.15)])
def test_edge_offset_puts_the_outline_at_the_edge_level(soft, sigma, gamma):
    # Numerical reference: the soft shoulder (linear ramp over `soft` px) blurred by a Gaussian on a
    # fine grid, through the camera response; its level at the computed offset is EDGE_LEVEL.
    step = 0.001
    x = np.arange(-12.0, 12.0, step)
    ramp = np.clip(0.5 - x / soft, 0.0, 1.0)
    k = np.exp(-0.5 * (np.arange(-8.0, 8.0 + step / 2, step) / sigma) ** 2)
    blurred = np.convolve(ramp, k / k.sum(), mode="same") ** gamma
    off = synth.edge_offset(synth.EDGE_LEVEL, soft, sigma, gamma)
    assert np.interp(off, x, blurred) == pytest.approx(synth.EDGE_LEVEL, abs=2e-3)
    assert off > 0  # a level below one half lies outside the shoulder centre
    assert synth.edge_offset(0.5, soft, sigma, 1.0) == pytest.approx(0.0, abs=1e-5)


def test_outline_sits_at_the_edge_level_in_rendered_images():
    # Grey of the pixels just inside and just outside the outline, relative to the ring 2-3 px
    # inside: EDGE_LEVEL lies between them in every image (the label follows the image).
    images, labels, _ = generate(replace(SynthConfig(), workers=1), n=40)
    from scipy import ndimage as ndi

    checked = 0
    for img, lab in zip(images.astype(float), labels, strict=True):
        fg = lab > 0
        sd = ndi.distance_transform_edt(fg) - ndi.distance_transform_edt(~fg)
        far_ov = ~ndi.binary_dilation(lab == 3, iterations=4)
        sel = [(sd >= 2) & (sd <= 3) & far_ov, (sd == 1) & far_ov, (sd == -1) & far_ov]
        if min(m.sum() for m in sel) < 20:
            continue
        inner, just_in, just_out = (img[m].mean() for m in sel)
        assert just_out / inner < synth.EDGE_LEVEL < just_in / inner, (just_in / inner, just_out / inner)
        checked += 1
    assert checked >= 30
