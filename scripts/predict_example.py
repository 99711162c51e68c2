"""Make docs/predict_example.png: inputs (left) beside `chromoseg predict` overlays (right).

    chromoseg predict ../shared/data/real-dev/labelme/{grey0084311,grey0084400,grey0083901}.json \
        --scale 0.5 --out /tmp/pe
    python scripts/predict_example.py /tmp/pe ../shared/data/real-dev/labelme/{grey0084311,grey0084400,grey0083901}.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from chromoseg.predict import load_image

GAP = 6


def main(pred_dir: str, *sources: str, out: str = "docs/predict_example.png") -> None:
    rows = []
    for src in sources:
        grey = load_image(src)
        ov = np.asarray(Image.open(Path(pred_dir) / f"{Path(src).stem}_overlay.png").convert("RGB"))
        left = np.repeat(grey[..., None], 3, axis=2)
        h = max(left.shape[0], ov.shape[0])
        pad = [np.pad(a, ((0, h - a.shape[0]), (0, 0), (0, 0))) for a in (left, ov)]
        rows.append(np.concatenate([pad[0], np.full((h, GAP, 3), 255, np.uint8), pad[1]], axis=1))
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
    Image.fromarray(sheet).save(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
