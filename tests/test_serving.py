"""The pyfunc model: input decoding and validation, size grouping, outputs; and the real scoring server.

Unit tests call `ChromosegModel.predict` directly on a tiny random-weight network. The e2e test logs
that network with `mlmodel.log_pyfunc_model` into a temporary sqlite store, registers it, starts the real
`mlflow models serve` on a free loopback port, checks every JSON input format and every bad input
(HTTP 400 with a clear message), and that the server and its workers are gone afterwards.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from chromoseg.config import InferConfig, TrainConfig
from chromoseg.infer import Predictor
from chromoseg.model import build_model, exec_plan
from chromoseg.pipeline import OUTPUT_KEYS, InputError
from chromoseg.serving import (
    ChromosegModel,
    decode_png,
    resolve_max_side,
    resolve_scale,
    resolve_tta_views,
    split_images,
    to_float_images,
)

# precision auto: bf16 eager torch where the CPU has it; fp32 would make load_context export ONNX.
# A plain smp U-Net (no full-resolution branch, context head or A/B head), grey as is.
TINY = TrainConfig(
    encoder_depth=3, decoder_channels=(16, 8, 8), full_res_channels=0, global_context=0, ab_aux=False,
    normalize="none",
)  # fmt: skip


def png_b64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def tiny_checkpoint(path: Path, combine_label: bool = True) -> Path:
    """A random-weight checkpoint in the format train.py writes (`models/model.pt`)."""
    torch.manual_seed(0)
    n_classes = 3 if combine_label else 4
    net = build_model(TINY, n_classes)
    torch.save(
        {"state_dict": net.state_dict(), "train": asdict(TINY), "n_classes": n_classes,
         "combine_label": combine_label},
        path,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["combined", "four-class"])
def model(request) -> ChromosegModel:
    """The pyfunc with a tiny eager fp32 network (load_context's ONNX export is covered by e2e)."""
    torch.manual_seed(0)
    m = ChromosegModel()
    m.predictor = Predictor(build_model(TINY, 3 if request.param else 4), TINY, 3 if request.param else 4,
                            exec_plan("fp32", "off", device="cpu"), backend="torch")  # fmt: skip
    m.combine_label = request.param
    m.max_side = 512
    m.scale = 1.0  # random test images have no chromosomes to measure (the default is tested below)
    return m


def test_load_context_reads_checkpoint_and_model_config(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CHROMOSEG_MAX_SIDE", raising=False)
    monkeypatch.delenv("CHROMOSEG_TTA", raising=False)
    ck = tiny_checkpoint(tmp_path / "model.pt", combine_label=False)
    m = ChromosegModel()
    m.load_context(SimpleNamespace(artifacts={"model": str(ck)}, model_config={"max_side": 300}))
    assert (m.combine_label, m.max_side, m.predictor.n_classes) == (False, 300, 4)
    assert m.ab_order == "area"  # checkpoints from before the rule was recorded named A the larger
    # evaluate-external names the truth's A and B by the model's rule, as the model names its output.
    state = torch.load(ck, weights_only=False)
    torch.save({**state, "ab_order": "position"}, ck)
    m.load_context(SimpleNamespace(artifacts={"model": str(ck)}, model_config={}))
    assert m.ab_order == m.predictor.ab_order == "position"
    # Test-time augmentation: the registered model_config's view count, else the infer default;
    # a checkpoint from before the infer section (its train.tta) is read all the same.
    assert m.predictor.tta_views == InferConfig().tta_views
    torch.save({**state, "train": {**state["train"], "tta": False}}, ck)
    m.load_context(SimpleNamespace(artifacts={"model": str(ck)}, model_config={"tta_views": 2}))
    assert m.predictor.tta_views == 2


def images(n: int, h: int = 88, w: int = 88, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w), dtype=np.uint8)


def check_consistent(out: dict, combine_label: bool, from_json: bool = False) -> None:
    """Masks are 0/1 (uint8 in-process) and agree with the label map."""
    for labels, a, b, ov in zip(*(out[k] for k in OUTPUT_KEYS)):
        if from_json:
            labels, a, b, ov = (np.asarray(x, np.uint8) for x in (labels, a, b, ov))
        assert {a.dtype, b.dtype, ov.dtype} == {np.dtype(np.uint8)}
        assert set(np.unique(np.concatenate([a, b, ov]))) <= {0, 1}
        np.testing.assert_array_equal(ov, a & b)
        np.testing.assert_array_equal((a | b) > 0, labels > 0)
        if combine_label:
            np.testing.assert_array_equal(ov > 0, labels == 2)
        else:
            np.testing.assert_array_equal(a > 0, (labels == 1) | (labels == 3))
            np.testing.assert_array_equal(b > 0, (labels == 2) | (labels == 3))


# ------------------------------------------------------------------------------------- unit: inputs


@pytest.mark.parametrize(
    ("value", "shapes"),
    [
        (np.zeros((88, 88), np.uint8), [(88, 88)]),
        (np.zeros((2, 20, 30), np.uint8), [(20, 30)] * 2),
        (np.full((1, 16, 16), 0.5), [(16, 16)]),
        (np.zeros((2, 10, 10), int).tolist(), [(10, 10)] * 2),
        ({"images": np.zeros((1, 12, 12), np.uint8)}, [(12, 12)]),
        ([np.zeros((10, 10)).tolist(), np.zeros((12, 9)).tolist()], [(10, 10), (12, 9)]),
        ([png_b64(np.zeros((10, 12), np.uint8)), png_b64(np.zeros((9, 9), np.uint8))], [(10, 12), (9, 9)]),
        (np.array([png_b64(np.zeros((10, 12), np.uint8))], dtype=object), [(10, 12)]),
        (pd.DataFrame({"image": [png_b64(np.zeros((10, 12), np.uint8))]}), [(10, 12)]),
        ("data:image/png;base64," + png_b64(np.zeros((8, 8), np.uint8)), [(8, 8)]),
    ],
    ids=[
        "hw",
        "nhw",
        "float",
        "json-lists",
        "named",
        "ragged",
        "png-list",
        "png-array",
        "png-frame",
        "data-uri",
    ],
)
def test_accepted_inputs(value, shapes) -> None:
    out = split_images(value)
    assert [im.shape for im in out] == shapes
    assert all(im.dtype == np.float32 and im.min() >= 0 and im.max() <= 1 for im in out)


def test_grey_scaling() -> None:
    (u8,) = split_images(np.full((8, 8), 255, np.uint8))
    (ints,) = split_images(np.full((8, 8), 255, np.int64))
    (f01,) = split_images(np.full((8, 8), 0.5))
    (f255,) = split_images(np.full((8, 8), 127.5))
    assert u8.max() == ints.max() == 1.0 and f01.max() == 0.5 and f255.max() == 0.5
    (rgb,) = split_images(png_b64(np.zeros((9, 9, 3), np.uint8)))
    assert rgb.shape == (9, 9)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.zeros((1, 1, 10, 10)), "input has 4 dims"),
        ([1, 2, 3], "input has 1 dims"),
        ([], "input is empty"),
        (np.zeros((0, 88, 88)), "input is empty"),
        ([[[float("nan")] * 10] * 10], "image 0 contains NaN"),
        (np.zeros((5, 5)), "image 0 is 5x5 px; each side must be 8..2048 px"),
        (np.zeros((3000, 10)), "is 3000x10 px"),
        (["!!!notbase64"], "image 0 is not valid base64"),
        ([base64.b64encode(b"hello world").decode()], "not a PNG/JPEG/TIFF image"),
        (np.array([[["a"] * 10] * 10]), "has dtype <U1"),
        (np.full((10, 10), -1.0), "has values -1..-1"),
        (np.ones((10, 10), bool), "has dtype bool"),
        ([[None] * 10] * 10, "mixes types"),
        ({"a": 1, "b": 2}, "send one input"),
        (pd.DataFrame({"a": ["x"], "b": ["y"]}), "one column"),
        (3.5, "input type float"),
    ],
)
def test_rejected_inputs_name_the_problem(value, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("..", r"\.\.")):
        split_images(value)


def test_request_pixel_budget(monkeypatch) -> None:
    import chromoseg.serving as serving

    monkeypatch.setattr(serving, "MAX_TOTAL_PIXELS", 3 * 100)
    assert len(split_images(np.zeros((3, 10, 10), np.uint8))) == 3
    with pytest.raises(InputError, match="request exceeds 300 px at image 3"):
        split_images(np.zeros((4, 10, 10), np.uint8))


def test_decode_png_checks_size_before_decoding() -> None:
    with pytest.raises(InputError, match="is 600x20 px"):
        decode_png(png_b64(np.zeros((600, 20), np.uint8)), max_side=512)


def test_to_float_images_stacks_one_size_only() -> None:
    assert to_float_images(np.zeros((2, 9, 9), np.uint8)).shape == (2, 9, 9)
    with pytest.raises(ValueError, match="differ in size"):
        to_float_images([np.zeros((9, 9)).tolist(), np.zeros((10, 9)).tolist()])


def test_max_side_from_env_and_model_config(monkeypatch) -> None:
    monkeypatch.delenv("CHROMOSEG_MAX_SIDE", raising=False)
    assert resolve_max_side(None) == 2048
    assert resolve_max_side({"max_side": 256}) == 256
    monkeypatch.setenv("CHROMOSEG_MAX_SIDE", "100")
    assert resolve_max_side({"max_side": 256}) == 100
    monkeypatch.setenv("CHROMOSEG_MAX_SIDE", "big")
    with pytest.raises(ValueError, match="CHROMOSEG_MAX_SIDE"):
        resolve_max_side(None)


def test_tta_views_from_env_or_model_config(monkeypatch) -> None:
    monkeypatch.delenv("CHROMOSEG_TTA", raising=False)
    assert resolve_tta_views(8, None) == 8
    assert resolve_tta_views(8, {"tta_views": 4}) == 4
    # CHROMOSEG_TTA: 0 turns it off, 1 keeps the configured count, a count replaces it.
    monkeypatch.setenv("CHROMOSEG_TTA", "0")
    assert resolve_tta_views(8, {"tta_views": 4}) == 1
    monkeypatch.setenv("CHROMOSEG_TTA", "1")
    assert resolve_tta_views(8, {"tta_views": 4}) == 4
    assert resolve_tta_views(8, None) == 8
    monkeypatch.setenv("CHROMOSEG_TTA", "2")
    assert resolve_tta_views(8, None) == 2
    for bad in ("yes please", "3"):
        monkeypatch.setenv("CHROMOSEG_TTA", bad)
        with pytest.raises(ValueError, match="CHROMOSEG_TTA must be one of"):
            resolve_tta_views(8, None)
    monkeypatch.delenv("CHROMOSEG_TTA")
    with pytest.raises(ValueError, match="tta_views must be one of"):
        resolve_tta_views(8, {"tta_views": 5})


# ------------------------------------------------------------------------------------- unit: predict


def test_predict_single_batch_and_odd_size(model: ChromosegModel) -> None:
    for x in (images(1)[0], images(3), images(2, 100, 131)):
        out = model.predict(None, x)
        n = 1 if x.ndim == 2 else x.shape[0]
        assert set(out) == {*OUTPUT_KEYS, "scale", "scale_from"}
        assert out["scale"] == [1.0] * n and out["scale_from"] == ["server"] * n
        assert all(out[k].shape == (n, *x.shape[-2:]) and out[k].dtype == np.uint8 for k in OUTPUT_KEYS)
        check_consistent(out, model.combine_label)


def test_mixed_sizes_are_grouped_and_keep_their_order(model: ChromosegModel) -> None:
    a, b, c = images(1, 88, 88, 1)[0], images(1, 100, 131, 2)[0], images(1, 88, 88, 3)[0]
    out = model.predict(None, [png_b64(a), png_b64(b), png_b64(c)])
    assert [x.shape for x in out["labels"]] == [(88, 88), (100, 131), (88, 88)]
    check_consistent(out, model.combine_label)
    # Same result as sending each image alone, up to near-ties: a batch of another size runs other
    # fp32 kernels, whose last bits can flip a pixel whose A and B logits are equal to ~1e-6.
    for img, got in zip((a, b, c), out["labels"]):
        alone = model.predict(None, img)["labels"][0]
        assert got.shape == alone.shape and (got != alone).mean() < 1e-3


def test_predict_rejects_with_mlflow_400(model: ChromosegModel) -> None:
    with pytest.raises(MlflowException) as info:
        model.predict(None, np.zeros((600, 20)))
    assert info.value.get_http_status_code() == 400
    assert "chromoseg: image 0 is 600x20 px; each side must be 8..512 px" in info.value.message


def test_scale_param_resizes_and_answers_at_input_size(model: ChromosegModel, small_synth) -> None:
    from chromoseg.data.scale import auto_scale, resize, scaled_shape

    pair = small_synth[0][5]
    big = resize(pair, (176, 176))
    out = model.predict(None, big, params={"scale": "0.5"})
    assert all(out[k].shape == (1, 176, 176) for k in OUTPUT_KEYS)
    assert out["scale"] == [0.5] and out["scale_from"] == ["request"]
    check_consistent(out, model.combine_label)
    # The same as resizing by hand and scaling the masks back (nearest).
    small = model.predict(None, resize(big.astype(np.float32) / 255.0, (88, 88)))
    for k in OUTPUT_KEYS:
        np.testing.assert_array_equal(out[k][0], resize(small[k][0], (176, 176), nearest=True))
    # auto: each image's measured scale; mixed sizes come back as a list at each input's size.
    odd = resize(pair, (150, 140))
    out = model.predict(None, [png_b64(big), png_b64(odd)], params={"scale": "auto"})
    assert [x.shape for x in out["mask_a"]] == [(176, 176), (150, 140)]
    assert out["scale_from"] == ["image", "image"]
    s = auto_scale(big.astype(np.float32) / 255.0)
    assert out["scale"][0] == round(s, 4)
    ref = model.predict(None, resize(big.astype(np.float32) / 255.0, scaled_shape((176, 176), s)))
    np.testing.assert_array_equal(out["labels"][0], resize(ref["labels"][0], (176, 176), nearest=True))
    # "" (MLflow's default for the param) and no params: the model's default (here 1).
    np.testing.assert_array_equal(
        model.predict(None, pair, params={"scale": ""})["labels"], model.predict(None, pair)["labels"]
    )


@pytest.mark.parametrize(
    ("value", "params", "message"),
    [
        (np.zeros((40, 40), np.uint8), {"scale": "auto"}, "image 0: the image is uniform"),
        (np.zeros((40, 40), np.uint8), {"scale": "half"}, "params scale must be a number > 0 or 'auto'"),
        (np.zeros((40, 40), np.uint8), {"scale": "-1"}, "params scale must be > 0"),
        (np.zeros((400, 400), np.uint8), {"scale": "2"}, "image 0 at scale 2 is 800x800 px"),
    ],
)
def test_scale_param_errors_are_400(model: ChromosegModel, value, params, message: str) -> None:
    with pytest.raises(MlflowException) as info:
        model.predict(None, value, params=params)
    assert info.value.get_http_status_code() == 400 and message in info.value.message


def test_scale_is_measured_by_default(small_synth) -> None:
    """No scale anywhere: each image is brought to the training scale by its measured width; a
    LowRes-sized image stays as it is, one at twice the scale is halved."""
    from chromoseg.data.scale import resize

    torch.manual_seed(0)
    m = ChromosegModel()
    m.predictor = Predictor(build_model(TINY, 3), TINY, 3, exec_plan("fp32", "off", device="cpu"), "torch")
    m.combine_label = True
    assert m.scale == "auto" and resolve_scale(None) == "auto"
    pair = small_synth[0][5]
    out = m.predict(None, [png_b64(pair), png_b64(resize(pair, (176, 176)))])
    assert out["scale_from"] == ["image", "image"]
    assert out["scale"][0] == 1.0 and 0.4 < out["scale"][1] < 0.6
    assert [x.shape for x in out["labels"]] == [(88, 88), (176, 176)]
    # The request's "1" (LowRes-sized input) is used as given.
    out = m.predict(None, pair, params={"scale": "1"})
    assert out["scale"] == [1.0] and out["scale_from"] == ["request"]


def test_scale_default_from_env_or_model_config(monkeypatch) -> None:
    monkeypatch.delenv("CHROMOSEG_SCALE", raising=False)
    assert resolve_scale(None) == "auto"
    assert resolve_scale({"scale": 0.5}) == 0.5
    monkeypatch.setenv("CHROMOSEG_SCALE", "AUTO")
    assert resolve_scale({"scale": 0.5}) == "auto"
    monkeypatch.setenv("CHROMOSEG_SCALE", "0")
    with pytest.raises(ValueError, match="CHROMOSEG_SCALE/scale: scale must be > 0"):
        resolve_scale(None)


# ------------------------------------------------------------------------------------- e2e: server


@pytest.mark.e2e
def test_scoring_server_end_to_end(tmp_path: Path, monkeypatch, small_synth) -> None:
    import mlflow
    import psutil

    from chromoseg.bench_serve import post, serving
    from chromoseg.mlmodel import log_pyfunc_model

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.create_experiment("e2e", artifact_location=(tmp_path / "artifacts").as_uri())
    ck = tiny_checkpoint(tmp_path / "model.pt", combine_label=True)
    with mlflow.start_run(experiment_id=exp):
        info = log_pyfunc_model(ck)
    mv = mlflow.register_model(info.model_uri, "chromoseg-e2e")
    logged = mlflow.models.get_model_info(f"models:/chromoseg-e2e/{mv.version}")
    assert logged.signature is not None and logged.saved_input_example_info is not None

    one = images(1)[0]
    odd = images(1, 100, 131)[0]
    valid = {
        "single (H, W) ints": ({"inputs": one.tolist()}, [(88, 88)]),
        "batch via instances": ({"instances": images(3).tolist()}, [(88, 88)] * 3),
        "odd size floats 0..1": ({"inputs": (odd[None] / 255.0).tolist()}, [(100, 131)]),
        "nested lists, mixed sizes": ({"inputs": [one.tolist(), odd.tolist()]}, [(88, 88), (100, 131)]),
        "png list, mixed sizes": ({"inputs": [png_b64(one), png_b64(odd)]}, [(88, 88), (100, 131)]),
        "dataframe_split of png": (
            {"dataframe_split": {"columns": ["image"], "data": [[png_b64(one)], [png_b64(one)]]}},
            [(88, 88)] * 2,
        ),
        "dataframe_records of png": ({"dataframe_records": [{"image": png_b64(odd)}]}, [(100, 131)]),
    }
    bad = {
        "4 dims": ({"inputs": np.zeros((1, 1, 9, 9), int).tolist()}, "input has 4 dims"),
        "NaN": (
            '{"inputs": [' + json.dumps(np.zeros((9, 9)).tolist()).replace("0.0", "NaN", 1) + "]}",
            "contains NaN",
        ),
        "strings": ({"inputs": [[["a"] * 9] * 9]}, "has dtype"),
        "empty image": ({"inputs": [[]]}, "is empty"),
        # MLflow's own schema check answers an empty top-level list before the model sees it.
        "empty list": ({"inputs": []}, "Failed to enforce schema"),
        "too small": ({"inputs": np.zeros((5, 5), int).tolist()}, "is 5x5 px"),
        "too large": (
            {"inputs": [png_b64(np.zeros((300, 20), np.uint8))]},
            "is 300x20 px; each side must be 8..256",
        ),
        "bad base64": ({"inputs": ["!!!"]}, "not valid base64"),
        "not an image": ({"inputs": [base64.b64encode(b"hello").decode()]}, "not a PNG/JPEG/TIFF"),
        "negative": ({"inputs": np.full((9, 9), -3).tolist()}, "has values -3..-3"),
    }
    # Random test images have no chromosomes to measure: the server's default scale is 1 here.
    env = {"CHROMOSEG_MAX_SIDE": "256", "CHROMOSEG_SCALE": "1"}
    with serving(f"models:/chromoseg-e2e/{mv.version}", env=env) as server:
        url = server.url + "/invocations"
        pids = [server.proc.pid, *(p.pid for p in psutil.Process(server.proc.pid).children(recursive=True))]
        for name, (payload, shapes) in valid.items():
            status, reply = post(url, payload)
            assert status == 200, (name, str(reply)[-300:])
            preds = reply["predictions"]
            assert set(preds) == {*OUTPUT_KEYS, "scale", "scale_from"}, name
            assert set(preds["scale_from"]) == {"server"}, name
            assert [np.asarray(x).shape for x in preds["labels"]] == shapes, name
            check_consistent(preds, combine_label=True, from_json=True)
        for name, (payload, message) in bad.items():
            body = payload.encode() if isinstance(payload, str) else payload
            status, reply = post(url, body)
            assert status == 400, (name, status, str(reply)[-300:])
            assert reply["error_code"] == "INVALID_PARAMETER_VALUE", name
            assert message in reply["message"], (name, reply["message"][-300:])
            assert "chromoseg: " in reply["message"] or name == "empty list", name
        status, reply = post(url, {"inputs": one.tolist()})
        assert status == 200 and np.asarray(reply["predictions"]["labels"]).shape == (1, 88, 88)
        # The request's scale param: resized for the network, answered at the input's size.
        status, reply = post(url, {"inputs": [png_b64(odd)], "params": {"scale": "0.7"}})
        assert status == 200 and np.asarray(reply["predictions"]["mask_a"]).shape == (1, 100, 131)
        assert reply["predictions"]["scale"] == [0.7] and reply["predictions"]["scale_from"] == ["request"]
        status, reply = post(url, {"inputs": [png_b64(odd)], "params": {"scale": "huge"}})
        assert status == 400 and "scale must be a number > 0 or 'auto'" in reply["message"]
        # auto: a synthetic pair at twice the LowRes scale is measured and halved for the network.
        big = np.kron(small_synth[0][5], np.ones((2, 2), np.uint8))
        status, reply = post(url, {"inputs": [png_b64(big)], "params": {"scale": "auto"}})
        assert status == 200 and reply["predictions"]["scale_from"] == ["image"]
        assert 0.4 < reply["predictions"]["scale"][0] < 0.6
        assert np.asarray(reply["predictions"]["labels"]).shape == (1, 176, 176)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def test_stop_server_kills_the_whole_process_group(tmp_path: Path) -> None:
    """A parent that spawned a child (like mlflow -> uvicorn): both are gone after stop_server."""
    import subprocess
    import sys
    import time

    import psutil

    from chromoseg.bench_serve import Server, free_port, stop_server

    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    for _ in range(200):
        children = psutil.Process(proc.pid).children(recursive=True)
        if children:
            break
        time.sleep(0.05)
    assert children, "the dummy server did not start its child"
    left = stop_server(Server(proc, f"http://127.0.0.1:{free_port()}", tmp_path / "log"), grace=5)
    assert left == []
    assert not any(psutil.pid_exists(c.pid) and c.status() != psutil.STATUS_ZOMBIE for c in children)
