"""Exact metric values on hand-made arrays."""

import numpy as np
import pytest

from chromoseg.labels import canonical_ab, combine_labels, instances_to_labels4, labels_to_instances
from chromoseg.metrics import (
    SegmentationMetrics,
    confusion_per_image,
    ghosh_dice,
    per_image_dice,
    permutation_invariant,
)


def test_ghosh_dice_by_hand():
    # 1 image, 2x4 pixels, 3 classes.
    true = np.array([[[0, 1, 1, 2], [0, 0, 1, 2]]])
    pred = np.array([[[0, 1, 2, 2], [1, 0, 1, 0]]])
    conf = confusion_per_image(true, pred, 3)[0]
    # Correct non-background: (0,1),(1,2),(0,3) -> 3; GT non-bg 5; PL non-bg 5.
    assert ghosh_dice(conf) == pytest.approx(2 * 3 / (5 + 5))
    m = SegmentationMetrics(3)
    m.update(true, pred)
    out = m.compute()
    assert out["dice"] == pytest.approx(0.6)
    # chromosome: tp 2, gt 3, pl 3 -> dice 2/3, iou 2/4; overlap: tp 1, gt 2, pl 2 -> 1/2, 1/3.
    assert out["dice_per_class"]["chromosome"] == pytest.approx(2 / 3)
    assert out["iou_per_class"]["chromosome"] == pytest.approx(0.5)
    assert out["iou_per_class"]["overlap"] == pytest.approx(1 / 3)
    assert out["iou_overlap"] == out["iou_per_class"]["overlap"]
    assert out["n_images"] == 1 and out["combine_label"] is True
    assert sorted(out["dice_per_class"]) == ["background", "chromosome", "overlap"]


def test_counts_pool_over_batches_exactly():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, (10, 8, 8))
    pred = rng.integers(0, 4, (10, 8, 8))
    whole = SegmentationMetrics(4)
    whole.update(true, pred)
    parts = SegmentationMetrics(4)
    parts.update(true[:3], pred[:3])
    parts.update(true[3:], pred[3:])
    assert whole.compute() == parts.compute()


def test_empty_classes_score_one_not_nan():
    true = np.zeros((1, 4, 4), int)
    m = SegmentationMetrics(4)
    m.update(true, true)
    res = m.compute()
    assert res["dice"] == 1.0 and res["iou_per_class"]["overlap"] == 1.0


def test_swapped_prediction_is_perfect_when_permutation_invariant():
    true = np.array([[[1, 1, 3, 2, 2, 0]]])
    swapped = np.array([[[2, 2, 3, 1, 1, 0]]])
    m = SegmentationMetrics(4)
    m.update(true, swapped)
    out = m.compute()
    # Plain dice counts only the overlap pixel as correct: 2*1/(5+5).
    assert out["dice"] == pytest.approx(0.2)
    assert out["dice_pi"] == 1.0
    assert out["iou_chromosome_a_pi"] == 1.0 and out["iou_chromosomes_pi"] == 1.0
    assert out["n_swapped"] == 1
    # Merged to one chromosome class the swap does not matter either.
    assert out["dice_combined"] == 1.0


def test_dice_combined_of_a_four_class_prediction_by_hand():
    true = np.array([[[0, 1, 1, 3, 2, 2], [0, 0, 1, 3, 2, 0]]])
    pred = np.array([[[1, 1, 2, 3, 2, 0], [0, 0, 3, 1, 2, 0]]])
    m = SegmentationMetrics(4)
    m.update(true, pred)
    out = m.compute()
    # Merged (A, B -> chromosome; overlap stays): truth [0 c c o c c | 0 0 c o c 0],
    # prediction [c c c o c 0 | 0 0 o c c 0]. Correct non-background: 4 (row 0) + 1 (row 1) = 5;
    # GT non-background 5 + 3, PL non-background 5 + 3 -> 2 * 5 / 16.
    assert out["dice_combined"] == pytest.approx(0.625)
    # The same as scoring the merged labels with the 3-class metrics.
    three = SegmentationMetrics(3)
    three.update(combine_labels(true), combine_labels(pred))
    assert out["dice_combined"] == pytest.approx(three.compute()["dice"])


def test_permutation_chosen_per_image():
    true = np.array([[[1, 1, 2, 2]], [[1, 1, 2, 2]]])
    pred = np.array([[[1, 1, 2, 2]], [[2, 2, 1, 0]]])  # second image: swapped, one pixel missed
    conf = confusion_per_image(true, pred, 4)
    pi = permutation_invariant(conf)
    assert pi["n_swapped"] == 1
    # A: image1 2/2, image2 (after swap A=pred1->...) inter 2 union 2 -> A iou 4/4.
    assert pi["iou_chromosome_a_pi"] == pytest.approx(1.0)
    # B: image1 2/2, image2 inter 1 union 2 -> 3/4.
    assert pi["iou_chromosome_b_pi"] == pytest.approx(3 / 4)
    assert pi["iou_chromosomes_pi"] == pytest.approx((1 + 0.75) / 2)


def test_instance_iou_includes_overlap():
    true = np.array([[[1, 3, 3, 2]]])
    pred = np.array([[[1, 1, 3, 2]]])
    pi = permutation_invariant(confusion_per_image(true, pred, 4))
    # A = {1,3}: truth px 0,1,2; pred px 0,1,2 -> IoU 1. B = {2,3}: truth 1,2,3; pred 2,3 -> 2/3.
    assert pi["iou_chromosome_a_pi"] == 1.0
    assert pi["iou_chromosome_b_pi"] == pytest.approx(2 / 3)


def test_per_image_dice_and_shape_errors():
    true = np.array([[[1, 1]], [[1, 0]]])
    pred = np.array([[[1, 1]], [[0, 1]]])
    np.testing.assert_allclose(per_image_dice(confusion_per_image(true, pred, 3)), [1.0, 0.0])
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_per_image(true, pred[:, :, :1], 3)
    with pytest.raises(ValueError, match="labels must be < 3"):
        confusion_per_image(true, pred + 2, 3)


def test_label_helpers():
    lab = np.array([[0, 1, 2, 3]], np.uint8)
    np.testing.assert_array_equal(combine_labels(lab), [[0, 1, 1, 2]])
    a, b, ov = labels_to_instances(lab)
    np.testing.assert_array_equal(instances_to_labels4(a, b), lab)
    assert ov.sum() == 1


def test_canonical_ab_area_and_position():
    # B (label 2) is larger: area rule swaps so that A is the larger one.
    lab = np.array([[1, 3, 2, 2, 2, 0]], np.uint8)
    np.testing.assert_array_equal(canonical_ab(lab, "area"), [[2, 3, 1, 1, 1, 0]])
    np.testing.assert_array_equal(canonical_ab(lab, "none"), lab)
    # Position: A must be the one higher up.
    lab2 = np.array([[2, 2], [1, 1]], np.uint8)
    np.testing.assert_array_equal(canonical_ab(lab2, "position"), [[1, 1], [2, 2]])
    batch = np.stack([lab2, lab2[::-1]])
    np.testing.assert_array_equal(canonical_ab(batch, "position")[1], [[1, 1], [2, 2]])
    with pytest.raises(ValueError, match="not one of"):
        canonical_ab(lab, "size")
