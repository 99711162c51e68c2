"""Instance separation for combined labels (0 bg, 1 chromosome, 2 overlap) -> chromosomes A and B.

Geometry: removing the overlap from the chromosome mask leaves the "arms" of the two chromosomes.
Arms that leave the overlap in opposite directions belong to the same chromosome (chromosomes are
nearly straight where they cross), so arms are paired by the straightest assignment. Pairs that only
touch (no overlap) are split into connected components, or by a distance-transform watershed when
they form one blob.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage as ndi

MIN_ARM = 4  # pixels; smaller fragments are noise and join the nearest arm
MAX_ARMS = 4


def separate_instances(labels: np.ndarray, images: np.ndarray | None = None) -> np.ndarray:
    """(N, H, W) or (H, W) combined labels -> 4-class labels (1 A only, 2 B only, 3 overlap)."""
    lab = labels[None] if labels.ndim == 2 else labels
    out = np.stack([_separate_one(lab[i]) for i in range(lab.shape[0])])
    return out[0] if labels.ndim == 2 else out


def _separate_one(lab: np.ndarray) -> np.ndarray:
    fg = lab > 0
    overlap = lab == 2
    out = np.zeros(lab.shape, np.uint8)
    if not fg.any():
        return out
    single = fg & ~overlap
    if overlap.any():
        arms, n = ndi.label(single)
        sizes = ndi.sum_labels(np.ones_like(arms), arms, index=np.arange(1, n + 1))
        # At most four arms (two chromosomes, two ends each); the rest join the nearest arm.
        big = [int(i) + 1 for i in np.argsort(-sizes)[:MAX_ARMS] if sizes[i] >= MIN_ARM]
        arms = _absorb_small(arms, big)
        assign = _pair_arms(arms, big, overlap)
        a = overlap.copy()
        b = overlap.copy()
        for arm_id, side in assign.items():
            (a if side == 0 else b)[arms == arm_id] = True
        # The overlap is shared; pixels only in A or only in B outside it.
        out[a] = 1
        out[b] = 2
        out[a & b] = 3
        return out
    comps, n = ndi.label(fg)
    if n >= 2:
        sizes = ndi.sum_labels(np.ones_like(comps), comps, index=np.arange(1, n + 1))
        order = np.argsort(-sizes)
        out[comps == order[0] + 1] = 1
        out[comps == order[1] + 1] = 2
        for extra in order[2:]:
            # Fragments join the nearer of the two main components.
            frag = comps == extra + 1
            da = ndi.distance_transform_edt(out != 1)[frag].mean()
            db = ndi.distance_transform_edt(out != 2)[frag].mean()
            out[frag] = 1 if da <= db else 2
        return out
    return _watershed_split(fg)


def _absorb_small(arms: np.ndarray, keep: list[int]) -> np.ndarray:
    small = (arms > 0) & ~np.isin(arms, keep)
    if not small.any() or not keep:
        return np.where(np.isin(arms, keep), arms, 0)
    kept = np.where(np.isin(arms, keep), arms, 0)
    _, (iy, ix) = ndi.distance_transform_edt(kept == 0, return_indices=True)
    nearest = kept[iy, ix]
    return np.where(small, nearest, kept)


def _direction(mask: np.ndarray, origin: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    v = np.array([ys.mean(), xs.mean()]) - origin
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def _pair_arms(arms: np.ndarray, ids: list[int], overlap: np.ndarray) -> dict[int, int]:
    """Assign each arm to chromosome 0 or 1 by the straightest pairing through the overlap."""
    if not ids:
        return {}
    oy, ox = np.nonzero(overlap)
    origin = np.array([oy.mean(), ox.mean()])
    dirs = {i: _direction(arms == i, origin) for i in ids}
    if len(ids) == 1:
        return {ids[0]: 0}
    best_cost, best = np.inf, None
    # Try every split of the arms into two chromosomes; a chromosome's arms should point apart.
    for r in range(1, len(ids) // 2 + 1):
        for group in itertools.combinations(ids, r):
            other = [i for i in ids if i not in group]
            cost = _straightness_cost([dirs[i] for i in group]) + _straightness_cost([dirs[i] for i in other])
            if cost < best_cost:
                best_cost, best = cost, set(group)
    return {i: (0 if i in best else 1) for i in ids}


def _straightness_cost(vs: list[np.ndarray]) -> float:
    """0 for one arm; for two, 1 + cos(angle) (0 when opposite); more than two arms cost extra."""
    if len(vs) <= 1:
        return 0.5
    cost = sum(1.0 + float(a @ b) for a, b in itertools.combinations(vs, 2))
    return cost + (len(vs) - 2) * 2.0


def _watershed_split(fg: np.ndarray) -> np.ndarray:
    """Split one touching blob into two by a watershed on its distance transform."""
    from skimage.segmentation import watershed

    dist = ndi.distance_transform_edt(fg)
    # Two seeds: the farthest-apart pair of ridge maxima.
    peaks = np.argwhere((dist == ndi.maximum_filter(dist, size=5)) & fg & (dist > 1))
    out = np.zeros(fg.shape, np.uint8)
    if len(peaks) < 2:
        out[fg] = 1
        return out
    d2 = ((peaks[:, None, :] - peaks[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(np.argmax(d2), d2.shape)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks[i])] = 1
    markers[tuple(peaks[j])] = 2
    ws = watershed(-dist, markers, mask=fg)
    out[ws == 1] = 1
    out[ws == 2] = 2
    return out
