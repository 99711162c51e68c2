"""The registered model: an MLflow pyfunc with its own validation, pre- and post-processing.

Input (any of):

- one grey image (H, W) or a batch (N, H, W), uint8 / integer 0..255 or float (0..1, or 0..255 when
  the maximum is above 1); a list of such images of different sizes;
- base64-encoded PNG (or any PIL-readable) strings: a list / 1-D array of strings, or a one-column
  DataFrame of strings (what MLflow's ``dataframe_split`` / ``dataframe_records`` JSON delivers);
- ``{"images": ...}`` holding any of the above.

Each side must be 8..``max_side`` px (default 2048; ``CHROMOSEG_MAX_SIDE`` env var or
``model_config={"max_side": ...}``), at most 64 Mpx per request. Test-time augmentation follows the
checkpoint (`train.tta`) unless ``CHROMOSEG_TTA`` (``0`` / ``1``) or ``model_config={"tta": ...}``
says otherwise. The network works at the 88 x 88 LowRes scale: images at another scale are resized
by the request's ``params={"scale": "0.5"}`` (a number as text, or ``"auto"``: measured on each image,
`chromoseg.data.scale`), else by ``CHROMOSEG_SCALE`` or ``model_config={"scale": ...}`` (default 1,
no resizing); the outputs come back at each input's size. Images are grouped by size, padded to what
the network needs, batched, and cropped back. Output: a dict of ``labels`` (the model's label
space), ``mask_a`` and ``mask_b`` (each chromosome including the overlap) and ``overlap``, each
uint8: an (N, H, W) array when all images have one size, else a list of N (H_i, W_i) arrays.
Through the scoring server both become ``{"predictions": {"labels": [image_0, ...], ...}}`` with
each image a nested list of ints.

Bad input raises ``MlflowException(INVALID_PARAMETER_VALUE)``: HTTP 400 with a short message.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
PACKAGE_DIR = Path(__file__).resolve().parent
OUTPUT_KEYS = ("labels", "mask_a", "mask_b", "overlap")
MIN_SIDE = 8
DEFAULT_MAX_SIDE = 2048
MAX_SIDE_ENV = "CHROMOSEG_MAX_SIDE"
TTA_ENV = "CHROMOSEG_TTA"
SCALE_ENV = "CHROMOSEG_SCALE"
# Per request: 64 Mpx (~8700 images of 88 x 88) bounds the server's memory; clients split larger batches.
MAX_TOTAL_PIXELS = 64 * 1024 * 1024


class InputError(ValueError):
    """Model input that cannot be served; the message is short (the server echoes the input too)."""


def load_checkpoint(path: str | Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def checkpoint_ab_order(ck: dict) -> str:
    """How the checkpoint's training labels named A and B; checkpoints from before the rule was
    recorded named A the larger chromosome."""
    return ck.get("ab_order", "area")


def predictor_from_checkpoint(path: str | Path, precision: str | None = None, backend: str = "auto"):
    """Build an `infer.Predictor` from a `models/model.pt` checkpoint."""
    from chromoseg.config import TrainConfig, _build
    from chromoseg.infer import Predictor
    from chromoseg.model import exec_plan

    ck = load_checkpoint(path)
    cfg = _build(TrainConfig, ck["train"], "train")
    plan = exec_plan(precision or cfg.precision, cfg.channels_last)
    ab_order = ck.get("ab_order", "none")
    return Predictor(ck["state_dict"], cfg, ck["n_classes"], plan, backend=backend, ab_order=ab_order), ck


# ---------------------------------------------------------------------------------------------- input


def decode_png(s: str | bytes, max_side: int = DEFAULT_MAX_SIDE) -> np.ndarray:
    """A base64 string (optionally a ``data:image/...;base64,`` URI) -> (H, W) uint8 grey image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(s, str):
        s = s.split(",", 1)[1] if s.startswith("data:") else s
        s = s.encode("ascii", errors="replace")
    try:
        raw = base64.b64decode(s, validate=True)
        img = Image.open(io.BytesIO(raw))
    except (binascii.Error, ValueError) as exc:
        raise InputError("is not valid base64") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError("is base64 but not a PNG/JPEG/TIFF image") from exc
    w, h = img.size
    # Checked before decoding the pixels: a small file can declare a huge image.
    _check_size(h, w, max_side)
    try:
        return np.asarray(img.convert("L"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise InputError("is a truncated or corrupt image") from exc


def _check_size(h: int, w: int, max_side: int) -> None:
    if min(h, w) < MIN_SIDE or max(h, w) > max_side:
        raise InputError(f"is {h}x{w} px; each side must be {MIN_SIDE}..{max_side} px")


def _is_text(x: Any) -> bool:
    return isinstance(x, str | bytes | np.str_ | np.bytes_)


def _unwrap(x: Any) -> Any:
    """Strip the containers MLflow and clients wrap images in: dict of one input, DataFrame, Series."""
    import pandas as pd

    if isinstance(x, dict):
        if len(x) != 1:
            raise InputError(f"send one input (e.g. 'images'), got {len(x)}: {sorted(map(str, x))[:4]}")
        x = next(iter(x.values()))
    if isinstance(x, pd.DataFrame):
        if x.shape[1] != 1:
            raise InputError(f"send a DataFrame with one column of images, got {x.shape[1]} columns")
        x = x.iloc[:, 0]
    if isinstance(x, pd.Series):
        x = x.tolist()
    return x


def split_images(x: Any, max_side: int = DEFAULT_MAX_SIDE) -> list[np.ndarray]:
    """Any accepted input (see module doc) -> list of (H, W) float32 images in [0, 1].

    Raises InputError naming the problem and the offending image.
    """
    x = _unwrap(x)
    if (isinstance(x, list | tuple) and len(x) == 0) or (isinstance(x, np.ndarray) and x.size == 0):
        raise InputError("input is empty; send at least one image")
    if isinstance(x, np.ndarray) and x.dtype != object and not _is_text(x.flat[0] if x.size else 0):
        if x.ndim not in (2, 3):
            raise InputError(f"input has {x.ndim} dims {x.shape}; send (H, W) or (N, H, W) grey images")
        items: Sequence[Any] = [x] if x.ndim == 2 else list(x)
    else:
        if _is_text(x):
            x = [x]
        if isinstance(x, np.ndarray):
            x = x.tolist()
        if not isinstance(x, list | tuple):
            raise InputError(f"input type {type(x).__name__} is not an image, list of images or PNG strings")
        if any(_is_text(v) for v in x):
            items = list(x)
        else:
            # Nested lists from JSON: one (H, W) image or a batch; images may differ in size.
            arr = _as_array(x)
            if arr is None:  # ragged: a list of images of different sizes
                items = list(x)
            elif arr.ndim in (2, 3):
                items = [arr] if arr.ndim == 2 else list(arr)
            else:
                raise InputError(
                    f"input has {arr.ndim} dims {arr.shape}; send (H, W) or (N, H, W) grey images"
                )
    if len(items) == 0:
        raise InputError("input is empty; send at least one image")
    out = []
    total = 0
    for i, item in enumerate(items):
        try:
            out.append(_one_image(item, max_side))
        except InputError as exc:
            raise InputError(f"image {i} {exc}") from None
        total += out[-1].size
        if total > MAX_TOTAL_PIXELS:
            raise InputError(
                f"request exceeds {MAX_TOTAL_PIXELS} px at image {i}; split it into smaller batches"
            )
    return out


def _as_array(x: Any) -> np.ndarray | None:
    """np.asarray, or None for ragged nesting (images of different sizes)."""
    try:
        arr = np.asarray(x)
    except ValueError:
        return None
    return None if arr.dtype == object else arr


def _one_image(item: Any, max_side: int) -> np.ndarray:
    if _is_text(item):
        return decode_png(item, max_side).astype(np.float32) / 255.0
    arr = item if isinstance(item, np.ndarray) else _as_array(item)
    if arr is None:
        raise InputError("is ragged or mixes types; send equal-length rows of numbers")
    if arr.dtype == object:
        arr = _as_array(arr.tolist())
        if arr is None:
            raise InputError("is ragged or mixes types; send equal-length rows of numbers")
    if arr.ndim != 2:
        raise InputError(f"has {arr.ndim} dims {arr.shape}; each image must be (H, W) grey")
    if arr.size == 0:
        raise InputError(f"is empty {arr.shape}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"has dtype {arr.dtype}; send numbers (uint8 0..255 or float 0..1)")
    _check_size(*arr.shape, max_side)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"has dtype {arr.dtype}; send real numbers")
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf: rejected below
        f = arr.astype(np.float32)
    if not np.isfinite(f).all():
        raise InputError("contains NaN or infinite values")
    lo, hi = float(f.min()), float(f.max())
    if lo < 0 or hi > 255:
        raise InputError(f"has values {lo:g}..{hi:g}; send 0..255 or 0..1")
    # Integers are grey values 0..255; floats too when above 1, else already 0..1.
    if np.issubdtype(arr.dtype, np.integer) or hi > 1.0:
        f = f / 255.0
    return f


def to_float_images(x: Any, max_side: int = DEFAULT_MAX_SIDE) -> np.ndarray:
    """Validate same-size input -> (N, H, W) float32 in [0, 1]. Raise ValueError (InputError) with the fix."""
    images = split_images(x, max_side)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise InputError(f"images differ in size {sorted(shapes)[:3]}; use split_images for mixed sizes")
    return np.stack(images)


# ---------------------------------------------------------------------------------------------- output


def postprocess(
    labels: np.ndarray,
    combine_label: bool,
    images: np.ndarray | None = None,
    labels4: np.ndarray | None = None,
) -> dict:
    """(N, H, W) label maps -> dict of label map and instance masks (A, B include the overlap), uint8.

    Combined labels are split into chromosomes A and B by `labels4` when the model gives them (its
    A/B head, `Predictor.predict_segmentation`), else by geometry (`separate.separate_instances`).
    Overlap specks too small to be a crossing are relabelled first (`separate.drop_small_overlaps`),
    then overlap that borders only one of the two chromosomes (`separate.drop_one_sided_overlaps`),
    so the returned label map is the cleaned one.
    """
    from chromoseg.labels import combine_labels, labels_to_instances
    from chromoseg.separate import drop_one_sided_overlaps, drop_small_overlaps, separate_instances

    if combine_label and labels4 is not None:
        # Specks go to the nearer of A and B, then A and B are merged back: the same label map as
        # cleaning the combined labels (the specks and widths are measured on the same masks).
        labels4 = drop_small_overlaps(labels4, combine_label=False)
        labels = combine_labels(labels4)
    else:
        labels = drop_small_overlaps(labels, combine_label)
        labels4 = separate_instances(labels, images) if combine_label else labels
    cleaned4 = drop_one_sided_overlaps(labels4)
    # Combined: only the overlap pixels given to a chromosome change in the label map.
    labels = np.where((labels4 == 3) & (cleaned4 != 3), 1, labels) if combine_label else cleaned4
    labels4 = cleaned4
    a, b, ov = labels_to_instances(labels4)
    return {
        "labels": labels.astype(np.uint8),
        "mask_a": a.astype(np.uint8),
        "mask_b": b.astype(np.uint8),
        "overlap": ov.astype(np.uint8),
    }


def segment(predictor, images: np.ndarray, combine_label: bool) -> dict:
    """(N, H, W) float32 images of one size -> `postprocess` output, through the model's own A/B split
    where it has one."""
    labels, labels4 = predictor.predict_segmentation(images)
    return postprocess(labels, combine_label, images, labels4)


def predict_images(predictor, images: list[np.ndarray], combine_label: bool) -> dict:
    """Run images of any sizes: grouped by size, one batched call per group, results in input order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.shape, []).append(i)
    if len(groups) == 1:
        return segment(predictor, np.stack(images), combine_label)
    out: dict[str, list] = {k: [None] * len(images) for k in OUTPUT_KEYS}
    for idx in groups.values():
        res = segment(predictor, np.stack([images[i] for i in idx]), combine_label)
        for k in OUTPUT_KEYS:
            for j, i in enumerate(idx):
                out[k][i] = res[k][j]
    return out


# ---------------------------------------------------------------------------------------------- pyfunc

try:
    import mlflow.pyfunc

    _Base = mlflow.pyfunc.PythonModel
except ImportError:  # pragma: no cover
    _Base = object


def resolve_max_side(model_config: dict | None = None) -> int:
    """Largest accepted image side: env CHROMOSEG_MAX_SIDE, else model_config['max_side'], else 2048."""
    raw = os.environ.get(MAX_SIDE_ENV) or (model_config or {}).get("max_side") or DEFAULT_MAX_SIDE
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ValueError(
            f"{MAX_SIDE_ENV}/max_side must be an integer number of pixels, got {raw!r}"
        ) from None
    if value < MIN_SIDE:
        raise ValueError(f"{MAX_SIDE_ENV}/max_side must be >= {MIN_SIDE}, got {value}")
    return value


def resolve_tta(default: bool, model_config: dict | None = None) -> bool:
    """Test-time augmentation: env CHROMOSEG_TTA, else model_config['tta'], else the checkpoint's."""
    raw = os.environ.get(TTA_ENV)
    if raw is None:
        raw = (model_config or {}).get("tta", default)
    value = {"1": True, "true": True, "0": False, "false": False}.get(str(raw).strip().lower())
    if value is None:
        raise ValueError(f"{TTA_ENV}/tta must be 0 or 1 (or true / false), got {raw!r}")
    return value


def resolve_scale(model_config: dict | None = None) -> float | str:
    """The server's default scale: env CHROMOSEG_SCALE, else model_config['scale'], else 1."""
    from chromoseg.data.scale import ScaleError, parse_scale

    raw = os.environ.get(SCALE_ENV) or (model_config or {}).get("scale")
    try:
        return parse_scale(raw)
    except ScaleError as exc:
        raise ValueError(f"{SCALE_ENV}/scale: {exc}") from None


def predict_scaled(
    predictor, images: list[np.ndarray], combine_label: bool, scale: float | str, max_side: int
) -> dict:
    """`predict_images` on the images resized by `scale` (or each one's measured scale, ``auto``),
    with every output resized back (nearest) to its input's size."""
    from chromoseg.data.scale import ScaleError, image_scales, resize, scaled_shape

    if scale == 1.0:
        return predict_images(predictor, images, combine_label)
    try:
        scales = image_scales(images, scale)
    except ScaleError as exc:
        raise InputError(f"{exc}; send it with a numeric scale") from None
    resized = []
    for i, (im, s) in enumerate(zip(images, scales, strict=True)):
        shape = scaled_shape(im.shape, s)
        try:
            _check_size(*shape, max_side)
        except InputError as exc:
            raise InputError(f"image {i} at scale {s:.3g} {exc}") from None
        resized.append(resize(im, shape))
    res = predict_images(predictor, resized, combine_label)
    out = {k: [resize(np.asarray(res[k][i]), im.shape, nearest=True) for i, im in enumerate(images)]
           for k in OUTPUT_KEYS}  # fmt: skip
    if len({im.shape for im in images}) == 1:
        return {k: np.stack(v) for k, v in out.items()}
    return out


class ChromosegModel(_Base):
    """MLflow pyfunc wrapper around `infer.Predictor` (see the module doc for input and output)."""

    def load_context(self, context) -> None:
        self.predictor, ck = predictor_from_checkpoint(context.artifacts[MODEL_ARTIFACT])
        self.combine_label = bool(ck["combine_label"])
        self.ab_order = checkpoint_ab_order(ck)
        self.max_side = resolve_max_side(getattr(context, "model_config", None))
        self.predictor.tta = resolve_tta(self.predictor.tta, getattr(context, "model_config", None))
        self.scale = resolve_scale(getattr(context, "model_config", None))
        log.info(
            "chromoseg model loaded: combine_label=%s, max_side=%d, scale=%s, %s",
            self.combine_label, self.max_side, self.scale, self.predictor.describe(),
        )  # fmt: skip

    def predict(self, context, model_input, params: dict | None = None) -> dict:
        from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

        from chromoseg.data.scale import ScaleError, parse_scale

        max_side = getattr(self, "max_side", DEFAULT_MAX_SIDE)
        try:
            try:
                scale = parse_scale((params or {}).get("scale"), getattr(self, "scale", 1.0))
            except ScaleError as exc:
                raise InputError(f"params {exc}") from None
            images = split_images(model_input, max_side)
            return predict_scaled(self.predictor, images, self.combine_label, scale, max_side)
        except InputError as exc:
            raise MlflowException(f"chromoseg: {exc}", error_code=INVALID_PARAMETER_VALUE) from None


def default_example() -> np.ndarray:
    """(1, 88, 88) uint8: one synthetic overlapping pair, the input example logged with the model."""
    from chromoseg.config import SynthConfig
    from chromoseg.data.synth import generate

    images, _, _ = generate(SynthConfig(), n=1)
    return np.ascontiguousarray(images[:1], dtype=np.uint8)


def model_signature():
    """Signature: any input (validated by the model itself), four uint8 (N, H, W) outputs, and one
    optional string param `scale` ("0.5", "auto"; "" for the server's default).

    The input spec is an unnamed object tensor on purpose: MLflow then passes arrays, PNG strings and
    DataFrames through unchanged, so the model answers bad input with its own short 400 message
    instead of MLflow's cast errors (which would turn floats into uint8 silently).
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(object), (-1,))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1), name=n) for n in OUTPUT_KEYS]),
        # "" = the server's default (CHROMOSEG_SCALE / model_config, else 1); "0.5"; "auto".
        params=ParamSchema([ParamSpec("scale", "string", "")]),
    )


def log_pyfunc_model(model_path: str | Path, params, plan, example: np.ndarray | None = None):
    """Log the checkpoint as a pyfunc model (with signature and input example) to the active run."""
    import mlflow

    if example is None:
        example = default_example()
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=ChromosegModel(),
        artifacts={MODEL_ARTIFACT: str(model_path)},
        code_paths=[str(PACKAGE_DIR)],
        signature=model_signature(),
        input_example=example,
        pip_requirements=_requirements(),
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    pkgs = ("torch", "segmentation-models-pytorch", "timm", "numpy", "mlflow", "scipy", "scikit-image",
            "pyyaml", "pillow", "onnxruntime", "onnx")  # fmt: skip
    out = []
    for p in pkgs:
        try:
            out.append(f"{p}=={version(p)}")
        except Exception:
            continue
    return out
