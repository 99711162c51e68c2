"""`chromoseg predict`: image / labelme loading, scaling, outputs and the CLI, on a stub model."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from chromoseg import predict as P


class StubModel:
    """Marks the left half A, the right half B and a centre band of 4 columns as the overlap."""

    uri = "stub:/model"

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def predict(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        out = []
        for im in images:
            self.seen.append(im.shape)
            h, w = im.shape
            a = np.zeros((h, w), np.uint8)
            b = np.zeros((h, w), np.uint8)
            a[:, : w // 2 + 2] = 1
            b[:, w // 2 - 2 :] = 1
            out.append({"mask_a": a, "mask_b": b, "overlap": a & b, "labels": a + b})
        return out


def write_png(path: Path, image: np.ndarray) -> Path:
    Image.fromarray(image).save(path)
    return path


def test_load_image_png_and_labelme(tmp_path: Path) -> None:
    img = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    png = write_png(tmp_path / "a.png", img)
    np.testing.assert_array_equal(P.load_image(png), img)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    doc = {
        "imageData": base64.b64encode(buf.getvalue()).decode(),
        "shapes": [],
        "imageHeight": 12,
        "imageWidth": 10,
    }
    lm = tmp_path / "b.json"
    lm.write_text(json.dumps(doc))
    np.testing.assert_array_equal(P.load_image(lm), img)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.png", None, "no such file"),
        ("bad.png", b"not an image", "not a readable image"),
        ("bad.json", b"{", "not a readable JSON"),
        ("list.json", b"[]", "not a labelme file"),
        ("noimage.json", b'{"shapes": []}', "no imageData and no imagePath"),
    ],
)
def test_load_image_errors(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    p = tmp_path / name
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(P.PredictError, match=message):
        P.load_image(p)


def test_scale_resizes_before_and_masks_back_after() -> None:
    stub = StubModel()
    image = np.zeros((176, 210), np.uint8)
    (res,) = P.run_model(stub, [image], scale=0.5)
    assert stub.seen == [(88, 105)]
    assert res.mask_a.shape == res.mask_b.shape == res.overlap.shape == (176, 210)
    np.testing.assert_array_equal(res.overlap, res.mask_a & res.mask_b)
    with pytest.raises(P.PredictError, match="scale must be > 0"):
        P.run_model(stub, [image], scale=0)


def test_summary_areas_and_overlap_fraction() -> None:
    (res,) = P.run_model(StubModel(), [np.zeros((10, 20), np.uint8)])
    info = P.summary(res, "x.png", "stub:/model", 1.0)
    assert (info["area_a_px"], info["area_b_px"], info["area_overlap_px"]) == (120, 120, 40)
    assert info["overlap_fraction"] == pytest.approx(40 / 200)
    assert (info["height"], info["width"], info["model"]) == (10, 20, "stub:/model")


def test_predict_files_writes_label_overlay_and_json(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(P, "LocalModel", lambda uri, infer=None: StubModel())
    a = write_png(tmp_path / "a.png", np.full((30, 40), 70, np.uint8))
    b = write_png(tmp_path / "b.png", np.full((50, 20), 70, np.uint8))
    rows = P.predict_files([a, b, a], tmp_path / "out", model="models:/x@champion", scale=1)
    assert [(r["scale"], r["scale_from"]) for r in rows] == [(1.0, "given")] * 3
    assert [r["image"] for r in rows] == [str(a), str(b), str(a)]
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        f"{s}{suffix}"
        for s in ("a", "b", "a_1")
        for suffix in ("_labels.png", "_overlay.png", "_summary.json")
    )
    labels = np.asarray(Image.open(out / "a_labels.png"))
    assert labels.shape == (30, 40) and set(np.unique(labels)) == {1, 2, 3}
    overlay = np.asarray(Image.open(out / "b_overlay.png"))
    assert overlay.shape == (50, 20, 3)
    assert json.loads((out / "b_summary.json").read_text())["area_overlap_px"] == 50 * 4


def test_predict_files_needs_exactly_one_backend(tmp_path: Path) -> None:
    with pytest.raises(P.PredictError, match="either a model URI"):
        P.predict_files([tmp_path / "a.png"], tmp_path, model="m", url="http://x")


def test_remote_unreachable_says_how_to_fix() -> None:
    with pytest.raises(P.PredictError, match="cannot reach"):
        P.RemoteModel("http://127.0.0.1:9", timeout=2).predict([np.zeros((8, 8), np.uint8)])


def test_cli_predict(tmp_path: Path, monkeypatch) -> None:
    from chromoseg.cli import app

    monkeypatch.setattr(P, "LocalModel", lambda uri, infer=None: StubModel())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    img = write_png(tmp_path / "c.png", np.full((40, 40), 70, np.uint8))
    result = CliRunner().invoke(app, ["predict", str(img), "--out", str(tmp_path / "o"), "--scale", "0.5"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows[0]["scale"] == 0.5 and (tmp_path / "o" / "c_overlay.png").is_file()
    bad = CliRunner().invoke(app, ["predict", str(tmp_path / "nope.png"), "--out", str(tmp_path / "o")])
    assert bad.exit_code == 2
