"""`chromoseg predict`: segment image files with a model run in-process (registered, a run, or a
`model.pt` checkpoint: `pipeline.load_model`) or a running server.

Per input image it writes, into the output folder:

- ``<stem>_labels.png``: palette PNG of the instance labels (0 background, 1 A only, 2 B only,
  3 overlap); the pixel values are the classes, the palette shows them as in the overlays;
- ``<stem>_overlay.png``: the grey image with A red, B blue, overlap yellow (`chromoseg.plots`);
- ``<stem>_summary.json``: image size, areas of A, B and the overlap in px (at the input's scale), the overlap
  fraction (overlap / pixels of A or B), the scale and the model URI or server URL.

Inputs are PNG/JPEG/TIFF files or labelme JSON files (their embedded image). The network was
trained at the 88 x 88 LowRes scale (chromosome width ~11.5 px); each image is resized before
inference and the masks back (nearest) afterwards. By default (``auto``) the scale is measured on
each image from its chromosomes' width (`chromoseg.data.scale`; inside the range of training widths
the image is left as it is); a number (0.5 for the real-dev images, 1 for LowRes-sized ones) is
used for every image instead. The summary records the scale used and `scale_from` (``image`` or
``given``).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chromoseg.config import InferConfig
from chromoseg.data.scale import AUTO, ScaleError, parse_scale, resize, scaled_shape
from chromoseg.data.scale import image_scales as _image_scales
from chromoseg.labels import instances_to_labels4
from chromoseg.pipeline import OUTPUT_KEYS

log = logging.getLogger(__name__)

DEFAULT_MODEL = "models:/chromoseg-unet@champion"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class PredictError(ValueError):
    """A user-facing problem with the inputs, the model or the server."""


@dataclass(frozen=True)
class Result:
    """One image's prediction at its original size: (H, W) bool masks."""

    mask_a: np.ndarray
    mask_b: np.ndarray
    overlap: np.ndarray

    @property
    def labels4(self) -> np.ndarray:
        return instances_to_labels4(self.mask_a, self.mask_b)


def load_image(path: str | Path) -> np.ndarray:
    """An image file or a labelme JSON (embedded or referenced image) -> (H, W) uint8 grey."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise PredictError(f"{p}: no such file")
    if p.suffix.lower() == ".json":
        from chromoseg.data.io import DataError
        from chromoseg.data.labelme import _read_image

        try:
            doc = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PredictError(
                f"{p}: not a readable JSON file ({exc}); pass an image or a labelme file"
            ) from exc
        if not isinstance(doc, dict):
            raise PredictError(f"{p}: not a labelme file (no JSON object); pass an image or a labelme file")
        try:
            return _read_image(p, doc)
        except DataError as exc:
            raise PredictError(str(exc)) from exc
    try:
        with Image.open(p) as img:
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise PredictError(
            f"{p}: not a readable image ({exc}); pass {'/'.join(IMAGE_SUFFIXES)} or labelme .json"
        ) from exc


def encode_png(image: np.ndarray) -> str:
    """(H, W) uint8 -> base64 PNG string (the server's compact input format)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class LocalModel:
    """A model run in this process (`pipeline.load_model`: a registry or run URI, or a checkpoint)."""

    def __init__(self, uri: str, infer: InferConfig | None = None) -> None:
        from chromoseg.pipeline import ModelLoadError, load_model

        self.uri = uri
        try:
            self._model = load_model(uri, infer)
        except ModelLoadError as exc:
            raise PredictError(str(exc)) from None

    def predict(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        from chromoseg.pipeline import InputError

        try:
            res = self._model.predict(images)
        except InputError as exc:
            raise PredictError(f"model rejected the input: {exc}") from exc
        return [{k: np.asarray(v[i]) for k, v in res.items()} for i in range(len(images))]


class RemoteModel:
    """A running `mlflow models serve` at `url`; images travel as base64 PNG strings."""

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        self.uri = url.rstrip("/")
        self.timeout = timeout

    def predict(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        # The images come resized to the training scale (`run_model`): the server must not measure again.
        body = json.dumps({"inputs": [encode_png(im) for im in images], "params": {"scale": "1"}}).encode()
        preds = post_json(self.uri + "/invocations", body, self.timeout)["predictions"]
        return [{k: np.asarray(preds[k][i], np.uint8) for k in OUTPUT_KEYS} for i in range(len(images))]


def post_json(url: str, body: bytes, timeout: float = 120.0) -> dict[str, Any]:
    """POST a JSON body; return the decoded reply or raise PredictError with the server's message."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        with contextlib.suppress(json.JSONDecodeError, AttributeError):
            detail = json.loads(detail).get("message", detail)
        # The server prefixes the whole input to model errors; keep the model's own part.
        detail = detail.split("Error: ")[-1][-500:]
        raise PredictError(f"{url} answered HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise PredictError(
            f"cannot reach {url} ({exc}); start the server (make serve) or pass the right --url"
        ) from exc


def image_scales(images: list[np.ndarray], scale: float | str, names: list[str] | None = None) -> list[float]:
    """One resize factor per image (`chromoseg.data.scale.image_scales`), errors as PredictError."""
    try:
        scale = parse_scale(scale)
    except ScaleError as exc:
        raise PredictError(str(exc)) from None
    try:
        return _image_scales(images, scale, names)
    except ScaleError as exc:
        raise PredictError(f"{exc}; pass --scale with a number instead of auto") from None


def run_model(
    model: LocalModel | RemoteModel, images: list[np.ndarray], scale: float | str = 1.0
) -> list[Result]:
    """Predict (H, W) uint8 images at `scale` (a factor, a list of one per image, or ``auto``); masks
    come back at each image's original size."""
    scales = scale if isinstance(scale, list) else image_scales(images, scale)
    inputs = [resize(im, scaled_shape(im.shape, s)) for im, s in zip(images, scales, strict=True)]
    outs = model.predict(inputs)
    results = []
    for im, out in zip(images, outs):
        a, b, ov = (
            resize(out[k].astype(np.uint8), im.shape, nearest=True) > 0
            for k in ("mask_a", "mask_b", "overlap")
        )
        results.append(Result(a, b, ov))
    return results


def summary(result: Result, image_path: str, model_uri: str, scale: float) -> dict[str, Any]:
    """Areas in px at the input image's scale; overlap fraction = overlap / (A or B) pixels."""
    a, b, ov = result.mask_a, result.mask_b, result.overlap
    union = int((a | b).sum())
    return {
        "image": image_path,
        "height": int(a.shape[0]),
        "width": int(a.shape[1]),
        "area_a_px": int(a.sum()),
        "area_b_px": int(b.sum()),
        "area_overlap_px": int(ov.sum()),
        "overlap_fraction": round(int(ov.sum()) / union, 6) if union else 0.0,
        "scale": scale,
        "model": model_uri,
    }


def write_outputs(out_dir: Path, stem: str, image: np.ndarray, result: Result, info: dict) -> list[Path]:
    from PIL import Image

    from chromoseg.plots import COLOURS_4, overlay

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = result.labels4
    lab_img = Image.fromarray(labels, mode="P")
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(COLOURS_4)] = COLOURS_4
    lab_img.putpalette(palette.ravel().tolist())
    paths = [
        out_dir / f"{stem}_labels.png",
        out_dir / f"{stem}_overlay.png",
        out_dir / f"{stem}_summary.json",
    ]
    lab_img.save(paths[0])
    Image.fromarray(overlay(image, labels, combine_label=False)).save(paths[1])
    paths[2].write_text(json.dumps(info, indent=1) + "\n")
    return paths


def predict_files(
    images: list[Path],
    out_dir: Path,
    model: str | None = None,
    url: str | None = None,
    scale: float | str = AUTO,
    infer: InferConfig | None = None,
) -> list[dict[str, Any]]:
    """Segment each file with the local `model` (URI or checkpoint) or the server at `url`; write
    outputs; return summaries. `infer`: how a local model predicts (default `InferConfig()`)."""
    if (model is None) == (url is None):
        raise PredictError("give either a model URI (--model) or a server URL (--url), not both")
    if not images:
        raise PredictError("no input images given")
    arrays = [load_image(p) for p in images]
    # Before the model loads: a bad scale or an image without chromosomes fails fast.
    scales = image_scales(arrays, scale, [str(p) for p in images])
    scale_from = "image" if parse_scale(scale) == AUTO else "given"
    runner: LocalModel | RemoteModel = RemoteModel(url) if url else LocalModel(model, infer)  # type: ignore[arg-type]
    results = run_model(runner, arrays, scales)
    summaries = []
    stems: dict[str, int] = {}
    for path, image, res, used in zip(images, arrays, results, scales, strict=True):
        stem = path.stem
        # Two inputs with one name (a.png, a.json) must not overwrite each other.
        if stem in stems:
            stems[stem] += 1
            stem = f"{stem}_{stems[stem]}"
        else:
            stems[stem] = 0
        info = summary(res, str(path), runner.uri, round(used, 4))
        info["scale_from"] = scale_from
        write_outputs(out_dir, stem, image, res, info)
        log.info(
            "%s: A %d px, B %d px, overlap %d px (%.1f%%)",
            path, info["area_a_px"], info["area_b_px"], info["area_overlap_px"], 100 * info["overlap_fraction"],
        )  # fmt: skip
        summaries.append(info)
    return summaries
