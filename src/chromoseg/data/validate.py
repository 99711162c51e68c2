"""Label checks for Pommier-format datasets: invalid values, stray specks, isolated pixels.

`check_dataset` rejects files that cannot be a LowRes pair set at all (frames smaller than 88 x 88, a
label channel that is not 0..3); `chromoseg import kaggle` and `prepare` both call it, so a bad file is
refused at import with the error that `prepare` would give.

`check_labels` finds three kinds of problem in (N, H, W) label arrays, vectorised over the whole array:

- `invalid`: values >= `n_valid` (Pommier's raw file has a few);
- `speck`: 8-connected components of a non-background class with at most `max_speck` pixels;
- `isolated`: pixels whose value differs from every in-frame 8-neighbour.

and then applies a policy: `none` reports only (but invalid values raise, since training cannot use
them), `drop` removes affected images, `repair` relabels affected pixels by a majority vote over their
unaffected 3x3 neighbours (ties go to the lower class, so background wins a tie).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from chromoseg.data.errors import DataError

log = logging.getLogger(__name__)

Policy = Literal["none", "drop", "repair"]
POLICIES = ("none", "drop", "repair")
KINDS = ("invalid", "speck", "isolated")
# Pommier's LowRes frames are 88 x 88 (94 x 93 cleaned); the model is trained and scored at that scale,
# where one pair spans up to the whole frame. A smaller frame is another scale or a cropped pair.
MIN_SIDE = 88
# `repair` and `drop` are meant for stray values (a majority vote of good neighbours). When more than
# this share of the labelled pixels is out of range, the channel does not hold the 0..3 classes at all
# (channels swapped, a 0/255 mask) and repairing would turn it into background.
MAX_INVALID_FRACTION = 0.05
_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def check_dataset(source: str, images: np.ndarray, labels: np.ndarray, n_valid: int = 4) -> None:
    """Raise DataError (one line, naming `source`) unless (N, H, W) uint8 images and labels can be a
    LowRes pair set: frames of at least `MIN_SIDE` px and labels mostly within 0..n_valid-1."""
    if images.shape != labels.shape or labels.ndim != 3:
        raise DataError(f"{source}: images {images.shape} and labels {labels.shape} must both be (N, H, W)")
    h, w = labels.shape[1:]
    if min(h, w) < MIN_SIDE:
        raise DataError(
            f"{source}: images are {h} x {w} px, expected at least {MIN_SIDE} x {MIN_SIDE} (Pommier's "
            "LowRes scale, about 11.5 px chromosome width); use the LowRes file or rescale the images"
        )
    n_labelled = int(np.count_nonzero(labels))
    n_invalid = int(np.count_nonzero(labels >= n_valid))
    if n_invalid > MAX_INVALID_FRACTION * max(n_labelled, 1):
        raise DataError(
            f"{source}: {n_invalid} of {n_labelled} labelled pixels have values >= {n_valid} (max "
            f"{int(labels.max())}); channel 1 must hold the labels 0 background, 1 chromosome A, "
            "2 chromosome B, 3 overlap: check the file's channel order and label coding"
        )


def _neighbours(a: np.ndarray, fill: int) -> list[np.ndarray]:
    """The 8 neighbour views of an (N, H, W) array, each (N, H, W), `fill` outside the frame."""
    h, w = a.shape[1:]
    p = np.pad(a, ((0, 0), (1, 1), (1, 1)), constant_values=fill)
    return [p[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in _OFFSETS]


def find_problems(labels: np.ndarray, n_valid: int = 4, max_speck: int = 4) -> dict[str, np.ndarray]:
    """Masks of each problem kind, (N, H, W) bool each, keyed by `KINDS`."""
    labels = np.asarray(labels)
    invalid = labels >= n_valid
    speck = np.zeros(labels.shape, bool)
    # A 3-D structure that connects pixels only within one image.
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True
    for c in range(1, n_valid):
        comp, _ = ndi.label(labels == c, structure=structure)
        for k, sl in enumerate(ndi.find_objects(comp), start=1):
            # A component of <= max_speck pixels fits in a max_speck x max_speck box; only those
            # few are counted exactly, which keeps this fast on 13434 images.
            if sl is None or sl[1].stop - sl[1].start > max_speck or sl[2].stop - sl[2].start > max_speck:
                continue
            m = comp[sl] == k
            if m.sum() <= max_speck:
                speck[sl] |= m
    # 256 never equals a label value, so out-of-frame neighbours never agree.
    wide = labels.astype(np.int16)
    agrees = np.zeros(labels.shape, bool)
    for nb in _neighbours(wide, 256):
        agrees |= nb == wide
    return {"invalid": invalid, "speck": speck & ~invalid, "isolated": ~agrees & ~invalid}


def majority_repair(labels: np.ndarray, bad: np.ndarray, n_valid: int = 4) -> np.ndarray:
    """Relabel `bad` pixels of (N, H, W) labels by a 3x3 majority vote over good neighbours."""
    out = labels.copy()
    good = ~bad & (labels < n_valid)
    votes = np.zeros((n_valid, *labels.shape), np.uint8)
    for lab, ok in zip(_neighbours(labels, 0), _neighbours(good, False), strict=True):
        for c in range(n_valid):
            votes[c] += (lab == c) & ok
    out[bad] = np.argmax(votes, axis=0).astype(labels.dtype)[bad]
    return out


def check_labels(
    images: np.ndarray,
    labels: np.ndarray,
    n_valid: int = 4,
    policy: Policy = "repair",
    max_speck: int = 4,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """Check (N, H, W) labels; return images, labels, kept indices (K,) int64 and a flat int report."""
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r} is not one of {list(POLICIES)}")
    if images.shape != labels.shape or labels.ndim != 3:
        raise DataError(f"images {images.shape} and labels {labels.shape} must both be (N, H, W)")
    n = labels.shape[0]
    report: dict[str, int] = {"n_images": int(n)}
    affected = np.zeros(n, bool)
    bad_pixels = np.zeros(labels.shape, bool)
    problems = find_problems(labels, n_valid, max_speck)
    for kind in KINDS:
        m = problems[kind]
        per_image = m.any(axis=(1, 2))
        report[f"{kind}_images"] = int(per_image.sum())
        report[f"{kind}_pixels"] = int(m.sum())
        affected |= per_image
        bad_pixels |= m
    report["affected_images"] = int(affected.sum())
    keep = np.arange(n, dtype=np.int64)
    report["dropped_images"] = 0
    report["repaired_pixels"] = 0
    if policy == "none":
        if report["invalid_pixels"]:
            raise DataError(
                f"{report['invalid_pixels']} label pixels in {report['invalid_images']} images have "
                f"values >= {n_valid}; set prepare.label_policy to 'drop' or 'repair'"
            )
    elif policy == "drop":
        keep = np.flatnonzero(~affected).astype(np.int64)
        images, labels = images[keep], labels[keep]
        report["dropped_images"] = int(affected.sum())
    else:
        idx = np.flatnonzero(affected)
        if idx.size:
            fixed = majority_repair(labels[idx], bad_pixels[idx], n_valid)
            labels = labels.copy()
            labels[idx] = fixed
            report["repaired_pixels"] = int(bad_pixels.sum())
    report["kept_images"] = len(keep)
    log.info("label check (%s): %s", policy, report)
    return images, labels, keep, report
