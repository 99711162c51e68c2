"""Property-based fuzz of the served model's input decoding (`serving.ChromosegModel.predict`).

Whatever a client sends (random shapes and dtypes, NaN/inf, strings, base64 garbage, truncated PNGs,
nested lists, DataFrames, dicts), `predict` either answers with the four uint8 outputs or raises
`MlflowException(INVALID_PARAMETER_VALUE)` (HTTP 400). Anything else would be a 500 in the server.
The network is a tiny untrained U-Net: decoding, not accuracy, is under test.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

OUTPUT_KEYS = ("labels", "mask_a", "mask_b", "overlap")
MAX_SIDE = 48


@pytest.fixture(scope="module")
def model():
    from chromoseg.config import TrainConfig
    from chromoseg.infer import Predictor
    from chromoseg.model import build_model, exec_plan
    from chromoseg.serving import ChromosegModel
    from chromoseg.train import seed_everything

    seed_everything(0)
    cfg = TrainConfig(
        encoder_depth=3,
        decoder_channels=(16, 8, 8),
        full_res_channels=0,
        global_context=0,
        ab_aux=False,
        normalize="none",
        precision="fp32",
    )
    m = ChromosegModel()
    m.predictor = Predictor(build_model(cfg, 3), cfg, 3, exec_plan("fp32", "off"), backend="torch")
    m.combine_label = True
    m.max_side = MAX_SIDE
    m.scale = 1.0  # random images have no chromosome width to measure; decoding is what is fuzzed
    return m


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


b64 = st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode())
garbage_text = st.one_of(st.text(max_size=40), b64, st.just("data:image/png;base64,!!!"))


@st.composite
def png_strings(draw) -> str:
    """Valid, truncated or bit-flipped PNGs of random sizes (also too small / too large)."""
    h = draw(st.integers(1, MAX_SIDE + 8))
    w = draw(st.integers(1, MAX_SIDE + 8))
    arr = draw(hnp.arrays(np.uint8, (h, w), elements=st.integers(0, 255)))
    raw = bytearray(_png(arr))
    how = draw(st.sampled_from(["ok", "truncate", "flip", "data-uri"]))
    if how == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        i = draw(st.integers(0, len(raw) - 1))
        raw[i] ^= draw(st.integers(1, 255))
    s = base64.b64encode(bytes(raw)).decode()
    return "data:image/png;base64," + s if how == "data-uri" else s


dtypes = st.sampled_from(
    [np.uint8, np.int8, np.int16, np.int64, np.uint64, np.float16, np.float32, np.float64, np.bool_,
     np.complex64]
)  # fmt: skip
arrays = hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=MAX_SIDE // 2 + 4))
image_arrays = st.tuples(
    st.integers(1, 3), st.integers(6, MAX_SIDE + 2), st.integers(6, MAX_SIDE + 2)
).flatmap(lambda s: hnp.arrays(dtypes, s))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
nested = st.recursive(st.lists(scalars, max_size=6), lambda inner: st.lists(inner, max_size=4), max_leaves=40)
leaf = st.one_of(
    arrays,
    image_arrays,
    image_arrays.map(lambda a: a.tolist()),
    nested,
    scalars,
    garbage_text,
    png_strings(),
    st.lists(st.one_of(png_strings(), garbage_text), min_size=0, max_size=3),
    st.lists(image_arrays.map(lambda a: a[0].tolist()), max_size=3),  # ragged list of images
)


@st.composite
def wrapped(draw):
    import pandas as pd

    x = draw(leaf)
    how = draw(st.sampled_from(["plain", "dict", "dict2", "frame", "frame2", "series"]))
    if how == "dict":
        return {"images": x}
    if how == "dict2":
        return {"images": x, "other": x}
    if how in ("frame", "frame2", "series") and isinstance(x, list):
        try:
            df = pd.DataFrame({"images": x}) if how != "frame2" else pd.DataFrame({"a": x, "b": x})
        except (ValueError, TypeError):
            return x
        return df["images"] if how == "series" else df
    return x


def check(model, x) -> None:
    from mlflow.exceptions import MlflowException

    try:
        out = model.predict(None, x)
    except MlflowException as exc:
        assert exc.error_code == "INVALID_PARAMETER_VALUE", exc
        assert "\n" not in exc.message.strip() and len(exc.message) < 500, exc.message
        return
    assert set(OUTPUT_KEYS) <= set(out)
    for k in OUTPUT_KEYS:
        for a in out[k] if isinstance(out[k], list) else [out[k]]:
            assert np.asarray(a).dtype == np.uint8


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=wrapped())
def test_predict_never_crashes(model, x):
    check(model, x)


@pytest.mark.parametrize(
    "x",
    [
        np.full((1, 16, 16), np.nan, np.float32),
        np.full((16, 16), np.inf),
        np.zeros((0, 16, 16), np.uint8),
        np.zeros((16,), np.uint8),
        np.zeros((1, 1, 16, 16), np.uint8),
        np.array(["a", "b"]),
        "not base64 at all",
        base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(20)).decode(),
        [[1, 2], [3]],
        {"images": None},
        None,
        np.full((1, 16, 16), -5.0),
        np.full((1, 16, 16), 1e30),
    ],
    ids=lambda v: type(v).__name__,
)
def test_known_bad_inputs(model, x):
    check(model, x)


def test_valid_inputs_predict(model):
    img = np.random.default_rng(0).integers(0, 255, (2, 40, 40), dtype=np.uint8)
    for x in (
        img,
        img[0],
        img.astype(np.float32) / 255,
        img.tolist(),
        [base64.b64encode(_png(img[0])).decode()],
    ):
        out = model.predict(None, x)
        assert np.asarray(out["labels"]).shape[-2:] == (40, 40)
