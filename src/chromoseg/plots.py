"""Pictures of label maps: class colours, overlays on the grey image, the overlay grid and the
confusion-matrix PNG that `evaluate` writes, the overlays `predict` writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chromoseg.fsutil import atomic_path

# Overlay colours (RGB): A red, B blue, overlap yellow; combined chromosome green.
COLOURS_4 = np.array([[0, 0, 0], [230, 40, 40], [40, 90, 255], [255, 220, 0]], np.uint8)
COLOURS_3 = np.array([[0, 0, 0], [40, 200, 80], [255, 220, 0]], np.uint8)


def colourise(labels: np.ndarray, combine_label: bool) -> np.ndarray:
    return (COLOURS_3 if combine_label else COLOURS_4)[labels]


def overlay(image: np.ndarray, labels: np.ndarray, combine_label: bool, alpha: float = 0.45) -> np.ndarray:
    """(H, W) uint8 grey + labels -> (H, W, 3) uint8 with the classes tinted."""
    grey = np.repeat(image[..., None], 3, axis=-1).astype(np.float32)
    col = colourise(labels, combine_label).astype(np.float32)
    fg = (labels > 0)[..., None]
    return np.where(fg, (1 - alpha) * grey + alpha * col, grey).clip(0, 255).astype(np.uint8)


def overlay_grid(
    images, truth, pred, worst, typical, scores, combine_label: bool, scale: int = 2
) -> np.ndarray:
    """Rows of [image | truth overlay | prediction overlay] tiles: worst on the left, typical right."""
    tiles = []
    for a, b in zip(worst, typical):
        row = []
        for i in (a, b):
            row += [
                np.repeat(images[i][..., None], 3, axis=-1),
                overlay(images[i], truth[i], combine_label),
                overlay(images[i], pred[i], combine_label),
            ]
        tiles.append(
            np.concatenate([np.pad(t, ((1, 1), (1, 1), (0, 0)), constant_values=255) for t in row], 1)
        )
    grid = np.concatenate(tiles, 0)
    return np.kron(grid, np.ones((scale, scale, 1), np.uint8))


def save_png(path: Path, rgb: np.ndarray) -> None:
    """(H, W, 3) uint8 -> PNG file, written atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


def confusion_png(path: Path, total: np.ndarray, names: tuple[str, ...]) -> None:
    """Row-normalised confusion matrix (pixels, actual x predicted) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = total / np.maximum(total.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(
                j,
                i,
                f"{norm[i, j]:.3f}",
                ha="center",
                va="center",
                color="black" if norm[i, j] < 0.6 else "white",
            )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("confusion (row-normalised)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
