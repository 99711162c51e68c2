"""Label checks on hand-made arrays with exact expected results."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from chromoseg.data.io import DataError
from chromoseg.data.validate import check_labels, find_problems

CLEAN = np.array(
    [
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 1, 0, 0],
        [0, 1, 1, 3, 3, 3, 1, 0, 0],
        [0, 1, 1, 3, 3, 3, 1, 0, 0],
        [0, 2, 2, 2, 2, 2, 2, 0, 0],
        [0, 2, 2, 2, 2, 2, 2, 0, 0],
        [0, 2, 2, 2, 2, 2, 2, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
    ],
    np.uint8,
)


def _broken() -> tuple[np.ndarray, np.ndarray]:
    """Three images: clean, one with an invalid value, one with a speck and an isolated hole."""
    labels = np.stack([CLEAN, CLEAN, CLEAN]).copy()
    labels[1, 2, 1] = 7  # invalid, inside chromosome A
    labels[2, 0, 8] = 2  # speck: a 2-px component of class 2 in the background
    labels[2, 1, 7] = 2  # its diagonal neighbour, so neither pixel is isolated
    labels[2, 5, 3] = 0  # a background hole inside B: isolated (differs from all neighbours)
    images = np.arange(labels.size, dtype=np.uint8).reshape(labels.shape)
    return images, labels


def test_find_problems_exact():
    _, labels = _broken()
    p = find_problems(labels)
    assert list(zip(*np.nonzero(p["invalid"]), strict=True)) == [(1, 2, 1)]
    assert list(zip(*np.nonzero(p["speck"]), strict=True)) == [(2, 0, 8), (2, 1, 7)]
    assert list(zip(*np.nonzero(p["isolated"]), strict=True)) == [(2, 5, 3)]


def test_repair_restores_clean_labels():
    images, labels = _broken()
    out_images, out_labels, keep, report = check_labels(images, labels, policy="repair")
    assert np.array_equal(out_labels, np.stack([CLEAN] * 3))
    assert np.array_equal(out_images, images)
    assert keep.tolist() == [0, 1, 2]
    assert report == {
        "n_images": 3,
        "invalid_images": 1,
        "invalid_pixels": 1,
        "speck_images": 1,
        "speck_pixels": 2,
        "isolated_images": 1,
        "isolated_pixels": 1,
        "affected_images": 2,
        "dropped_images": 0,
        "repaired_pixels": 4,
        "kept_images": 3,
    }
    json.dumps(report)  # flat and JSON-able
    assert labels[1, 2, 1] == 7  # the input is not modified


def test_drop_removes_affected_images():
    images, labels = _broken()
    out_images, out_labels, keep, report = check_labels(images, labels, policy="drop")
    assert keep.tolist() == [0]
    assert np.array_equal(out_labels, CLEAN[None]) and np.array_equal(out_images, images[:1])
    assert report["dropped_images"] == 2 and report["kept_images"] == 1 and report["repaired_pixels"] == 0


def test_none_reports_but_refuses_invalid_values():
    images, labels = _broken()
    with pytest.raises(DataError, match="'drop' or 'repair'"):
        check_labels(images, labels, policy="none")
    ok = labels.copy()
    ok[1, 2, 1] = 1
    _, out_labels, keep, report = check_labels(images, ok, policy="none")
    assert np.array_equal(out_labels, ok) and keep.tolist() == [0, 1, 2]
    assert report["speck_pixels"] == 2 and report["isolated_pixels"] == 1 and report["repaired_pixels"] == 0


def test_majority_ties_and_edges():
    # A lone pixel of class 3 in the corner: its 3 in-frame neighbours vote 1, 1, 2 -> 1.
    lab = np.zeros((1, 5, 5), np.uint8)
    lab[0, 0, 1] = 1
    lab[0, 1, 1] = 1
    lab[0, 1, 0] = 2
    lab[0, 0, 0] = 3
    _, out, _, _ = check_labels(lab.copy(), lab, policy="repair", max_speck=0)
    assert out[0, 0, 0] == 1


def test_bad_policy_lists_choices():
    images, labels = _broken()
    with pytest.raises(ValueError, match="'none', 'drop', 'repair'"):
        check_labels(images, labels, policy="fix")  # type: ignore[arg-type]


def test_fast_on_a_large_array():
    rng = np.random.default_rng(0)
    labels = np.zeros((2000, 88, 88), np.uint8)
    labels[:, 20:60, 30:42] = 1
    labels[:, 35:47, 20:60] |= 2
    labels[rng.integers(0, 2000, 300), rng.integers(0, 88, 300), rng.integers(0, 88, 300)] = 2
    t = time.perf_counter()
    _, out, _, report = check_labels(labels.copy(), labels, policy="repair")
    assert time.perf_counter() - t < 10
    assert report["speck_pixels"] > 0
    assert find_problems(out)["speck"].sum() == 0
