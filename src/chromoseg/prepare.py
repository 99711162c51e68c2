"""Stage `prepare`: read the raw HDF5, check labels, combine classes, split train/val/test.

Outputs `{out_dir}/{train,val,test}.npz`, each with `images` (N, H, W) uint8, `labels` (N, H, W) uint8
in the training label space (3 classes combined, 4 otherwise), `labels4` (the 4-class truth, kept so
that instance separation can be scored in combined mode), `index` (row in the raw file) and `source`.

Split `index` (Ghosh 2017): first 80% train, last 20% test; validation = the first `val_size` images
of the test part. Those validation images select the best checkpoint, so they are *removed* from the
test set that the final metrics use. Split `group`: whole source groups go to one side only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from chromoseg.config import Params, PrepareConfig
from chromoseg.data.io import DataError, read_dataset
from chromoseg.fsutil import atomic_path, write_json
from chromoseg.labels import canonical_ab, combine_labels

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def split_indices(
    n: int, cfg: PrepareConfig, source_ids: np.ndarray | None, seed: int
) -> dict[str, np.ndarray]:
    """Row indices of each split. Pure: depends only on its arguments."""
    n_test = max(1, round(n * cfg.test_fraction))
    if n - n_test < 1:
        raise DataError(f"{n} images are too few to split with test_fraction={cfg.test_fraction}")
    if cfg.split == "index":
        train = np.arange(0, n - n_test)
        test_part = np.arange(n - n_test, n)
    else:
        if source_ids is None:
            raise DataError(
                "prepare.split=group needs a `source_id` array in the HDF5 file (written by "
                "`chromoseg synth` and the importers); use prepare.split=index for this file"
            )
        groups = np.unique(source_ids)
        order = np.random.default_rng(seed).permutation(groups)
        counts = np.array([(source_ids == g).sum() for g in order])
        # Groups from the end of the permutation go to test until it holds >= n_test images.
        cum = np.cumsum(counts[::-1])
        n_groups_test = int(np.searchsorted(cum, n_test) + 1)
        test_groups = order[::-1][:n_groups_test]
        is_test = np.isin(source_ids, test_groups)
        if is_test.all():
            raise DataError("group split put every image in test: too few source groups; use split=index")
        train = np.flatnonzero(~is_test)
        test_part = np.flatnonzero(is_test)
    n_val = min(cfg.val_size, len(test_part) // 2)
    if n_val < 1:
        raise DataError(f"test part of {len(test_part)} images is too small for a validation split")
    return {"train": train, "val": test_part[:n_val], "test": test_part[n_val:]}


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write an uncompressed npz atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_split(out_dir: str | Path, split: str) -> dict[str, np.ndarray]:
    p = Path(out_dir) / f"{split}.npz"
    if not p.is_file():
        raise DataError(f"{p}: prepared split missing; run `dvc repro prepare` (or `chromoseg prepare`)")
    with np.load(p) as z:
        return {k: z[k] for k in z.files}


def run_prepare(params: Params) -> dict:
    from chromoseg.data.validate import check_dataset, check_labels

    cfg = params.prepare
    ds = read_dataset(cfg.raw, cfg.key)
    check_dataset(cfg.raw, ds.images, ds.labels)
    images, labels4, sources = ds.images, ds.labels, ds.source_ids
    if cfg.max_images:
        images, labels4 = images[: cfg.max_images], labels4[: cfg.max_images]
        sources = None if sources is None else sources[: cfg.max_images]
    n_raw = len(images)
    log.info("read %d images %s from %s (key %s)", n_raw, images.shape[1:], cfg.raw, ds.key)
    images, labels4, keep, report = check_labels(images, labels4, n_valid=4, policy=cfg.label_policy)
    if sources is not None:
        sources = sources[keep]
    if len(images) == 0:
        raise DataError(f"{cfg.raw}: no usable images left after label checks (policy {cfg.label_policy})")
    index = np.arange(n_raw)[keep]
    labels4 = canonical_ab(labels4, cfg.ab_order)
    target = combine_labels(labels4) if params.combine_label else labels4
    parts = split_indices(len(images), cfg, sources, params.seed)
    out = Path(cfg.out_dir)
    for name in SPLITS:
        idx = parts[name]
        save_npz(
            out / f"{name}.npz",
            images=images[idx],
            labels=target[idx],
            labels4=labels4[idx],
            index=index[idx],
            source=(sources[idx] if sources is not None else np.full(len(idx), -1, np.int64)),
        )
    summary = {
        "n_raw": n_raw,
        "n_kept": len(images),
        **{f"n_{k}": len(v) for k, v in parts.items()},
        "combine_label": params.combine_label,
        "split": cfg.split,
        "label_policy": cfg.label_policy,
        **{f"labels_{k}": v for k, v in report.items()},
    }
    if sources is not None and cfg.split == "group":
        shared = np.intersect1d(sources[parts["train"]], sources[parts["test"]]).size
        summary["groups_shared_train_test"] = int(shared)
    write_json(cfg.metrics, summary)
    log.info("prepared splits: %s", {k: len(v) for k, v in parts.items()})
    return summary
