"""The registered model: an MLflow pyfunc with its own validation, pre- and post-processing.

Input (any of):

- one grey image (H, W) or a batch (N, H, W), uint8 / integer 0..255 or float (0..1, or 0..255 when
  the maximum is above 1); a list of such images of different sizes;
- base64-encoded PNG (or any PIL-readable) strings: a list / 1-D array of strings, or a one-column
  DataFrame of strings (what MLflow's ``dataframe_split`` / ``dataframe_records`` JSON delivers);
- ``{"images": ...}`` holding any of the above.

Each side must be 8..``max_side`` px (default 2048; ``CHROMOSEG_MAX_SIDE`` env var or
``model_config={"max_side": ...}``), at most 64 Mpx per request. Test-time augmentation uses
``model_config={"tta_views": ...}`` (written at registration from `infer.tta_views`) unless
``CHROMOSEG_TTA`` says otherwise (``0``: none, ``1``: that default, or a view count 2, 4, 8).

The network works at the 88 x 88 LowRes scale: each image's chromosome width is measured and the
image resized to the training width (``auto``, `chromoseg.data.scale`; inside the training widths, not
resized) unless the request's ``params={"scale": "0.5"}`` (a number as text; ``"1"`` for
LowRes-sized images), ``CHROMOSEG_SCALE`` or ``model_config={"scale": ...}`` gives one; the outputs
come back at each input's size. Images are grouped by size, padded to what the network needs,
batched, and cropped back. Output: a dict of ``labels`` (the model's label
space), ``mask_a`` and ``mask_b`` (each chromosome including the overlap) and ``overlap``, each
uint8: an (N, H, W) array when all images have one size, else a list of N (H_i, W_i) arrays; and
per image the ``scale`` used and ``scale_from`` (``image``: measured, ``request``: the request's
param, ``server``: the server's default).
Through the scoring server both become ``{"predictions": {"labels": [image_0, ...], ...}}`` with
each image a nested list of ints.

Bad input raises ``MlflowException(INVALID_PARAMETER_VALUE)``: HTTP 400 with a short message.
The model itself runs through `chromoseg.pipeline`, as everywhere else; this module only decodes,
validates and answers. `chromoseg.mlmodel` logs it to MLflow.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from chromoseg.config import TTA_VIEWS, InferConfig
from chromoseg.pipeline import (
    DEFAULT_MAX_SIDE,
    MIN_SIDE,
    InputError,
    check_size,
    model_from_checkpoint,
    predict_scaled,
    resolve_scales,
)

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
MAX_SIDE_ENV = "CHROMOSEG_MAX_SIDE"
TTA_ENV = "CHROMOSEG_TTA"
SCALE_ENV = "CHROMOSEG_SCALE"
# Per request: 64 Mpx (~8700 images of 88 x 88) bounds the server's memory; clients split larger batches.
MAX_TOTAL_PIXELS = 64 * 1024 * 1024


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
    check_size(h, w, max_side)
    try:
        return np.asarray(img.convert("L"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise InputError("is a truncated or corrupt image") from exc


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
    check_size(*arr.shape, max_side)
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


def resolve_tta_views(default: int, model_config: dict | None = None) -> int:
    """Test-time augmentation views: env CHROMOSEG_TTA (0 / false: none, 1 / true: the configured
    count, or a view count), else the configured count: model_config['tta_views'], else `default`."""
    configured = (model_config or {}).get("tta_views", default)
    raw, where = os.environ.get(TTA_ENV), TTA_ENV
    if raw is None or not str(raw).strip():
        raw, where = configured, "tta_views"
    else:
        raw = {"0": 1, "false": 1, "1": configured, "true": configured}.get(str(raw).strip().lower(), raw)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = None
    if value not in TTA_VIEWS:
        raise ValueError(f"{where} must be one of {list(TTA_VIEWS)} (CHROMOSEG_TTA also 0 / 1), got {raw!r}")
    return value


def resolve_scale(model_config: dict | None = None) -> float | str:
    """The server's default scale: env CHROMOSEG_SCALE, else model_config['scale'], else ``auto``
    (measured on each image, `chromoseg.data.scale`)."""
    from chromoseg.data.scale import AUTO, ScaleError, parse_scale

    raw = os.environ.get(SCALE_ENV) or (model_config or {}).get("scale")
    try:
        return parse_scale(raw, AUTO)
    except ScaleError as exc:
        raise ValueError(f"{SCALE_ENV}/scale: {exc}") from None


class ChromosegModel(_Base):
    """MLflow pyfunc wrapper around `infer.Predictor` (see the module doc for input and output)."""

    scale: float | str = "auto"  # the server's default (`resolve_scale`)
    max_side: int = DEFAULT_MAX_SIDE

    def load_context(self, context) -> None:
        config = getattr(context, "model_config", None) or {}
        infer = InferConfig(
            tta_views=resolve_tta_views(InferConfig.tta_views, config),
            precision=config.get("precision", InferConfig.precision),
            backend=config.get("backend", InferConfig.backend),
        )
        model = model_from_checkpoint(context.artifacts[MODEL_ARTIFACT], infer)
        self.predictor = model.predictor
        self.combine_label = model.combine_label
        self.ab_order = model.ab_order
        self.max_side = resolve_max_side(config)
        self.scale = resolve_scale(config)
        log.info(
            "chromoseg model loaded: combine_label=%s, max_side=%d, scale=%s, %s",
            self.combine_label, self.max_side, self.scale, self.predictor.describe(),
        )  # fmt: skip

    def predict(self, context, model_input, params: dict | None = None) -> dict:
        from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

        from chromoseg.data.scale import AUTO, ScaleError, parse_scale

        max_side = self.max_side
        try:
            requested = (params or {}).get("scale")
            try:
                scale = parse_scale(requested, self.scale)
            except ScaleError as exc:
                raise InputError(f"params {exc}") from None
            images = split_images(model_input, max_side)
            scales = resolve_scales(images, scale)
            if scale == AUTO:
                source = "image"
            else:
                source = "request" if parse_scale(requested, None) is not None else "server"
            out = predict_scaled(self.predictor, images, self.combine_label, scales, max_side)
            out["scale"] = [round(s, 4) for s in scales]
            out["scale_from"] = [source] * len(images)
            return out
        except InputError as exc:
            raise MlflowException(f"chromoseg: {exc}", error_code=INVALID_PARAMETER_VALUE) from None
