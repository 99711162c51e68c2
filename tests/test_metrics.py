"""Exact metric values on hand-made arrays."""

import numpy as np
import pytest

from chromoseg.labels import canonical_ab, combine_labels, instances_to_labels4, labels_to_instances
from chromoseg.metrics import (
    SegmentationMetrics,
    confusion_per_image,
    ghosh_dice,
    instance_components,
    instances_connected,
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


def _grid(rows: str) -> np.ndarray:
    """An 8x8 label map from 8 strings of digits (0 bg, 1 A, 2 B, 3 overlap)."""
    return np.array([[int(c) for c in r] for r in rows.split()], np.uint8)


CROSS = _grid("00020000 00020000 00020000 11131111 00020000 00020000 00020000 00000000")
# B lies across A with no overlap pixel: A is cut into a left and a right piece.
A_CUT_BY_B = _grid("00020000 00020000 00020000 11121111 00020000 00020000 00020000 00000000")
# A touches itself only corner to corner: one 8-connected region (two 4-connected ones).
A_DIAGONAL = _grid("11000000 11000000 00110000 00110000 00000000 00000222 00000222 00000222")
# One chromosome painted A at the top and B at the bottom, beside a second chromosome B.
A_B_MIXED = _grid("01100220 01100220 01100220 02200220 02200220 02200220 00000000 00000000")
# A's two arms are joined only through overlap pixels, which belong to both chromosomes.
A_VIA_OVERLAP = _grid("00000000 11300000 00322222 00311000 00000000 00000000 00000000 00000000")
B_MISSING = _grid("00000000 01111110 01111110 00000000 00000000 00000000 00000000 00000000")


@pytest.mark.parametrize(
    ("labels", "components", "connected"),
    [
        (CROSS, [1, 1], True),
        (A_CUT_BY_B, [2, 1], False),
        (A_DIAGONAL, [1, 1], True),
        (A_B_MIXED, [1, 2], False),
        (A_VIA_OVERLAP, [1, 1], True),
        (B_MISSING, [1, 0], False),
    ],
    ids=["cross", "A cut by B", "A diagonal", "A/B mixed", "A via overlap", "B missing"],
)
def test_instances_connected_by_hand(labels, components, connected):
    assert instance_components(labels).tolist() == [components]
    assert instances_connected(labels[None]).tolist() == [connected]


def test_instance_components_never_join_two_images():
    # A on the last row of image 0 and the first row of image 1: still one component in each.
    first = _grid("00000000 00000000 00000000 00000000 00000000 00222000 00222000 11111111")
    second = _grid("11111111 00000000 00222000 00000000 00000000 00000000 00000000 00000000")
    stack = np.stack([first, second, A_CUT_BY_B])
    assert instance_components(stack).tolist() == [[1, 1], [1, 1], [2, 1]]
    assert instances_connected(stack).tolist() == [True, True, False]


@pytest.mark.parametrize("combine_label", [False, True])
def test_evaluation_reports_the_share_of_connected_pairs(combine_label):
    from chromoseg.evaluate import score

    truth4 = np.stack([CROSS, CROSS, A_DIAGONAL, A_DIAGONAL])
    pred4 = np.stack([CROSS, A_CUT_BY_B, A_DIAGONAL, A_B_MIXED])  # what the instance masks give
    pred = combine_labels(pred4) if combine_label else pred4
    truth = combine_labels(truth4) if combine_label else truth4
    metrics, _ = score(pred, truth, truth4, combine_label, pred4)
    assert metrics["instances_connected"] == 0.5
    # Without instance masks there is nothing to check.
    assert "instances_connected" not in score(pred, truth, truth4, combine_label)[0]


def test_summary_shows_the_share_of_connected_pairs(tmp_path, monkeypatch):
    import json
    import shutil
    from pathlib import Path

    from typer.testing import CliRunner

    from chromoseg.cli import app

    shutil.copy2(Path(__file__).resolve().parents[1] / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    ev = {"combine_label": True, "n_images": 4, "dice": 0.9, "iou_overlap": 0.8, "instances_connected": 0.75}
    ev["iou_per_class"] = {"background": 1.0, "chromosome": 0.9, "overlap": 0.8}
    tr = {"train_seconds": 1, "best_val_dice": 0.9, "best_epoch": 0, "precision": "fp32"}
    for name, doc in (("eval", ev), ("train", tr), ("register", {"verdict": "promoted"})):
        (tmp_path / "metrics" / f"{name}.json").write_text(json.dumps(doc))
    res = CliRunner().invoke(app, ["summary"])
    assert res.exit_code == 0, res.output
    assert "A and B each one region     0.7500 of images" in res.output
