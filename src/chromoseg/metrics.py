"""Segmentation metrics: per-image confusion counts first, reduced at the end.

One module for training (validation dice), evaluation and serving. Definitions:

- dice (Ghosh 2017): 2 I / (GT + PL), I = pixels predicted with the correct non-background class,
  GT / PL = non-background ground-truth / predicted pixels, pooled over all images.
- dice_per_class / iou_per_class: pooled over all images, per class.
- Permutation-invariant (4 classes): chromosomes A and B have no inherent order, so per image the
  prediction's A and B may be swapped; the assignment with more correct pixels is taken.
- Separated chromosome IoU: chromosome A = {A only, overlap}, B = {B only, overlap}; IoU of each,
  pooled over images under the chosen assignment; `iou_chromosomes_pi` is the mean of the two.
- dice_combined (4 classes): Ghosh dice after merging A and B into one chromosome class, so a
  4-class model can be compared with a combined-label one on the same footing.
- instances_connected: share of images whose predicted chromosomes A = {A only, overlap} and
  B = {B only, overlap} are each exactly one 8-connected region. A chromosome split into pieces
  (A and B mixed along one chromosome, a blob of the other instance inside it) or missing fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from chromoseg.config import class_names
from chromoseg.labels import SWAP_AB, combine_labels, labels_to_instances

# 8-connectivity within each image of an (N, H, W) stack, never across images.
_EIGHT_IN_PLANE = np.zeros((3, 3, 3), bool)
_EIGHT_IN_PLANE[1] = True


def merge_ab(conf: np.ndarray) -> np.ndarray:
    """(..., 4, 4) confusion counts -> (..., 3, 3) with chromosome A and B merged."""
    onehot = np.eye(3, dtype=conf.dtype)[combine_labels(np.arange(4))]  # (4, 3): the label mapping
    return onehot.T @ conf @ onehot


def confusion_per_image(true: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, H, W) integer labels -> (N, K, K) int64 counts, rows = truth, columns = prediction."""
    true = np.asarray(true)
    pred = np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"truth {true.shape} and prediction {pred.shape} differ in shape")
    if true.ndim == 2:
        true, pred = true[None], pred[None]
    n = true.shape[0]
    k = n_classes
    if true.size and (true.max() >= k or pred.max() >= k):
        raise ValueError(f"labels must be < {k}; got max truth {true.max()}, max prediction {pred.max()}")
    flat = true.reshape(n, -1).astype(np.int64) * k + pred.reshape(n, -1).astype(np.int64)
    flat += (np.arange(n, dtype=np.int64) * k * k)[:, None]
    return np.bincount(flat.ravel(), minlength=n * k * k).reshape(n, k, k)


def _safe_div(a: float, b: float) -> float:
    # Empty class in both truth and prediction: a perfect score, not 0/0.
    return float(a) / float(b) if b > 0 else 1.0


def ghosh_dice(conf: np.ndarray) -> float:
    """Ghosh 2017 dice from a (K, K) confusion matrix (class 0 = background)."""
    inter = np.trace(conf[1:, 1:])
    gt = conf[1:, :].sum()
    pl = conf[:, 1:].sum()
    return _safe_div(2 * inter, gt + pl)


def per_class(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dice, iou) arrays of length K from a (K, K) confusion matrix."""
    tp = np.diag(conf).astype(np.float64)
    gt = conf.sum(axis=1)
    pl = conf.sum(axis=0)
    dice = np.array([_safe_div(2 * t, g + p) for t, g, p in zip(tp, gt, pl)])
    iou = np.array([_safe_div(t, g + p - t) for t, g, p in zip(tp, gt, pl)])
    return dice, iou


def best_assignment(conf_img: np.ndarray) -> np.ndarray:
    """(N, 4, 4) per-image confusions -> (N,) bool: True where swapping predicted A/B is better."""
    direct = np.trace(conf_img, axis1=1, axis2=2)
    swapped = np.trace(conf_img[:, :, SWAP_AB], axis1=1, axis2=2)
    return swapped > direct


def instance_iou_counts(conf_img: np.ndarray) -> np.ndarray:
    """(N, 4, 4) confusions -> (N, 2, 2) [[interA, unionA], [interB, unionB]] for A={1,3}, B={2,3}."""
    out = np.zeros((conf_img.shape[0], 2, 2), dtype=np.int64)
    for j, cls in enumerate(([1, 3], [2, 3])):
        sub = conf_img[:, cls][:, :, cls]
        inter = sub.sum(axis=(1, 2))
        gt = conf_img[:, cls, :].sum(axis=(1, 2))
        pl = conf_img[:, :, cls].sum(axis=(1, 2))
        out[:, j, 0] = inter
        out[:, j, 1] = gt + pl - inter
    return out


@dataclass
class SegmentationMetrics:
    """Accumulates per-image confusion matrices; `compute()` reduces them.

    `n_classes` is 3 (combined) or 4. 4-class inputs also give the permutation-invariant scores.
    """

    n_classes: int
    _confs: list[np.ndarray] = field(default_factory=list)

    def update(self, true: np.ndarray, pred: np.ndarray) -> np.ndarray:
        conf = confusion_per_image(true, pred, self.n_classes)
        self._confs.append(conf)
        return conf

    @property
    def per_image(self) -> np.ndarray:
        if not self._confs:
            return np.zeros((0, self.n_classes, self.n_classes), np.int64)
        return np.concatenate(self._confs)

    def compute(self) -> dict:
        confs = self.per_image
        if confs.shape[0] == 0:
            raise ValueError("no images were scored")
        return summarize(confs, self.n_classes)


def summarize(confs: np.ndarray, n_classes: int) -> dict:
    """Metrics dict (stable key names, see module doc) from (N, K, K) per-image confusions."""
    names = class_names(n_classes == 3)
    total = confs.sum(axis=0)
    dice_c, iou_c = per_class(total)
    out: dict = {
        "combine_label": n_classes == 3,
        "n_images": int(confs.shape[0]),
        "dice": ghosh_dice(total),
        "dice_per_class": {n: float(v) for n, v in zip(names, dice_c)},
        "iou_per_class": {n: float(v) for n, v in zip(names, iou_c)},
        "iou_overlap": float(iou_c[-1]),
        "pixel_accuracy": _safe_div(np.trace(total), total.sum()),
        "confusion_matrix": total.tolist(),
    }
    if n_classes == 4:
        out["dice_combined"] = ghosh_dice(merge_ab(total))
        out.update(permutation_invariant(confs))
    return out


def permutation_invariant(confs: np.ndarray) -> dict:
    """Permutation-invariant A/B scores from (N, 4, 4) per-image confusions."""
    swap = best_assignment(confs)
    pi = confs.copy()
    pi[swap] = confs[swap][:, :, SWAP_AB]
    total = pi.sum(axis=0)
    dice_c, iou_c = per_class(total)
    inst = instance_iou_counts(pi).sum(axis=0)
    iou_a = _safe_div(inst[0, 0], inst[0, 1])
    iou_b = _safe_div(inst[1, 0], inst[1, 1])
    names = class_names(False)
    return {
        "dice_pi": ghosh_dice(total),
        "dice_per_class_pi": {n: float(v) for n, v in zip(names, dice_c)},
        "iou_per_class_pi": {n: float(v) for n, v in zip(names, iou_c)},
        "iou_chromosome_a_pi": iou_a,
        "iou_chromosome_b_pi": iou_b,
        "iou_chromosomes_pi": (iou_a + iou_b) / 2,
        "n_swapped": int(swap.sum()),
    }


def per_image_dice(confs: np.ndarray) -> np.ndarray:
    """(N, K, K) -> (N,) Ghosh dice of each image (for picking worst/typical examples)."""
    inter = np.trace(confs[:, 1:, 1:], axis1=1, axis2=2).astype(np.float64)
    denom = confs[:, 1:, :].sum(axis=(1, 2)) + confs[:, :, 1:].sum(axis=(1, 2))
    return np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)


def instance_components(labels4: np.ndarray) -> np.ndarray:
    """(N, H, W) or (H, W) 4-class labels -> (N, 2) int64: 8-connected components of chromosome A
    ({1, 3}) and of chromosome B ({2, 3}) in each image."""
    lab = np.asarray(labels4)
    lab = lab[None] if lab.ndim == 2 else lab
    out = np.zeros((lab.shape[0], 2), np.int64)
    for j, mask in enumerate(labels_to_instances(lab)[:2]):
        comp, n = ndi.label(mask, structure=_EIGHT_IN_PLANE)
        if n:
            # Components are numbered across the stack; each lies in one image (its first axis).
            image_of = np.array([sl[0].start for sl in ndi.find_objects(comp)])
            out[:, j] = np.bincount(image_of, minlength=lab.shape[0])
    return out


def instances_connected(labels4: np.ndarray) -> np.ndarray:
    """(N, H, W) 4-class labels -> (N,) bool: A and B are each exactly one 8-connected component."""
    return (instance_components(labels4) == 1).all(axis=1)
