"""HDF5 dataset I/O in Pommier's layout: key `dataset_1`, uint8 (N, H, W, 2), [..., 0] grey, [..., 1] label.

Writes are atomic (temp file + rename) and byte-identical for identical input (`track_times=False`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from chromoseg.data.errors import DataError
from chromoseg.fsutil import atomic_path

__all__ = ["DataError", "Dataset", "import_kaggle", "read_dataset", "write_dataset"]

log = logging.getLogger(__name__)

KEY_RAW = "dataset_1"
KEY_CLEANED = "13434_overlapping_chrom_pairs_LowRes"
KNOWN_KEYS = (KEY_RAW, KEY_CLEANED)
SOURCE_KEY = "source_id"


@dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # (N, H, W) uint8
    labels: np.ndarray  # (N, H, W) uint8, 0..3
    source_ids: np.ndarray | None  # (N,) int64 group of each image, or None
    key: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


def read_dataset(path: str | os.PathLike[str], key: str = "auto") -> Dataset:
    """Read a Pommier-format HDF5 file. `key="auto"` takes the first known key present."""
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"{p}: file not found; run `chromoseg synth` for the default dataset, "
            "`dvc pull`, or `chromoseg import kaggle FILE.h5`"
        )
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise DataError(
            f"{p}: not a readable HDF5 file ({exc}); the file is truncated or corrupt, "
            "copy it again or regenerate it with `chromoseg synth`"
        ) from exc
    with f:
        keys = list(f.keys())
        if key == "auto":
            found = [k for k in KNOWN_KEYS if k in f]
            if not found:
                raise DataError(
                    f"{p}: none of the expected keys {list(KNOWN_KEYS)} found (keys: {keys}); "
                    "set prepare.key in params.yaml to the dataset's key"
                )
            key = found[0]
        elif key not in f:
            raise DataError(f"{p}: key {key!r} not found (keys: {keys}); set prepare.key to one of them")
        ds = f[key]
        if not isinstance(ds, h5py.Dataset):
            raise DataError(f"{p}: {key!r} is a group, not an array; expected (N, H, W, 2) uint8")
        if ds.ndim != 4 or ds.shape[-1] != 2:
            raise DataError(
                f"{p}: {key!r} has shape {ds.shape}; expected (N, H, W, 2) with channel 0 the grey "
                "image and channel 1 the label"
            )
        if ds.shape[0] == 0:
            raise DataError(f"{p}: {key!r} holds no images (shape {ds.shape}); the dataset is empty")
        if ds.dtype != np.uint8:
            raise DataError(f"{p}: {key!r} has dtype {ds.dtype}; expected uint8")
        try:
            arr = ds[()]
            sources = f[SOURCE_KEY][()].astype(np.int64) if SOURCE_KEY in f else None
        except OSError as exc:
            raise DataError(f"{p}: could not read {key!r} ({exc}); the file is truncated or corrupt") from exc
    if sources is not None and sources.shape != (arr.shape[0],):
        raise DataError(f"{p}: {SOURCE_KEY!r} has shape {sources.shape}, expected ({arr.shape[0]},)")
    return Dataset(
        images=np.ascontiguousarray(arr[..., 0]),
        labels=np.ascontiguousarray(arr[..., 1]),
        source_ids=sources,
        key=key,
    )


def write_dataset(
    path: str | os.PathLike[str],
    images: np.ndarray,
    labels: np.ndarray,
    source_ids: np.ndarray | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write (N, H, W) uint8 images and labels as `dataset_1` atomically; byte-identical output."""
    p = Path(path)
    if images.shape != labels.shape or images.ndim != 3:
        raise DataError(f"images {images.shape} and labels {labels.shape} must both be (N, H, W)")
    data = np.stack([images.astype(np.uint8), labels.astype(np.uint8)], axis=-1)
    # No timestamps, fixed library version bounds: the same bytes on every machine.
    with atomic_path(p) as tmp, h5py.File(tmp, "w", libver=("earliest", "v108"), track_order=False) as f:
        f.create_dataset(KEY_RAW, data=data, track_times=False)
        if source_ids is not None:
            f.create_dataset(SOURCE_KEY, data=np.asarray(source_ids, np.int32), track_times=False)
        for name, arr in (extra or {}).items():
            f.create_dataset(name, data=arr, track_times=False)
    return p


# --- Kaggle importer -------------------------------------------------------------------------------
# Pommier's Kaggle files come in two layouts: the raw `dataset_1` (N, 88, 88, 2) and the cleaned
# `13434_overlapping_chrom_pairs_LowRes` (N, 94, 93, 2). Both are written as `dataset_1` keeping their
# own H, W: the pipeline pads every image to a multiple of 32, and cropping the cleaned variant to
# 88 x 88 could cut off chromosome ends. The original image index is kept as `source_index`.


def _kaggle_error(p: Path, what: str, fix: str) -> DataError:
    return DataError(f"{p}: {what}; {fix}")


def read_kaggle(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, str]:
    """Read a Kaggle HDF5 file in either layout: (N, H, W) uint8 images, labels, and the key used."""
    p = Path(path)
    if not p.is_file():
        raise _kaggle_error(p, "file not found", "pass the path of the downloaded Kaggle .h5 file")
    if p.stat().st_size == 0:
        raise _kaggle_error(p, "file is empty (0 bytes)", "download it again")
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise _kaggle_error(
            p, f"not a readable HDF5 file ({exc})", "the file is corrupt or truncated; download it again"
        ) from exc
    with f:
        found = [k for k in KNOWN_KEYS if k in f]
        if not found:
            raise _kaggle_error(
                p,
                f"none of the keys {list(KNOWN_KEYS)} found (keys: {list(f.keys())})",
                "this is not one of Pommier's overlapping-pairs files; check the download",
            )
        key = found[0]
        ds = f[key]
        if not isinstance(ds, h5py.Dataset):
            raise _kaggle_error(p, f"{key!r} is a group, not an array", "check the download")
        if ds.ndim != 4 or ds.shape[-1] != 2:
            raise _kaggle_error(
                p,
                f"{key!r} has shape {ds.shape}, expected (N, H, W, 2) (grey, label)",
                "use Pommier's LowRes overlapping-pairs file",
            )
        if ds.shape[0] == 0 or ds.shape[1] == 0 or ds.shape[2] == 0:
            raise _kaggle_error(p, f"{key!r} holds no images (shape {ds.shape})", "download it again")
        if not np.issubdtype(ds.dtype, np.integer):
            raise _kaggle_error(p, f"{key!r} has dtype {ds.dtype}, expected uint8", "check the download")
        try:
            arr = ds[()]
        except (OSError, ValueError) as exc:
            raise _kaggle_error(
                p, f"could not read {key!r} ({exc})", "the file is truncated or corrupt; download it again"
            ) from exc
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise _kaggle_error(
                p, f"{key!r} values span {arr.min()}..{arr.max()}, expected 0..255", "check the download"
            )
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr[..., 0]), np.ascontiguousarray(arr[..., 1]), key


def import_kaggle(src: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Copy a Kaggle file into data/raw/ as `dataset_1` (atomic; nothing is written on any error)."""
    from chromoseg.data.validate import check_dataset

    s = Path(src)
    images, labels, key = read_kaggle(s)
    check_dataset(str(s), images, labels)
    path = Path(out) if out is not None else Path("data/raw") / f"{s.stem}.h5"
    if path.exists() and path.resolve() == s.resolve():
        raise DataError(f"{path}: output is the input file; pass a different --out")
    index = np.arange(len(images), dtype=np.int32)
    write_dataset(path, images, labels, extra={"source_index": index})
    log.info("imported %d images %s from %s (key %r) to %s", len(images), images.shape[1:], s, key, path)
    log.info("next step: dvc add %s", path.parent)
    return path
