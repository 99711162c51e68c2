"""Kaggle importer: both layouts, and every kind of bad file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from chromoseg.cli import app
from chromoseg.data.io import KEY_CLEANED, KEY_RAW, DataError, import_kaggle, read_dataset


def _arr(n: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    a = np.zeros((n, h, w, 2), np.uint8)
    a[..., 0] = rng.integers(0, 200, (n, h, w))
    a[..., 1] = rng.integers(0, 4, (n, h, w))
    return a


def _write(path, key: str, data) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=data)


@pytest.mark.parametrize(("key", "shape"), [(KEY_RAW, (5, 88, 88)), (KEY_CLEANED, (4, 94, 93))])
def test_both_layouts(tmp_path, key, shape):
    src = tmp_path / "kaggle.h5"
    arr = _arr(*shape)
    _write(src, key, arr)
    out = import_kaggle(src, tmp_path / "raw" / "pairs.h5")
    ds = read_dataset(out)
    assert ds.key == KEY_RAW  # always written as dataset_1, own H, W kept
    assert np.array_equal(ds.images, arr[..., 0]) and np.array_equal(ds.labels, arr[..., 1])
    with h5py.File(out, "r") as f:
        assert np.array_equal(f["source_index"][()], np.arange(shape[0]))


def test_default_output_and_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "LowRes.h5", KEY_RAW, _arr(3, 88, 88))
    res = CliRunner().invoke(app, ["import", "kaggle", "LowRes.h5"])
    assert res.exit_code == 0, res.output
    assert "dvc add data/raw" in res.output
    assert len(read_dataset(tmp_path / "data" / "raw" / "LowRes.h5")) == 3


def _bad(tmp_path, case: str):
    p = tmp_path / "bad.h5"
    if case == "wrong key":
        _write(p, "images", _arr(2, 88, 88))
    elif case == "wrong shape":
        _write(p, KEY_RAW, np.zeros((2, 88, 88), np.uint8))
    elif case == "empty dataset":
        _write(p, KEY_RAW, np.zeros((0, 88, 88, 2), np.uint8))
    elif case == "empty file":
        p.write_bytes(b"")
    elif case == "corrupt":
        p.write_bytes(b"\x89HDF\r\n" + bytes(range(256)) * 8)
    elif case == "truncated":
        _write(p, KEY_RAW, _arr(50, 88, 88))
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif case == "float dtype":
        _write(p, KEY_RAW, np.zeros((2, 88, 88, 2), np.float32))
    return p


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("wrong key", "none of the keys"),
        ("wrong shape", "expected \\(N, H, W, 2\\)"),
        ("empty dataset", "holds no images"),
        ("empty file", "empty"),
        ("corrupt", "not a readable HDF5"),
        ("truncated", "truncated"),
        ("float dtype", "expected uint8"),
        ("missing", "file not found"),
    ],
)
def test_bad_files(tmp_path, case, words):
    src = _bad(tmp_path, case) if case != "missing" else tmp_path / "nope.h5"
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "old.h5").write_bytes(b"old")
    with pytest.raises(DataError, match=words) as exc:
        import_kaggle(src, raw / "new.h5")
    assert src.name in str(exc.value)
    assert "\n" not in str(exc.value)
    assert sorted(p.name for p in raw.iterdir()) == ["old.h5"]


def test_cli_error_is_one_line_exit_2(tmp_path):
    p = _bad(tmp_path, "wrong key")
    res = CliRunner().invoke(app, ["import", "kaggle", str(p), "--out", str(tmp_path / "o.h5")])
    assert res.exit_code == 2
    assert not (tmp_path / "o.h5").exists()


def _unusable(case: str) -> np.ndarray:
    """(N, H, W, 2) files that read fine but cannot be a LowRes pair set."""
    if case == "labels above 3":
        a = _arr(4, 88, 88)
        a[..., 1] += 4  # e.g. a label coding shifted by 4, or the channels swapped
        return a
    return _arr(4, 64, 64)  # a smaller frame: another scale


UNUSABLE = [("labels above 3", "labelled pixels have values >= 4"), ("64x64 images", "images are 64 x 64 px")]


@pytest.mark.parametrize(("case", "words"), UNUSABLE)
def test_unusable_files_are_refused_at_import_with_prepares_error(tmp_path, monkeypatch, case, words):
    from chromoseg.config import params_from_dict
    from chromoseg.data.io import write_dataset
    from chromoseg.prepare import run_prepare

    arr = _unusable(case)
    src = tmp_path / "pairs.h5"
    _write(src, KEY_RAW, arr)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "old.h5").write_bytes(b"old")
    with pytest.raises(DataError, match=words) as imported:
        import_kaggle(src, raw / "new.h5")
    assert "\n" not in str(imported.value)
    assert sorted(p.name for p in raw.iterdir()) == ["old.h5"]

    # The same arrays reaching `prepare` (e.g. copied into data/raw by hand) fail with the same line.
    monkeypatch.chdir(tmp_path)
    write_dataset("direct.h5", arr[..., 0], arr[..., 1])
    params = params_from_dict({"prepare": {"raw": "direct.h5", "out_dir": "prep", "metrics": "m.json"}})
    with pytest.raises(DataError) as prepared:
        run_prepare(params)
    assert str(prepared.value).replace("direct.h5", str(src)) == str(imported.value)
    assert not (tmp_path / "prep").exists()


@pytest.mark.parametrize(("case", "words"), UNUSABLE)
def test_cli_refuses_unusable_file_in_one_line(tmp_path, case, words):
    src = tmp_path / "pairs.h5"
    _write(src, KEY_RAW, _unusable(case))
    res = CliRunner().invoke(app, ["import", "kaggle", str(src), "--out", str(tmp_path / "o.h5")])
    assert res.exit_code == 2, res.output
    assert not (tmp_path / "o.h5").exists()


def test_a_few_stray_label_values_are_left_to_prepare(tmp_path):
    # Pommier's raw file has a few values >= 4; prepare's label_policy repairs or drops those.
    a = _arr(4, 88, 88)
    a[0, 10:12, 10:12, 1] = 4
    src = tmp_path / "pairs.h5"
    _write(src, KEY_RAW, a)
    out = import_kaggle(src, tmp_path / "raw" / "pairs.h5")
    assert int(read_dataset(out).labels.max()) == 4
