"""Scale measured on the grey image (`chromoseg.data.scale`), `predict --scale auto` and
`evaluate-external --width-from image`, on images from the project's own generator and real-dev."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chromoseg import predict as P
from chromoseg.data.scale import REFERENCE_WIDTH, ScaleError, auto_scale
from chromoseg.geometry import foreground_mask, image_width


def upscale(image: np.ndarray, factor: float) -> np.ndarray:
    h, w = image.shape
    size = (round(w * factor), round(h * factor))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def test_reference_width_is_the_generators(small_synth) -> None:
    """REFERENCE_WIDTH must stay the median measurement of the default synthetic images."""
    widths = np.array([image_width(im) for im in small_synth[0]])
    assert abs(np.median(widths) / REFERENCE_WIDTH - 1) < 0.05
    # and those images therefore need no resizing
    assert abs(np.median([auto_scale(im) for im in small_synth[0]]) - 1) < 0.05


@pytest.mark.parametrize("factor", [1.6, 2.0, 2.5])
def test_auto_scale_undoes_a_resize(small_synth, factor: float) -> None:
    images = small_synth[0][:16]
    ratios = np.array([auto_scale(upscale(im, factor)) / auto_scale(im) for im in images])
    assert abs(np.median(ratios) * factor - 1) < 0.05
    assert np.all(np.abs(ratios * factor - 1) < 0.15)


def test_dark_chromosomes_on_bright_background(small_synth) -> None:
    im = small_synth[0][0]
    fg, inv = foreground_mask(im), foreground_mask(255 - im)
    assert fg.mean() < 0.5 and inv.mean() < 0.5  # the objects, not the background
    assert abs(image_width(255 - im) / image_width(im) - 1) < 0.15


@pytest.mark.parametrize(
    ("image", "words"),
    [
        (np.full((40, 40), 70, np.uint8), "uniform"),
        (np.zeros((40, 40), np.uint8), "uniform"),
        (np.zeros((3, 40, 40), np.uint8), r"one \(H, W\) grey image"),
    ],
)
def test_unmeasurable_images_say_why(image: np.ndarray, words: str) -> None:
    with pytest.raises(ScaleError, match=words):
        auto_scale(image)


def test_real_dev_scale_close_to_the_polygons(real_dev_dir) -> None:
    from chromoseg.data.labelme import load_labelme_dir

    _, _, by_labels, names = load_labelme_dir(real_dev_dir)
    images, labels, by_image, names2 = load_labelme_dir(real_dev_dir, width_from="image")
    assert names == names2 and images.shape == (10, 88, 88)
    ratio = by_image / by_labels
    assert abs(np.median(ratio) - 1) < 0.08
    assert np.all((ratio > 0.7) & (ratio < 1.15))
    assert all((lab == 1).any() and (lab == 2).any() for lab in labels)


def test_predict_scale_auto(tmp_path: Path, monkeypatch, small_synth) -> None:
    from test_predict import StubModel, write_png

    stub = StubModel()
    monkeypatch.setattr(P, "LocalModel", lambda uri, infer=None: stub)
    big = write_png(tmp_path / "big.png", upscale(small_synth[0][3], 2.0))
    small = write_png(tmp_path / "small.png", small_synth[0][3])
    # auto is the default: each image's scale measured, the LowRes-sized one left as it is.
    rows = P.predict_files([big, small], tmp_path / "out", model="models:/x@champion")
    assert [r["scale_from"] for r in rows] == ["image", "image"]
    assert rows[1]["scale"] == 1.0 and stub.seen[1] == (88, 88)
    # the big one measures at half the small one's scale and is brought to the training width
    assert abs(rows[0]["scale"] * 2 / auto_scale(small_synth[0][3]) - 1) < 0.1
    assert abs(stub.seen[0][0] - 176 * rows[0]["scale"]) <= 1
    summary = json.loads((tmp_path / "out" / "big_summary.json").read_text())
    assert (summary["height"], summary["width"]) == (176, 176)


def test_predict_scale_errors(tmp_path: Path, monkeypatch) -> None:
    from test_predict import StubModel, write_png

    monkeypatch.setattr(P, "LocalModel", lambda uri, infer=None: StubModel())
    blank = write_png(tmp_path / "blank.png", np.zeros((40, 40), np.uint8))
    with pytest.raises(P.PredictError, match=r"blank\.png: .*uniform.*--scale"):
        P.predict_files([blank], tmp_path / "out", model="m", scale="auto")
    with pytest.raises(P.PredictError, match="number > 0 or 'auto'"):
        P.predict_files([blank], tmp_path / "out", model="m", scale="half")
    assert not (tmp_path / "out").exists()  # nothing written


def test_lowres_images_are_left_at_their_scale(small_synth) -> None:
    """auto on images at the training scale: nearly all measure inside the trained widths (scale 1),
    the rest stay close to 1; the band follows the generator's width range."""
    from chromoseg.config import SynthConfig
    from chromoseg.data.scale import LABEL_WIDTH_MEDIAN, MEASUREMENT_SPREAD, TRAINED_WIDTHS, image_scales

    lo, hi = SynthConfig().width_range
    band = (lo * (1 - MEASUREMENT_SPREAD), hi * (1 + MEASUREMENT_SPREAD))
    assert pytest.approx([REFERENCE_WIDTH * w / LABEL_WIDTH_MEDIAN for w in band]) == TRAINED_WIDTHS
    scales = np.array(image_scales(list(small_synth[0]), "auto"))
    assert np.mean(scales == 1.0) >= 0.9
    assert np.all((scales > 0.75) & (scales < 1.35))
