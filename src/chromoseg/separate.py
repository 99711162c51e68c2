"""Instance separation for combined labels (0 bg, 1 chromosome, 2 overlap) -> chromosomes A and B.

Used for combined models without the A/B head; a model trained with `train.ab_aux` (the default)
splits its chromosome pixels itself (`infer.Predictor.predict_segmentation`), which separates them
better (BENCHMARKS.md).

Geometry: removing the overlap from the chromosome mask leaves the "arms" of the two chromosomes.
The overlap alone does not cut them apart: where two outlines cross, "A only" and "B only" pixels
touch at the corners of the overlap, so the overlap is grown by 1-3 px until the arms fall apart.
The arms are then split into two chromosomes (each = its arms + the shared overlap) so that both are
as thin as possible: the sum of their spreads across their principal axes is smallest. A chromosome
is a ribbon, so a wrong pairing (an L, Y or V through the overlap) is always wider. This one rule
covers X crossings (2 + 2 arms), T and end-on overlaps (2 + 1 arms, short end stubs included) and V
shapes (1 + 1). Pixels removed by the cut join the nearest arm.

Pairs without an overlap are split into connected components (fragments join the nearer of the two
largest); a blob of two touching chromosomes is shrunk (distance-transform threshold) until it falls
into two parts, which are grown back over the blob by a watershed.

On ground-truth combined labels of the synthetic set it reaches chromosome PI IoU 0.974 (pairing
arms by centroid direction: 0.801, because that never cuts the arms apart).

Before separation, `drop_small_overlaps` turns predicted overlap specks smaller than
MIN_OVERLAP_REL * width^2 back into chromosome: two chromosomes of width w that cross cover at
least about w^2 (synthetic test truth: every overlap >= 0.86 w^2; real-dev crossings >= 0.70 w^2),
while a false speck at a centromere constriction would otherwise be taken for the crossing and cut
one chromosome in two.

Once A and B are known, `drop_one_sided_overlaps` turns an overlap component that borders only one
chromosome (its contact with A-only or with B-only pixels under MIN_CONTACT_REL * width) into that
chromosome: where two chromosomes cross, each one's own pixels border the overlap (synthetic test
truth: at least 0.56 w of contact on both sides; real-dev crossings at least 1.3 w), while a
brighter patch of one chromosome that the network calls overlap (a touching pair on real images)
is bordered by that chromosome alone.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage as ndi

from chromoseg.geometry import estimate_width

MIN_ARM = 4  # pixels; smaller fragments are noise and join the nearest arm
MAX_ARMS = 4
MAX_CUT = 3  # px: how far the overlap is grown at most to cut the arms apart
MIN_OVERLAP_REL = 0.25  # overlap components below this * width^2 are specks, not a crossing
MIN_CONTACT_REL = 0.25  # overlap bordering A-only or B-only along less than this * width: not a crossing
_EIGHT = np.ones((3, 3), bool)


def drop_small_overlaps(
    labels: np.ndarray, combine_label: bool, min_rel: float = MIN_OVERLAP_REL
) -> np.ndarray:
    """(N, H, W) or (H, W) predicted labels with overlap components smaller than `min_rel` * w^2
    (w: the chromosome width of that image) relabelled: to chromosome (combined) or to the nearest
    of A and B (4 classes). Returns a new array."""
    ov_class = 2 if combine_label else 3
    out = np.array(labels, dtype=np.uint8, copy=True)
    flat = out[None] if out.ndim == 2 else out
    for lab in flat:
        ov = lab == ov_class
        if not ov.any():
            continue
        width = estimate_width(lab > 0)
        comps, n = ndi.label(ov, structure=_EIGHT)
        sizes = ndi.sum_labels(np.ones_like(comps), comps, index=np.arange(1, n + 1))
        small = np.isin(comps, 1 + np.flatnonzero(sizes < min_rel * width * width))
        if not small.any():
            continue
        if combine_label:
            lab[small] = 1
            continue
        single = (lab == 1) | (lab == 2)
        if not single.any():
            lab[small] = 1
            continue
        _, (iy, ix) = ndi.distance_transform_edt(~single, return_indices=True)
        lab[small] = lab[iy, ix][small]
    return out


def drop_one_sided_overlaps(labels4: np.ndarray, min_rel: float = MIN_CONTACT_REL) -> np.ndarray:
    """(N, H, W) or (H, W) 4-class labels with every overlap component that borders A-only or B-only
    pixels along less than `min_rel` * w (w: the chromosome width of that image) given to the
    chromosome it borders more (on a tie, the nearer one). Returns a new array."""
    out = np.array(labels4, dtype=np.uint8, copy=True)
    flat = out[None] if out.ndim == 2 else out
    for lab in flat:
        ov = lab == 3
        a_only, b_only = lab == 1, lab == 2
        if not ov.any() or not (a_only.any() or b_only.any()):
            continue
        min_contact = min_rel * estimate_width(lab > 0)
        comps, n = ndi.label(ov, structure=_EIGHT)
        for c in range(1, n + 1):
            comp = comps == c
            ring = ndi.binary_dilation(comp, _EIGHT) & ~comp
            na, nb = int((ring & a_only).sum()), int((ring & b_only).sum())
            if min(na, nb) >= min_contact:
                continue
            if na != nb:
                to_a = na > nb
            else:  # no contact with either (or as much with both): the nearer chromosome
                da = ndi.distance_transform_edt(~a_only)[comp].min() if a_only.any() else np.inf
                db = ndi.distance_transform_edt(~b_only)[comp].min() if b_only.any() else np.inf
                to_a = da < db
            lab[comp] = 1 if to_a else 2
    return out


def separate_instances(labels: np.ndarray, images: np.ndarray | None = None) -> np.ndarray:
    """(N, H, W) or (H, W) combined labels -> 4-class labels (1 A only, 2 B only, 3 overlap), uint8.

    `images` is accepted for interface stability and unused: the split is purely geometric.
    """
    lab = labels[None] if labels.ndim == 2 else labels
    out = np.stack([_separate_one(lab[i]) for i in range(lab.shape[0])])
    return out[0] if labels.ndim == 2 else out


def _separate_one(lab: np.ndarray) -> np.ndarray:
    fg = lab > 0
    overlap = lab == 2
    out = np.zeros(lab.shape, np.uint8)
    if not fg.any():
        return out
    if overlap.any():
        a, b = _split_crossing(fg, overlap)
        out[a] = 1
        out[b] = 2
        out[a & b] = 3
        return out
    comps, n = ndi.label(fg, structure=_EIGHT)
    if n >= 2:
        sizes = ndi.sum_labels(np.ones_like(comps), comps, index=np.arange(1, n + 1))
        order = np.argsort(-sizes, kind="stable")
        out[comps == order[0] + 1] = 1
        out[comps == order[1] + 1] = 2
        if n > 2:
            # Fragments join the nearer of the two main components.
            _, (iy, ix) = ndi.distance_transform_edt(out == 0, return_indices=True)
            nearest = out[iy, ix]
            out[fg & (out == 0)] = nearest[fg & (out == 0)]
        return out
    return _watershed_split(fg)


def cut_arms(fg: np.ndarray, overlap: np.ndarray) -> tuple[np.ndarray, list[int], int]:
    """Label the arms of `fg` outside the overlap grown by the smallest cut (0..MAX_CUT px) that gives
    the most arms (at most MAX_ARMS). Returns (arm labels, kept arm ids by size, cut in px)."""
    best: tuple[np.ndarray, list[int], int] | None = None
    grown = overlap
    for cut in range(MAX_CUT + 1):
        if cut:
            grown = ndi.binary_dilation(grown, structure=_EIGHT) & fg
        arms, n = ndi.label(fg & ~grown)
        sizes = ndi.sum_labels(np.ones_like(arms), arms, index=np.arange(1, n + 1)) if n else np.zeros(0)
        keep = [int(i) + 1 for i in np.argsort(-sizes, kind="stable")[:MAX_ARMS] if sizes[i] >= MIN_ARM]
        if best is None or len(keep) > len(best[1]):
            best = (arms, keep, cut)
        if len(keep) == MAX_ARMS:
            break
    assert best is not None
    return best


def _split_crossing(fg: np.ndarray, overlap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks of chromosomes A and B (both including the overlap) for a pair that overlaps."""
    arms, ids, _ = cut_arms(fg, overlap)
    a = overlap.copy()
    b = overlap.copy()
    if not ids:
        a |= fg
        return a, b
    assign = pair_arms(arms, ids, overlap, fg)
    # Every foreground pixel outside the overlap takes the side of its nearest kept arm.
    side = np.zeros(fg.shape, np.int8)
    for arm_id, s in assign.items():
        side[arms == arm_id] = s + 1
    _, (iy, ix) = ndi.distance_transform_edt(side == 0, return_indices=True)
    side = side[iy, ix]
    rest = fg & ~overlap
    a |= rest & (side == 1)
    b |= rest & (side == 2)
    return a, b


def pair_arms(arms: np.ndarray, ids: list[int], overlap: np.ndarray, fg: np.ndarray) -> dict[int, int]:
    """Assign each arm to chromosome 0 or 1: the split whose two chromosomes (arms + overlap) are the
    thinnest ribbons, i.e. have the smallest spread across their principal axis."""
    if len(ids) == 1:
        return {ids[0]: 0}
    oy, ox = np.nonzero(overlap)
    pts = {i: np.stack(np.nonzero(arms == i), 1).astype(np.float64) for i in ids}
    ov_pts = np.stack([oy, ox], 1).astype(np.float64)
    best_cost, best = np.inf, None
    for r in range(1, len(ids) // 2 + 1):
        for group in itertools.combinations(ids, r):
            other = [i for i in ids if i not in group]
            cost = _spread([pts[i] for i in group], ov_pts) + _spread([pts[i] for i in other], ov_pts)
            if cost < best_cost - 1e-9:
                best_cost, best = cost, set(group)
    assert best is not None
    return {i: (0 if i in best else 1) for i in ids}


def _spread(parts: list[np.ndarray], overlap_pts: np.ndarray) -> float:
    """Standard deviation (px) across the principal axis of the union of `parts` and the overlap."""
    p = np.concatenate([*parts, overlap_pts])
    if len(p) < 3:
        return 0.0
    w = np.linalg.eigvalsh(np.cov(p.T))
    return float(np.sqrt(max(w[0], 0.0)))


def _watershed_split(fg: np.ndarray) -> np.ndarray:
    """Split one touching blob into two: shrink it (distance-transform threshold) until it falls into
    two parts, then grow those back over the blob by a watershed on the distance transform."""
    from skimage.segmentation import watershed

    out = np.zeros(fg.shape, np.uint8)
    # 4-connected parts first: pairs that touch only at a corner are already two objects.
    comps, n = ndi.label(fg)
    dist = ndi.distance_transform_edt(fg)
    min_part = max(MIN_ARM, int(0.05 * fg.sum()))
    markers = None
    if n >= 2:
        markers = comps
    else:
        for t in np.arange(0.5, float(dist.max()), 0.5):
            core, m = ndi.label(dist > t)
            if m < 2:
                continue
            sizes = ndi.sum_labels(np.ones_like(core), core, index=np.arange(1, m + 1))
            if (sizes >= min(min_part, max(MIN_ARM, 0.25 * sizes.max()))).sum() >= 2:
                markers = core
                break
    if markers is None:
        return _junction_split(fg, dist)
    ids, sizes = np.unique(markers[markers > 0], return_counts=True)
    top = ids[np.argsort(-sizes, kind="stable")[:2]]
    seeds = np.zeros(fg.shape, np.int32)
    seeds[markers == top[0]] = 1
    seeds[markers == top[1]] = 2
    ws = watershed(-dist, seeds, mask=fg, connectivity=2)
    out[ws == 1] = 1
    out[ws == 2] = 2
    return out


def _junction_split(fg: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """A T- or X-shaped blob with no overlap and no neck: cut out the skeleton's branch point as a
    stand-in overlap, pair the arms as for a crossing, and give the junction to the chromosome that
    runs through it (the one with more arms)."""
    from skimage.morphology import skeletonize

    out = np.zeros(fg.shape, np.uint8)
    skel = skeletonize(fg)
    neighbours = ndi.convolve(skel.astype(np.int32), np.ones((3, 3), np.int32), mode="constant") - 1
    branch = skel & (neighbours >= 3)
    if not branch.any():
        out[fg] = 1  # one ribbon: nothing tells two chromosomes apart
        return out
    by, bx = np.argwhere(branch).mean(0).round().astype(int)
    radius = float(dist[by, bx]) + 1.0
    yy, xx = np.ogrid[: fg.shape[0], : fg.shape[1]]
    junction = fg & ((yy - by) ** 2 + (xx - bx) ** 2 <= radius**2)
    arms, ids, _ = cut_arms(fg, junction)
    if len(ids) < 2:
        out[fg] = 1
        return out
    a, b = _split_crossing(fg, junction)
    n_a = sum(1 for i in ids if (arms == i)[a & ~junction].any())
    n_b = len(ids) - n_a
    if n_a >= n_b:
        b &= ~junction
    else:
        a &= ~junction
    out[a] = 1
    out[b & ~a] = 2
    return out
