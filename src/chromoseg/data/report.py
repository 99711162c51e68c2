"""Dataset card (`chromoseg data report`): statistics of a Pommier-format dataset and a comparison with real-dev images.

`dataset_stats` is a pure function of (N, H, W) uint8 images and 0..3 labels. Its quantities are
defined so that they make sense when the real background is about 0 (grey levels, 8-bit):

- `width_px`: mean chromosome width, `estimate_width` of each chromosome's label mask (A = 1|3,
  B = 2|3), averaged over chromosomes.
- `single_grey`: mean grey of pixels labelled as one chromosome only (1 or 2).
- `background_grey`, `background_std`: mean and std of pixels more than 4 px from any label.
- `contrast`: `single_grey / (background_grey + 1)`; the `+ 1` keeps it finite on a black background.
- `overlap_ratio`: mean grey of overlap pixels / mean grey of single pixels, over images with overlap.
- `edge_fraction`: mean grey on the label boundary (single-chromosome boundary pixels, away from the
  overlap) / mean grey of the interior (>= 3 px inside): where the outline sits on the blurred edge.
- `blur_px`: 10-90 % rise width of the mean edge profile (grey against signed distance to the label
  boundary, normalised by the interior), in pixels.
- `texture`: robust std (1.4826 * MAD) of a 3x3 high-pass inside single-chromosome interiors,
  relative to `single_grey`: banding, chromatid groove and camera noise together.
- `peak_ratio`: per-image 99.5th percentile of single-chromosome grey / its median (telomere spots).
- `centre_ratio`: cross-section shape, mean over chromosomes of the grey on the axis (within 0.7 px
  of the deepest point of the mask) / the grey at 45-65 % of the way in, single pixels away from the
  overlap: above 1 for a rounded body, below 1 for a visible groove between the chromatids.
- `overlap_images`: fraction of images with any overlap pixel.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from chromoseg.data.io import read_dataset
from chromoseg.data.labelme import DEFAULT_TARGET_WIDTH, load_labelme_dir
from chromoseg.geometry import estimate_width
from chromoseg.plots import overlay

log = logging.getLogger(__name__)

STAT_KEYS = (
    "width_px",
    "single_grey",
    "background_grey",
    "background_std",
    "contrast",
    "overlap_ratio",
    "edge_fraction",
    "blur_px",
    "texture",
    "peak_ratio",
    "centre_ratio",
    "overlap_images",
)
# Quantities the synthetic set must match on real-dev within 15 % (the others are ~0 on real data).
MATCHED_KEYS = (
    "width_px",
    "single_grey",
    "contrast",
    "overlap_ratio",
    "edge_fraction",
    "blur_px",
    "texture",
    "peak_ratio",
    "centre_ratio",
)
_BINS = np.arange(-6.0, 7.0, 1.0)  # signed distance bins, px (negative = outside)


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """(H, W) signed distance to the mask boundary: >= 1 inside, <= -1 outside."""
    return ndi.distance_transform_edt(mask) - ndi.distance_transform_edt(~mask)


def _rise_width(dist: np.ndarray, prof: np.ndarray, lo: float = 0.1, hi: float = 0.9) -> float:
    """Distance between the lo and hi crossings of a rising profile (`dist` ascending)."""
    prof = np.maximum.accumulate(prof)
    return float(np.interp(hi, prof, dist) - np.interp(lo, prof, dist))


def _centre_ratio(g: np.ndarray, mask: np.ndarray, lab: np.ndarray) -> list[float]:
    """[axis grey / grey 45-65 % of the way in] for one chromosome mask, or [] if too little is single."""
    single = mask & (lab != 3) & ~ndi.binary_dilation(lab == 3, iterations=6)
    dt = ndi.distance_transform_edt(mask)
    r = float(np.percentile(dt[mask], 98))
    if r < 3:
        return []
    core = single & (dt >= r - 0.7)
    side = single & (dt >= 0.45 * r) & (dt <= 0.65 * r)
    if core.sum() < 5 or side.sum() < 5:
        return []
    return [float(g[core].mean() / max(g[side].mean(), 1e-6))]


def dataset_stats(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Appearance statistics (see module docstring) of (N, H, W) uint8 images and labels 0..3."""
    if images.shape != labels.shape or images.ndim != 3 or len(images) == 0:
        raise ValueError(f"images {images.shape} and labels {labels.shape} must be the same (N, H, W), N > 0")
    widths, singles, bgs, ovs, peaks, tex, centres = [], [], [], [], [], [], []
    bg_pixels = []
    prof_sum = np.zeros(len(_BINS))
    prof_cnt = np.zeros(len(_BINS))
    edge_sum = edge_cnt = inner_sum = inner_cnt = 0.0
    for img, lab in zip(images, labels, strict=True):
        g = img.astype(np.float64)
        fg = lab > 0
        single = (lab == 1) | (lab == 2)
        for m in ((lab == 1) | (lab == 3), (lab == 2) | (lab == 3)):
            if m.any():
                widths.append(estimate_width(m))
                centres.extend(_centre_ratio(g, m, lab))
        if not single.any():
            continue
        s_mean = float(g[single].mean())
        singles.append(s_mean)
        far = ~ndi.binary_dilation(fg, iterations=4)
        if far.any():
            bgs.append(float(g[far].mean()))
            bg_pixels.append(g[far])
        if (lab == 3).any():
            ovs.append(float(g[lab == 3].mean()) / max(s_mean, 1e-6))
        # Edge profile of single chromosomes, away from the overlap and the other chromosome.
        near_ov = ndi.binary_dilation(lab == 3, iterations=4)
        sd = _signed_distance(fg)
        interior = single & (sd >= 3) & ~near_ov
        if interior.sum() < 5:
            continue
        plateau = float(g[interior].mean())
        inner_sum += g[interior].sum()
        inner_cnt += interior.sum()
        edge = single & (sd == 1) & ~near_ov
        edge_sum += g[edge].sum()
        edge_cnt += edge.sum()
        sel = ~near_ov & (np.abs(sd) <= 6.5)
        idx = np.rint(sd[sel]).astype(int) + 6
        ok = (idx >= 0) & (idx < len(_BINS))
        np.add.at(prof_sum, idx[ok], g[sel][ok] / max(plateau, 1e-6))
        np.add.at(prof_cnt, idx[ok], 1)
        hp = g - ndi.uniform_filter(g, size=3, mode="nearest")
        v = hp[interior]
        tex.append(1.4826 * float(np.median(np.abs(v - np.median(v)))) / max(s_mean, 1e-6))
        peaks.append(float(np.percentile(g[single & ~near_ov], 99.5) / max(np.median(g[single]), 1e-6)))
    prof = prof_sum / np.maximum(prof_cnt, 1)
    # The signed distance skips 0: the boundary lies between -1 and +1.
    have = prof_cnt > 0
    bg_all = np.concatenate(bg_pixels) if bg_pixels else np.zeros(1)
    bg_grey = float(np.mean(bgs)) if bgs else 0.0
    single_grey = float(np.mean(singles)) if singles else 0.0
    return {
        "width_px": float(np.nanmean(widths)) if widths else float("nan"),
        "single_grey": single_grey,
        "background_grey": bg_grey,
        "background_std": float(bg_all.std()),
        "contrast": single_grey / (bg_grey + 1.0),
        "overlap_ratio": float(np.mean(ovs)) if ovs else float("nan"),
        "edge_fraction": edge_sum / max(inner_sum, 1e-6) * inner_cnt / max(edge_cnt, 1),
        "blur_px": _rise_width(_BINS[have], prof[have]),
        "texture": float(np.mean(tex)) if tex else float("nan"),
        "peak_ratio": float(np.mean(peaks)) if peaks else float("nan"),
        "centre_ratio": float(np.mean(centres)) if centres else float("nan"),
        "overlap_images": float(np.mean([(lab == 3).any() for lab in labels])),
    }


def compare_stats(synth: dict[str, float], real: dict[str, float]) -> dict[str, float]:
    """Relative difference `synth / real - 1` for each key present in both."""
    return {k: synth[k] / real[k] - 1.0 for k in STAT_KEYS if k in synth and k in real and real[k] != 0}


def contact_sheet(images: np.ndarray, labels: np.ndarray, cols: int = 8, zoom: int = 2) -> np.ndarray:
    """(rows * 2H * zoom, cols * W * zoom, 3) uint8: each image above its label overlay."""
    n, h, w = images.shape
    rows = -(-n // cols)
    sheet = np.full((rows * (2 * h + 2), cols * (w + 2), 3), 40, np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        y, x = r * (2 * h + 2), c * (w + 2)
        sheet[y : y + h, x : x + w] = images[k][..., None]
        sheet[y + h : y + 2 * h, x : x + w] = overlay(images[k], labels[k], combine_label=False)
    return np.kron(sheet, np.ones((zoom, zoom, 1), np.uint8))


def class_frequencies(labels: np.ndarray) -> list[float]:
    """Fraction of pixels in each class 0..3 of (N, H, W) labels."""
    counts = np.bincount(labels.ravel(), minlength=4)[:4].astype(np.float64)
    return (counts / max(counts.sum(), 1.0)).tolist()


def _sample(n: int, k: int) -> np.ndarray:
    """k evenly spaced indices out of n (all if n <= k)."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int))


def _plot_classes(freqs: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["background", "A only", "B only", "overlap"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(freqs)
    for j, (name, f) in enumerate(freqs.items()):
        ax.bar(np.arange(4) + j * width, f, width, label=name)
    ax.set_xticks(np.arange(4) + width * (len(freqs) - 1) / 2, names)
    ax.set_yscale("log")
    ax.set_ylabel("fraction of pixels")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def write_report(
    raw: str | os.PathLike[str],
    real_dev: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] = "reports",
    n_stats: int = 500,
    n_sheet: int = 32,
    target_width: float = DEFAULT_TARGET_WIDTH,
) -> Path:
    """Write `dataset_card.md`, `dataset_stats.json` and PNGs into `out_dir`; return the card path."""
    ds = read_dataset(raw)
    # Both inputs are read before anything is written: a bad folder leaves no partial report.
    real = None if real_dev is None else load_labelme_dir(real_dev, target_width)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    idx = _sample(len(ds), n_stats)
    stats = {"dataset": dataset_stats(ds.images[idx], ds.labels[idx])}
    freqs = {"dataset": class_frequencies(ds.labels)}
    sheet_idx = _sample(len(ds), n_sheet)
    Image.fromarray(contact_sheet(ds.images[sheet_idx], ds.labels[sheet_idx])).save(out / "contact_sheet.png")
    if real is not None:
        ri, rl, _, _ = real
        stats["real-dev"] = dataset_stats(ri, rl)
        freqs["real-dev"] = class_frequencies(rl)
        Image.fromarray(contact_sheet(ri, rl)).save(out / "contact_sheet_real_dev.png")
    _plot_classes(freqs, out / "class_frequencies.png")
    (out / "dataset_stats.json").write_text(
        json.dumps({"stats": stats, "class_frequencies": freqs}, indent=2)
    )
    card = out / "dataset_card.md"
    card.write_text(_card(Path(raw), ds, stats, freqs, len(idx), real_dev))
    log.info("wrote %s", card)
    return card


def _card(raw: Path, ds, stats: dict, freqs: dict, n_stats: int, real_dev) -> str:
    h, w = ds.images.shape[1:]
    groups = "none" if ds.source_ids is None else f"{len(np.unique(ds.source_ids))} source groups"
    lines = [
        f"# Dataset card: {raw.name}",
        "",
        f"- file: `{raw}` (key `{ds.key}`), {len(ds)} images of {h} x {w} px, uint8 grey + label 0..3",
        f"- groups (`source_id`): {groups}",
        "- labels: 0 background, 1 chromosome A only, 2 chromosome B only, 3 overlap",
        f"- statistics from {n_stats} evenly spaced images"
        + (f"; real-dev: `{real_dev}` through the labelme importer at the 88 x 88 scale" if real_dev else ""),
        "",
        "![contact sheet](contact_sheet.png)",
        "",
    ]
    if real_dev:
        lines += ["Real-dev after import:", "", "![real-dev](contact_sheet_real_dev.png)", ""]
    lines += ["## Class frequencies", "", "![class frequencies](class_frequencies.png)", ""]
    lines += ["| set | background | A only | B only | overlap |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {k} | " + " | ".join(f"{x:.4f}" for x in f) + " |" for k, f in freqs.items()]
    lines += ["", "## Appearance statistics", ""]
    if "real-dev" in stats:
        lines += ["| quantity | dataset | real-dev | difference |", "| --- | --- | --- | --- |"]
        for k in STAT_KEYS:
            a, b = stats["dataset"][k], stats["real-dev"][k]
            diff = f"{a / b - 1:+.1%}" if b else "n/a (real is 0)"
            lines.append(f"| {k} | {a:.3f} | {b:.3f} | {diff} |")
    else:
        lines += ["| quantity | dataset |", "| --- | --- |"]
        lines += [f"| {k} | {stats['dataset'][k]:.3f} |" for k in STAT_KEYS]
    lines += [
        "",
        "Definitions (from `chromoseg.data.report`):",
        "",
        "```",
        __doc__.split("\n\n", 1)[1].strip(),
        "```",
        "",
    ]
    return "\n".join(lines)
