"""Label-space operations shared by prepare, training, evaluation and serving."""

from __future__ import annotations

import numpy as np

_COMBINE = np.array([0, 1, 1, 2], dtype=np.uint8)
SWAP_AB = np.array([0, 2, 1, 3], dtype=np.uint8)  # label map that swaps chromosome A and B


def combine_labels(labels4: np.ndarray) -> np.ndarray:
    """Map 4-class labels (0 bg, 1 A, 2 B, 3 overlap) to combined (0 bg, 1 chromosome, 2 overlap)."""
    return _COMBINE[labels4]


def canonical_ab(labels4: np.ndarray, rule: str = "area") -> np.ndarray:
    """Order A/B per image by a rule the network can learn; (N, H, W) or (H, W) uint8 -> same.

    `area`: A is the larger chromosome (overlap included); invariant to flips, rotations and scaling.
    `position`: A's centroid is higher up (then further left). `none`: unchanged.
    """
    if rule == "none":
        return labels4
    if rule not in ("area", "position"):
        raise ValueError(f"A/B order rule {rule!r} is not one of ['none', 'area', 'position']")
    lab = labels4[None] if labels4.ndim == 2 else labels4
    n = lab.shape[0]
    flat = lab.reshape(n, -1)
    in_a = (flat == 1) | (flat == 3)
    in_b = (flat == 2) | (flat == 3)
    if rule == "area":
        swap = in_b.sum(1) > in_a.sum(1)
    else:
        h, w = lab.shape[1:]
        rows = np.repeat(np.arange(h), w)[None].astype(np.float64)
        cols = np.tile(np.arange(w), h)[None].astype(np.float64)
        na = np.maximum(in_a.sum(1), 1)
        nb = np.maximum(in_b.sum(1), 1)
        ra, rb = (rows * in_a).sum(1) / na, (rows * in_b).sum(1) / nb
        ca, cb = (cols * in_a).sum(1) / na, (cols * in_b).sum(1) / nb
        swap = (rb < ra) | ((rb == ra) & (cb < ca))
    out = lab.copy()
    out[swap] = SWAP_AB[lab[swap]]
    return out[0] if labels4.ndim == 2 else out


def instances_to_labels4(mask_a: np.ndarray, mask_b: np.ndarray) -> np.ndarray:
    """Two bool instance masks (each including the overlap) -> 4-class labels."""
    a = np.asarray(mask_a, bool)
    b = np.asarray(mask_b, bool)
    out = np.zeros(a.shape, np.uint8)
    out[a] = 1
    out[b] = 2
    out[a & b] = 3
    return out


def labels_to_instances(labels4: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-class labels -> (mask_a, mask_b, overlap) bool arrays; A and B include the overlap."""
    return (labels4 == 1) | (labels4 == 3), (labels4 == 2) | (labels4 == 3), labels4 == 3
