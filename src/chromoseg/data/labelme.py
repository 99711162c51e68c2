"""Read labelme polygon annotations of chromosome pairs into Pommier's 88 x 88 format.

This module is the one way to read labelme for `chromoseg import labelme`, `chromoseg
evaluate-external --labelme DIR` and the registry's real-image gate: `load_labelme_dir` returns
arrays at the LowRes scale.

Each JSON file must hold exactly two polygons labelled `chromosome`: the first is chromosome A, the
second B; pixels inside both are the overlap (label 3). The grey image comes from the embedded
`imageData` (base64 PNG) or, when that is empty, from the file at `imagePath` next to the JSON. It
must have the size the annotation was drawn on (`imageHeight` x `imageWidth`, and every polygon
point inside it) and the polarity of the training data: chromosomes brighter than the background
(fluorescence, as in Pommier's set). Anything else is a `DataError` naming the file.

Rescaling: the pair is cropped around its centre and resampled (antialiased bilinear) so that the
mean chromosome width, measured on the polygon masks with `estimate_width`, becomes `target_width`
pixels, the width of the synthetic set. If the pair still does not fit into the frame with a 2 px
margin it is shrunk further. The labels are rasterised from the polygons transformed to the output
grid (exact nearest-neighbour sampling of the polygons, no resampling of a label image). The final
scale (output px per input px) of every image is returned and stored as `scale`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from chromoseg import __version__
from chromoseg.data.io import DataError, write_dataset
from chromoseg.fsutil import atomic_path
from chromoseg.geometry import border_pixels, estimate_width

log = logging.getLogger(__name__)

LABEL = "chromosome"
DEFAULT_TARGET_WIDTH = 11.5
MARGIN = 2  # px kept free around the pair in the output frame
MIN_CONTRAST = 4.0  # grey levels the chromosomes must be above the background (real-dev: ~70)
REAL_DIR = "data/real"  # imported real sets: apart from data/raw, which holds the synthetic default
IMPORTER_VERSION = "2"  # bump when the same labelme files would give different arrays
WIDTH_SOURCES = ("labels", "image")  # what sets each pair's scale (`load_labelme_dir`)

Polygon = list[tuple[float, float]]


def polygon_mask(points: Polygon, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise a polygon (x, y pixel-centre coordinates) into an (H, W) bool mask."""
    img = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(img).polygon([(float(x), float(y)) for x, y in points], fill=255, outline=255)
    return np.asarray(img) > 0


def _fail(path: Path, what: str, fix: str) -> DataError:
    return DataError(f"{path}: {what}; {fix}")


def read_labelme(path: str | os.PathLike[str]) -> tuple[np.ndarray, Polygon, Polygon]:
    """Read one labelme file: (H, W) uint8 grey image and the polygons of chromosomes A and B."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(p, f"not a readable labelme JSON file ({exc})", "re-export it from labelme") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
        raise _fail(p, "no 'shapes' list", "this is not a labelme annotation; re-export it from labelme")
    polys = [
        s
        for s in doc["shapes"]
        if isinstance(s, dict) and s.get("label") == LABEL and s.get("shape_type", "polygon") == "polygon"
    ]
    if len(polys) != 2:
        raise _fail(
            p,
            f"found {len(polys)} polygon(s) labelled {LABEL!r}, expected exactly 2 (A first, B second)",
            "fix the annotation in labelme so that the pair has one polygon per chromosome",
        )
    out: list[Polygon] = []
    for k, s in enumerate(polys):
        try:
            pts = [(float(x), float(y)) for x, y in s["points"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise _fail(p, f"polygon {k} has malformed points", "re-draw it in labelme") from exc
        if len(pts) < 3:
            raise _fail(p, f"polygon {k} has {len(pts)} points, needs >= 3", "re-draw it in labelme")
        out.append(pts)
    return _read_image(p, doc), out[0], out[1]


def _read_image(p: Path, doc: dict) -> np.ndarray:
    data = doc.get("imageData")
    if data:
        try:
            raw = base64.b64decode(data, validate=False)
            img = Image.open(io.BytesIO(raw))
            img.load()
        except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as exc:
            raise _fail(
                p, f"embedded imageData is not a readable image ({exc})", "re-save the file in labelme"
            ) from exc
        source = "imageData"
    else:
        rel = doc.get("imagePath")
        if not rel:
            raise _fail(p, "no imageData and no imagePath", "re-save it in labelme with the image embedded")
        ip = p.parent / rel
        if not ip.is_file():
            raise _fail(
                p,
                f"image {ip} (imagePath) not found and no imageData embedded",
                "put the image next to the JSON or re-save with 'Save image data' on",
            )
        try:
            img = Image.open(ip)
            img.load()
        except (UnidentifiedImageError, OSError) as exc:
            raise _fail(p, f"image {ip} is not readable ({exc})", "replace it with a valid image") from exc
        source = str(ip)
    arr = np.asarray(img.convert("L"), dtype=np.uint8)
    h, w = doc.get("imageHeight"), doc.get("imageWidth")
    if isinstance(h, int) and isinstance(w, int) and (h, w) != arr.shape:
        raise _fail(
            p,
            f"the image ({source}) is {arr.shape[0]} x {arr.shape[1]} px but the polygons were drawn on "
            f"{h} x {w} (imageHeight x imageWidth)",
            "open the original image in labelme and save the annotation again",
        )
    return arr


def check_pair(path: Path, image: np.ndarray, poly_a: Polygon, poly_b: Polygon) -> None:
    """Raise DataError unless the polygons lie on the (H, W) image and the chromosomes are brighter
    than the background (the polarity every training image has)."""
    h, w = image.shape
    for k, poly in enumerate((poly_a, poly_b)):
        pts = np.asarray(poly)
        # labelme keeps points within [0, size]; more than a pixel outside means another image size.
        if (pts < -1).any() or (pts[:, 0] > w + 1).any() or (pts[:, 1] > h + 1).any():
            x, y = pts[np.argmax(np.maximum(pts[:, 0] - w, pts[:, 1] - h))]
            raise _fail(
                path,
                f"polygon {k} reaches ({x:.0f}, {y:.0f}), outside the {h} x {w} px image",
                "the polygons were drawn on an image of another size; annotate this image in labelme",
            )
    inside = polygon_mask(poly_a, (h, w)) | polygon_mask(poly_b, (h, w))
    if not inside.any() or inside.all():
        return  # reported by the caller as a polygon that covers no pixel
    fg, bg = float(image[inside].mean()), float(np.median(image[~inside]))
    if not fg > bg + MIN_CONTRAST:
        raise _fail(
            path,
            f"the chromosomes are not brighter than the background (mean grey {fg:.0f} inside the "
            f"polygons, {bg:.0f} outside)",
            "chromoseg expects bright chromosomes on a dark background (fluorescence, as Pommier's "
            "set); invert the image (255 - grey) before annotating",
        )


def polygon_scale(shape: tuple[int, int], poly_a: Polygon, poly_b: Polygon, target_width: float) -> float:
    """Output px per input px that makes the two polygons' mean width `target_width` px."""
    ma, mb = polygon_mask(poly_a, shape), polygon_mask(poly_b, shape)
    width = float(np.nanmean([estimate_width(ma), estimate_width(mb)]))
    if not np.isfinite(width) or width <= 0:
        raise ValueError("polygons are empty after rasterisation")
    return target_width / width


def to_lowres(
    image: np.ndarray,
    poly_a: Polygon,
    poly_b: Polygon,
    target_width: float = DEFAULT_TARGET_WIDTH,
    size: int = 88,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Crop and rescale one annotated pair: (size, size) uint8 grey, uint8 label 0..3, scale.

    `scale` (output px per input px) replaces the one from the polygons' width, e.g. one measured on
    the grey image (`chromoseg.data.scale`); the pair is still shrunk further if it does not fit.
    """
    h, w = image.shape
    if scale is None:
        scale = polygon_scale((h, w), poly_a, poly_b, target_width)
    elif not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    pts = np.asarray(poly_a + poly_b) + 0.5  # continuous coordinates: pixel k spans [k, k + 1)
    lo, hi = pts.min(0), pts.max(0)
    extent = float((hi - lo).max()) * scale
    room = size - 2 * MARGIN
    if extent > room:
        scale *= room / extent
    cx, cy = (lo + hi) / 2.0
    half = size / 2.0 / scale
    # Pad so that the crop box always lies inside the image (background is ~0 in real data).
    pad = int(np.ceil(half)) + 2
    bg = int(np.median(border_pixels(image)))
    padded = np.pad(image, pad, mode="constant", constant_values=bg)
    box = (cx - half + pad, cy - half + pad, cx + half + pad, cy + half + pad)
    grey = Image.fromarray(padded).resize((size, size), Image.Resampling.BILINEAR, box=box)
    # Polygons on the output grid, in PIL's pixel-centre convention.
    x0, y0 = cx - half, cy - half

    def _tf(poly: Polygon) -> Polygon:
        return [((x + 0.5 - x0) * scale - 0.5, (y + 0.5 - y0) * scale - 0.5) for x, y in poly]

    la = polygon_mask(_tf(poly_a), (size, size))
    lb = polygon_mask(_tf(poly_b), (size, size))
    label = la.astype(np.uint8) + 2 * lb.astype(np.uint8)
    return np.asarray(grey, dtype=np.uint8), label, float(scale)


def load_labelme_dir(
    directory: str | os.PathLike[str],
    target_width: float = DEFAULT_TARGET_WIDTH,
    size: int = 88,
    width_from: str = "labels",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """All `*.json` in `directory` (sorted): (N, size, size) uint8 grey and labels, (N,) scales, names.

    `width_from`: `labels` rescales each pair by its polygons' width (the truth), `image` by the width
    measured on the grey image (`chromoseg.data.scale.auto_scale`, what `predict --scale auto` does
    with an unlabelled image), times `target_width / DEFAULT_TARGET_WIDTH`.
    """
    recs = _load_records(directory, target_width, size, width_from)
    return (
        np.stack([r["grey"] for r in recs]),
        np.stack([r["label"] for r in recs]),
        np.asarray([r["scale"] for r in recs], np.float64),
        [r["name"] for r in recs],
    )


def _load_records(directory, target_width: float, size: int, width_from: str) -> list[dict]:
    """One dict per `*.json` file (sorted by name): arrays at the LowRes scale and their provenance."""
    from chromoseg.data.scale import ScaleError, auto_scale

    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"{d}: not a directory; pass the folder that holds the labelme *.json files")
    if not target_width > 0:
        raise ValueError(f"target_width must be > 0 px, got {target_width}")
    if width_from not in WIDTH_SOURCES:
        raise ValueError(f"width_from must be one of {list(WIDTH_SOURCES)}, got {width_from!r}")
    files = sorted(d.glob("*.json"))
    if not files:
        raise DataError(f"{d}: no *.json files found; pass the folder that holds the labelme annotations")
    recs = []
    for f in files:
        img, pa, pb = read_labelme(f)
        check_pair(f, img, pa, pb)
        scale = None
        if width_from == "image":
            try:
                scale = auto_scale(img) * target_width / DEFAULT_TARGET_WIDTH
            except ScaleError as exc:
                raise _fail(f, str(exc), "use the polygons' width instead (--width-from labels)") from exc
        try:
            g, lab, s = to_lowres(img, pa, pb, target_width, size, scale)
            width_scale = polygon_scale(img.shape, pa, pb, target_width) if scale is None else scale
        except ValueError as exc:
            raise _fail(f, str(exc), "re-draw the polygons in labelme") from exc
        if not (lab & 1).any() or not (lab & 2).any():
            raise _fail(f, "a polygon covers no pixel", "re-draw the polygons in labelme")
        recs.append(
            {
                "name": f.name,
                "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
                "image_sha256": image_sha256(img),
                "image_shape": list(img.shape),
                "grey": g,
                "label": lab,
                "scale": s,
                "width_scale": float(width_scale),
            }
        )
    return recs


def image_sha256(image: np.ndarray) -> str:
    """Identity of a decoded (H, W) uint8 grey image, whatever file or encoding it came in."""
    h = hashlib.sha256(f"{image.shape[0]}x{image.shape[1]}:".encode())
    h.update(np.ascontiguousarray(image, np.uint8).tobytes())
    return h.hexdigest()


def default_real_set_path(directory: str | os.PathLike[str]) -> Path:
    """`data/real/<folder name>.h5`; a folder called `labelme` is named after its parent
    (real-dev/labelme -> data/real/real-dev.h5)."""
    d = Path(directory).resolve()
    name = d.name if d.name != "labelme" else d.parent.name
    return Path(REAL_DIR) / f"{name}.h5"


def provenance_path(h5_path: str | os.PathLike[str]) -> Path:
    """The provenance JSON written next to an imported set: `NAME.h5` -> `NAME.provenance.json`."""
    p = Path(h5_path)
    return p.with_name(p.stem + ".provenance.json")


def import_labelme(
    directory: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    target_width: float = DEFAULT_TARGET_WIDTH,
    size: int = 88,
) -> tuple[Path, Path]:
    """Convert a labelme folder into a real-image set: `data/real/NAME.h5` (Pommier's format, labels
    0..3 at the training scale) and `data/real/NAME.provenance.json` next to it.

    Every file is checked before anything is written; both files are written atomically, so on any
    error nothing in `data/` changes. The output is byte-identical for identical input.
    """
    d = Path(directory)
    recs = _load_records(d, target_width, size, "labels")
    path = Path(out) if out is not None else default_real_set_path(d)
    prov_path = provenance_path(path)
    images = np.stack([r["grey"] for r in recs])
    labels = np.stack([r["label"] for r in recs])
    names = [r["name"] for r in recs]
    scales = np.asarray([r["scale"] for r in recs], np.float64)
    extra = {"scale": scales, "source_name": np.array([n.encode() for n in names], dtype="S")}
    with atomic_path(prov_path) as prov_tmp:
        write_dataset(path, images, labels, source_ids=np.arange(len(names), dtype=np.int32), extra=extra)
        provenance = {
            "importer": f"chromoseg.data.labelme {IMPORTER_VERSION} (chromoseg {__version__})",
            "source_dir": _display_path(d),
            "output": path.name,
            "output_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "n_images": len(recs),
            "size": [size, size],
            "labels": "0 background, 1 chromosome A (first polygon), 2 chromosome B (second), 3 overlap",
            "target_width_px": target_width,
            "scale_rule": (
                "scale (output px per input px) = target_width_px / the mean medial-axis width of the "
                "two polygons; shrunk further when the pair would not fit the frame with a "
                f"{MARGIN} px margin (fit_shrink < 1)"
            ),
            "images": [
                {
                    "index": i,
                    "file": r["name"],
                    "sha256": r["sha256"],
                    "image_sha256": r["image_sha256"],
                    "image_shape": r["image_shape"],
                    "scale": round(r["scale"], 6),
                    "fit_shrink": round(r["scale"] / r["width_scale"], 6),
                }
                for i, r in enumerate(recs)
            ],
        }
        prov_tmp.write_text(json.dumps(provenance, indent=2) + "\n")
    log.info("wrote %d labelme images %s to %s and %s", len(names), images.shape[1:], path, prov_path)
    return path, prov_path


def _display_path(d: Path) -> str:
    """The source folder relative to the project root when it can be, so provenance files do not
    carry one machine's absolute paths."""
    from chromoseg.tracking import project_root

    resolved = d.resolve()
    try:
        return os.path.relpath(resolved, project_root())
    except ValueError:  # another drive (Windows)
        return str(resolved)
