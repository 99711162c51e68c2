"""separate.py on hand-made masks: X cross, T, V, end-on overlap, touching pair, two blobs, empty."""

from __future__ import annotations

import numpy as np
import pytest

from chromoseg.labels import combine_labels, instances_to_labels4, labels_to_instances
from chromoseg.separate import cut_arms, drop_one_sided_overlaps, drop_small_overlaps, separate_instances

SHAPE = (48, 48)


def bar(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros(SHAPE, bool)
    m[r0:r1, c0:c1] = True
    return m


def thick_line(p0: tuple[float, float], p1: tuple[float, float], radius: float) -> np.ndarray:
    """Pixels within `radius` of the segment p0-p1 (row, col): a straight chromosome with round ends."""
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]].astype(float)
    p = np.stack([yy, xx], -1)
    a, b = np.array(p0, float), np.array(p1, float)
    t = np.clip(((p - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)
    closest = a + t[..., None] * (b - a)
    return np.linalg.norm(p - closest, axis=-1) <= radius


def iou(p: np.ndarray, t: np.ndarray) -> float:
    return float((p & t).sum() / (p | t).sum())


def separate(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Combine the two truth masks, separate, return the predicted (mask_a, mask_b)."""
    pred = separate_instances(combine_labels(instances_to_labels4(a, b)))
    pa, pb, _ = labels_to_instances(pred)
    return pa, pb


def assert_same_pair(got: tuple[np.ndarray, np.ndarray], a: np.ndarray, b: np.ndarray) -> None:
    """Exact match up to the A/B order."""
    ga, gb = got
    if not (ga == a).all():
        ga, gb = gb, ga
    np.testing.assert_array_equal(ga, a)
    np.testing.assert_array_equal(gb, b)


def test_x_cross_is_split_into_the_two_bars() -> None:
    vertical, horizontal = bar(4, 44, 21, 27), bar(20, 26, 4, 44)
    assert_same_pair(separate(vertical, horizontal), vertical, horizontal)


def test_diagonal_x_cross_is_exact() -> None:
    # Diagonal outlines: "A only" and "B only" touch at the corners of the overlap, so the arms only
    # fall apart once the overlap is grown (cut > 0).
    a = thick_line((6, 6), (42, 40), 3.2)
    b = thick_line((8, 42), (40, 5), 3.2)
    lab = combine_labels(instances_to_labels4(a, b))
    _, ids, cut = cut_arms(lab > 0, lab == 2)
    assert len(ids) == 4 and cut >= 1
    assert_same_pair(separate(a, b), a, b)


def test_t_stem_ending_in_the_overlap_is_its_own_chromosome() -> None:
    top, stem = bar(10, 17, 4, 44), bar(13, 44, 21, 27)  # the stem's end lies inside the top bar
    assert_same_pair(separate(top, stem), top, stem)


def test_end_on_overlap_with_a_short_stub_pairs_the_stub_with_its_own_arm() -> None:
    # B's end crosses A and sticks out 3 px on the far side: the stub must stay with B.
    a = bar(20, 26, 4, 44)
    b = bar(4, 29, 30, 36)
    assert_same_pair(separate(a, b), a, b)


def test_v_shape_overlapping_at_the_tips() -> None:
    a = thick_line((42, 8), (8, 22), 3.0)
    b = thick_line((42, 38), (8, 24), 3.0)
    ga, gb = separate(a, b)
    if (ga & ~a).sum() > (ga & ~b).sum():
        ga, gb = gb, ga
    # Each arm goes wholly to its own chromosome; only ring pixels next to the overlap may differ.
    overlap = a & b
    assert overlap.any()
    assert ((ga != a).sum() + (gb != b).sum()) <= 4
    np.testing.assert_array_equal(ga & gb, overlap)


def test_touching_t_without_overlap_gives_the_junction_to_the_through_chromosome() -> None:
    a = bar(4, 44, 10, 16)  # vertical
    b = bar(22, 28, 16, 44)  # horizontal, its end touches A's side: one blob with no neck
    ga, gb = separate(a, b)
    if (ga & a).sum() < (gb & a).sum():
        ga, gb = gb, ga
    assert not (ga & gb).any()
    # Exact but for the few junction pixels right at the contact line (column 16).
    assert (ga != a).sum() <= 4 and (gb != b).sum() <= 4
    np.testing.assert_array_equal(ga[:, :16], a[:, :16])
    np.testing.assert_array_equal(gb[:, 18:], b[:, 18:])


def test_touching_pair_with_a_neck_is_split_at_the_neck() -> None:
    a = thick_line((24, 4), (24, 22), 5.0)
    b = thick_line((24, 31), (24, 44), 5.0)
    a[22:27, 22:31] = True  # a 5-px-wide bridge: narrower than either chromosome
    ga, gb = separate(a & ~b, b)
    if (ga & a).sum() < (gb & a).sum():
        ga, gb = gb, ga
    assert not (ga & gb).any()
    assert ga[:, :22].sum() == (a & ~b)[:, :22].sum() and gb[:, 31:].sum() == b[:, 31:].sum()


def test_touching_at_a_corner_only_is_two_objects() -> None:
    a, b = bar(4, 20, 4, 10), bar(20, 40, 10, 16)  # 8-connected at one corner pixel
    assert_same_pair(separate(a, b), a, b)


def test_two_separate_blobs_larger_first_and_fragments_join_the_nearer() -> None:
    a, b = bar(4, 44, 4, 10), bar(4, 30, 30, 36)
    speck = bar(34, 36, 30, 32)  # a 4-px fragment 4 px below B
    lab = combine_labels(instances_to_labels4(a, b | speck))
    pred = separate_instances(lab)
    np.testing.assert_array_equal(pred == 1, a)  # the larger object is A
    np.testing.assert_array_equal(pred == 2, b | speck)
    assert not (pred == 3).any()


def test_batch_and_empty_images() -> None:
    vertical, horizontal = bar(4, 44, 21, 27), bar(20, 26, 4, 44)
    lab = combine_labels(instances_to_labels4(vertical, horizontal))
    batch = np.stack([lab, np.zeros(SHAPE, np.uint8)])
    out = separate_instances(batch)
    assert out.shape == batch.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], separate_instances(lab))
    assert not out[1].any()


@pytest.mark.parametrize("angle", [20, 45, 70, 90, 120, 160])
def test_x_cross_at_many_angles(angle: float) -> None:
    c, r = np.array([24.0, 24.0]), 19.0
    t = np.deg2rad(angle)
    d = np.array([np.sin(t), np.cos(t)]) * r
    a = thick_line((24, 5), (24, 43), 3.0)
    b = thick_line(tuple(c - d), tuple(c + d), 3.0)
    ga, gb = separate(a, b)
    if (ga & a).sum() < (gb & a).sum():
        ga, gb = gb, ga
    assert min(iou(ga, a), iou(gb, b)) > 0.95


def test_small_false_overlap_is_dropped_and_a_touching_pair_split_at_the_neck() -> None:
    # An L of two touching rods (no true overlap) with a 2x2 false "overlap" in the middle of the
    # long one, as the network predicts at a centromere constriction on real images.
    long_rod = thick_line((10, 6), (10, 42), 3.5)
    short_rod = thick_line((15, 6), (42, 14), 3.5) & ~long_rod
    lab = combine_labels(instances_to_labels4(long_rod, short_rod))
    lab[9:11, 30:32] = 2
    without = labels_to_instances(separate_instances(lab))[:2]
    # Taken for a crossing, the speck cuts the long rod in two.
    assert min((without[0] ^ long_rod).sum(), (without[1] ^ long_rod).sum()) > 20

    cleaned = drop_small_overlaps(lab, combine_label=True)
    assert not (cleaned == 2).any() and ((cleaned == 1) == (lab > 0)).all()
    pa, pb, _ = labels_to_instances(separate_instances(cleaned))
    best = max(iou(pa, long_rod) + iou(pb, short_rod), iou(pb, long_rod) + iou(pa, short_rod)) / 2
    assert best > 0.9


def test_a_real_crossing_overlap_is_kept() -> None:
    a, b = thick_line((6, 6), (42, 40), 3.2), thick_line((8, 42), (40, 5), 3.2)
    lab = combine_labels(instances_to_labels4(a, b))
    np.testing.assert_array_equal(drop_small_overlaps(lab, combine_label=True), lab)
    lab4 = instances_to_labels4(a, b)
    np.testing.assert_array_equal(drop_small_overlaps(lab4[None], combine_label=False)[0], lab4)


def test_four_class_speck_goes_to_the_surrounding_chromosome() -> None:
    a, b = bar(4, 44, 21, 27), bar(20, 26, 4, 44)
    lab4 = instances_to_labels4(a, b)
    lab4[8:10, 23:25] = 3  # inside the "A only" part of the vertical bar
    out = drop_small_overlaps(lab4, combine_label=False)
    assert (out[8:10, 23:25] == 1).all()
    assert ((out == 3) == (a & b)).all()  # the true overlap stays
    assert lab4[8, 23] == 3  # the input is not modified


def test_postprocess_uses_the_model_split_and_cleans_it_like_the_combined_labels() -> None:
    from chromoseg.pipeline import postprocess

    a, b = bar(4, 44, 21, 27), bar(20, 26, 4, 44)
    lab4 = instances_to_labels4(a, b)
    lab4[8:10, 23:25] = 3  # a speck of "overlap" inside A only
    lab3 = combine_labels(lab4)
    out = postprocess(lab3[None], True, labels4=lab4[None])
    # The label map is what cleaning the combined labels gives; the masks are the model's split.
    np.testing.assert_array_equal(out["labels"], drop_small_overlaps(lab3[None], combine_label=True))
    assert (out["mask_a"][0] == a).all() and (out["mask_b"][0] == b).all()
    assert (out["overlap"][0] == (a & b)).all()
    # Without a split from the model, geometry separates the same label map.
    geo = postprocess(lab3[None], True)
    np.testing.assert_array_equal(geo["labels"], out["labels"])


def touching_pair_with_false_overlap() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two parallel bars that touch (no true overlap); a 16x8 patch of the right one labelled
    overlap, as the network does with the brighter chromosome of a touching pair (real-dev
    `grey0084560`: 81-139 px bordering one chromosome only). Too large for a speck (0.25 w^2 = 100 px;
    the touching pair's blob is 20 px wide)."""
    a, b = bar(4, 44, 12, 22), bar(4, 44, 22, 32)
    lab4 = instances_to_labels4(a, b)
    lab4[14:30, 24:32] = 3
    return a, b, lab4


def test_overlap_that_borders_one_chromosome_goes_to_it() -> None:
    a, b, lab4 = touching_pair_with_false_overlap()
    out = drop_one_sided_overlaps(lab4)
    np.testing.assert_array_equal(out, instances_to_labels4(a, b))
    assert lab4[20, 24] == 3  # the input is not modified
    # On the seam, touching A along 4 px (2 + 2 diagonal), under 0.25 w: still one-sided.
    seam = instances_to_labels4(a, b)
    seam[20:22, 22:28] = 3
    np.testing.assert_array_equal(drop_one_sided_overlaps(seam[None])[0], instances_to_labels4(a, b))


def test_a_crossing_overlap_borders_both_and_is_kept() -> None:
    for a, b in [
        (thick_line((6, 6), (42, 40), 3.2), thick_line((8, 42), (40, 5), 3.2)),  # X
        (bar(4, 44, 21, 27), bar(20, 26, 4, 44)),  # +
        (bar(4, 44, 21, 27), bar(20, 26, 4, 27)),  # T: B ends on A
    ]:
        lab4 = instances_to_labels4(a, b)
        assert (lab4 == 3).any()
        np.testing.assert_array_equal(drop_one_sided_overlaps(lab4), lab4)


def test_overlap_without_contact_goes_to_the_nearer_chromosome() -> None:
    a, b = bar(4, 44, 4, 10), bar(4, 44, 30, 36)
    lab4 = instances_to_labels4(a, b)
    lab4[20:24, 24:28] = 3  # floating between them, nearer B
    out = drop_one_sided_overlaps(lab4)
    assert (out[20:24, 24:28] == 2).all() and not (out == 3).any()
    # Nothing to give it to: left as it is.
    only = np.zeros(SHAPE, np.uint8)
    only[20:24, 24:28] = 3
    np.testing.assert_array_equal(drop_one_sided_overlaps(only), only)


def test_generated_truth_overlaps_are_all_kept(small_synth) -> None:
    labels = small_synth[1]
    labels = np.where(labels > 3, 0, labels).astype(np.uint8)  # the generator's noisy values
    assert sum((lab == 3).any() for lab in labels) > 40
    np.testing.assert_array_equal(drop_one_sided_overlaps(labels), labels)


def test_real_dev_truth_overlaps_are_all_kept(real_dev_dir) -> None:
    from chromoseg.data.labelme import load_labelme_dir

    _, real4, _, _ = load_labelme_dir(real_dev_dir)
    assert sum((lab == 3).sum() > 50 for lab in real4) >= 6
    np.testing.assert_array_equal(drop_one_sided_overlaps(real4), real4)


def test_postprocess_gives_one_sided_overlap_to_its_chromosome() -> None:
    from chromoseg.pipeline import postprocess

    a, b, lab4 = touching_pair_with_false_overlap()
    for labels4 in (lab4[None], None):  # the model's A/B split; geometry (the combined map only)
        out = postprocess(combine_labels(lab4)[None], True, labels4=labels4)
        if labels4 is not None:
            assert (out["mask_a"][0] == a).all() and (out["mask_b"][0] == b).all()
            np.testing.assert_array_equal(out["labels"][0], combine_labels(instances_to_labels4(a, b)))
        assert not out["overlap"].any() and not (out["labels"] == 2).any()
    out = postprocess(lab4[None], False)
    np.testing.assert_array_equal(out["labels"][0], instances_to_labels4(a, b))
