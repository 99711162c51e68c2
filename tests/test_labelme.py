"""labelme importer on the real-dev files and on broken copies of them."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from _project import REAL_DEV
from chromoseg.data.io import DataError, read_dataset
from chromoseg.data.labelme import (
    import_labelme,
    load_labelme_dir,
    polygon_mask,
    read_labelme,
)
from chromoseg.geometry import estimate_width

needs_real = pytest.mark.skipif(not REAL_DEV.is_dir(), reason="real-dev files not available")


@pytest.fixture(scope="module")
def real():
    return load_labelme_dir(REAL_DEV)


def _one(tmp_path: Path, name: str = "grey0084100.json") -> tuple[Path, dict]:
    d = tmp_path / "in"
    d.mkdir()
    doc = json.loads((REAL_DEV / name).read_text())
    return d, doc


def test_polygon_mask_and_width():
    # A 10 px wide, 40 px long rectangle.
    m = polygon_mask([(10, 10), (49, 10), (49, 19), (10, 19)], (30, 60))
    assert m.sum() == 400
    assert abs(estimate_width(m) - 10) <= 1.0


@needs_real
def test_real_dev_at_lowres_scale(real):
    images, labels, scales, names = real
    assert images.shape == labels.shape == (10, 88, 88)
    assert names[0] == "grey0083901.json" and len(names) == 10
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    # The real crops are ~210 px with ~25 px wide chromosomes: about half scale.
    assert np.all((scales > 0.35) & (scales < 0.65))
    widths = [estimate_width((lab == 1) | (lab == 3)) for lab in labels]
    assert abs(np.mean(widths) - 11.5) < 1.0
    # 8 of the 10 pairs overlap; overlaps are brighter than single chromosomes.
    assert (labels == 3).any(axis=(1, 2)).sum() >= 7
    assert images[labels == 3].mean() > 1.4 * images[(labels == 1) | (labels == 2)].mean()
    assert images[labels == 0].mean() < 3


@needs_real
def test_a_is_first_polygon_b_second():
    image, pa, pb = read_labelme(REAL_DEV / "grey0083901.json")
    assert image.shape == (210, 211)
    labels = load_labelme_dir(REAL_DEV)[1]
    ma = polygon_mask(pa, image.shape)
    mb = polygon_mask(pb, image.shape)
    # Area ratio of A to B is preserved by the rescale.
    lab = labels[0]
    ratio_in = ma.sum() / mb.sum()
    ratio_out = ((lab == 1) | (lab == 3)).sum() / ((lab == 2) | (lab == 3)).sum()
    assert abs(ratio_out / ratio_in - 1) < 0.1


@needs_real
def test_import_writes_h5_with_scale_and_names(tmp_path, real):
    out = tmp_path / "raw" / "real.h5"
    import_labelme(REAL_DEV, out)
    ds = read_dataset(out)
    assert np.array_equal(ds.images, real[0]) and np.array_equal(ds.labels, real[1])
    with h5py.File(out, "r") as f:
        assert np.allclose(f["scale"][()], real[2])
        assert [n.decode() for n in f["source_name"][()]] == real[3]


@needs_real
def test_sibling_image_file_is_used(tmp_path, real):
    d, doc = _one(tmp_path)
    png = base64.b64decode(doc["imageData"])
    (d / "pic.png").write_bytes(png)
    doc["imageData"] = None
    doc["imagePath"] = "pic.png"
    (d / "x.json").write_text(json.dumps(doc))
    images, labels, _, _ = load_labelme_dir(d)
    assert np.array_equal(images[0], real[0][2]) and np.array_equal(labels[0], real[1][2])


def _broken(tmp_path: Path, case: str) -> Path:
    d, doc = _one(tmp_path)
    f = d / "bad.json"
    if case == "one polygon":
        doc["shapes"] = doc["shapes"][:1]
    elif case == "three polygons":
        doc["shapes"] = [*doc["shapes"], doc["shapes"][0]]
    elif case == "missing image":
        doc["imageData"] = None
        doc["imagePath"] = "nowhere.png"
    elif case == "bad json":
        f.write_text('{"shapes": [')
        return d
    elif case == "bad image data":
        doc["imageData"] = base64.b64encode(b"not a png").decode()
    f.write_text(json.dumps(doc))
    return d


@needs_real
@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("one polygon", "found 1 polygon"),
        ("three polygons", "found 3 polygon"),
        ("missing image", "not found"),
        ("bad json", "not a readable labelme JSON"),
        ("bad image data", "imageData is not a readable image"),
    ],
)
def test_bad_files_name_the_file_and_write_nothing(tmp_path, case, words):
    d = _broken(tmp_path, case)
    shutil.copy(REAL_DEV / "grey0083901.json", d / "a_good.json")  # a good file before the bad one
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "keep.h5").write_bytes(b"existing")
    with pytest.raises(DataError, match=words) as exc:
        import_labelme(d, raw / "new.h5")
    assert "bad.json" in str(exc.value)
    assert sorted(p.name for p in raw.iterdir()) == ["keep.h5"]
    assert (raw / "keep.h5").read_bytes() == b"existing"


def test_empty_or_missing_dir(tmp_path):
    with pytest.raises(DataError, match=r"no \*\.json"):
        load_labelme_dir(tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        load_labelme_dir(tmp_path / "nope")


def test_synthetic_labelme_file_round_trip(tmp_path):
    # A hand-made file: two crossing rectangles on a black image, image embedded.
    img = np.zeros((200, 200), np.uint8)
    pa = [(40.0, 90.0), (159.0, 90.0), (159.0, 113.0), (40.0, 113.0)]
    pb = [(90.0, 40.0), (113.0, 40.0), (113.0, 159.0), (90.0, 159.0)]
    img[polygon_mask(pa, img.shape)] += 70
    img[polygon_mask(pb, img.shape)] += 70
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    doc = {
        "shapes": [
            {"label": "chromosome", "points": pa, "shape_type": "polygon"},
            {"label": "chromosome", "points": pb, "shape_type": "polygon"},
        ],
        "imagePath": "x.png",
        "imageData": base64.b64encode(buf.getvalue()).decode(),
    }
    (tmp_path / "x.json").write_text(json.dumps(doc))
    images, labels, scales, _ = load_labelme_dir(tmp_path, target_width=12.0)
    assert abs(scales[0] - 0.5) < 0.03  # 24 px wide -> 12 px
    lab = labels[0]
    assert abs(estimate_width((lab == 1) | (lab == 3)) - 12) <= 1.0
    # The overlap is a ~12 x 12 square of ~140 grey.
    assert 100 <= (lab == 3).sum() <= 170
    assert images[0][lab == 3].mean() > 1.7 * images[0][lab == 1].mean()
