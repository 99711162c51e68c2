"""Bad arguments to every subcommand: one error line, exit code 2, no traceback, nothing written.

Each case runs in a folder holding params.yaml, a small Kaggle-layout file, an image, an empty folder
and a plain file; the folder's content must be the same afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from chromoseg.cli import app

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    # synth
    (["synth", "--n", "0"], "Invalid value for '--n'"),
    (["synth", "--n", "-3"], "greater than or equal to 1"),
    (["synth", "--n", "abc"], "valid integer"),
    (["synth", "--n", "2", "--out", "adir"], "--out adir is a folder"),
    (["synth", "--nope", "3"], "No such option: --nope"),
    (["synth", "--params", "missing.yaml"], "no such parameter file"),
    # import kaggle
    (["import", "kaggle"], "Missing argument 'file'"),
    (["import", "kaggle", "missing.h5"], "file not found"),
    (["import", "kaggle", "pairs.h5", "--out", "adir"], "--out adir is a folder"),
    (["import", "kaggle", "img.png"], "not a readable HDF5 file"),
    # import labelme
    (["import", "labelme", "missing"], "not a directory"),
    (["import", "labelme", "adir"], "no *.json files"),
    (["import", "labelme", "adir", "--target-width", "0"], "target_width must be > 0"),
    (["import", "labelme", "adir", "--target-width", "x"], "Invalid value for '--target-width'"),
    # data report
    (["data", "report", "--raw", "missing.h5"], "file not found"),
    (["data", "report", "--raw", "pairs.h5", "--real-dev", "adir", "--out", "rep"], "no *.json files"),
    (["data", "report", "--raw", "pairs.h5", "--out", "afile"], "--out afile is a file"),
    # predict
    (["predict"], "Missing argument 'images'"),
    (["predict", "missing.png"], "no such file"),
    (["predict", "img.png", "--scale", "abc"], "scale must be a number"),
    (["predict", "img.png", "--scale", "0"], "scale must be > 0"),
    (["predict", "img.png", "--scale", "-1"], "scale must be > 0"),
    (["predict", "img.png", "--url", "notaurl"], "not an http(s) URL"),
    (["predict", "img.png", "--out", "afile"], "--out afile is a file"),
    # evaluate-external
    (["evaluate-external"], "Missing option '--labelme'"),
    (["evaluate-external", "--labelme", "missing"], "not a directory"),
    (["evaluate-external", "--labelme", "adir"], "no *.json files"),
    (["evaluate-external", "--labelme", "adir", "--width-from", "foo"], "--width-from must be one of"),
    (["evaluate-external", "--labelme", "adir", "--out", "adir"], "--out adir is a folder"),
    # bench, bench-serve
    (["bench", "--threads", "-1"], "Invalid value for '--threads'"),
    (["bench", "--preset", "nope"], "unknown bench preset 'nope'"),
    (["bench", "--sweep", "r18-d3,nope"], "unknown bench preset 'nope'"),
    (["bench-serve", "--n-single", "0"], "Invalid value for '--n-single'"),
    (["bench-serve", "--n-batch", "0"], "Invalid value for '--n-batch'"),
    (["bench-serve", "--batch", "-2"], "Invalid value for '--batch'"),
    (["bench-serve", "--payload", "xml"], "payload 'xml' is not one of"),
    # the app itself
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
    (["--bogus"], "No such option: --bogus"),
    (["import", "csv"], "No such command 'csv'"),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    data = np.zeros((2, 88, 88, 2), np.uint8)
    data[:, 30:60, 40:52] = (90, 1)
    with h5py.File(tmp_path / "pairs.h5", "w") as f:
        f.create_dataset("dataset_1", data=data)
    Image.fromarray(data[0, ..., 0]).save(tmp_path / "img.png")
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("keep me\n")
    monkeypatch.chdir(tmp_path)
    # Set, so that no command points MLflow (process-wide) at a store in this folder.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'never.db'}")
    return tmp_path


@pytest.mark.parametrize(("args", "needle"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_argument_is_one_line_exit_2_and_writes_nothing(workdir, caplog, args, needle):
    before = _snapshot(workdir)
    with caplog.at_level(logging.ERROR):
        res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, (res.output, res.exception)
    assert isinstance(res.exception, SystemExit), res.exception  # not an unhandled exception
    assert "Traceback" not in res.output and "Usage:" not in res.output and "╭" not in res.output
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "\n" not in errors[0]
    assert needle in errors[0]
    assert _snapshot(workdir) == before


def test_no_arguments_still_shows_the_help():
    for args in ([], ["import"], ["data"]):
        res = CliRunner().invoke(app, args)
        assert "Usage:" in res.output, args


def test_multi_line_messages_are_joined_into_one(caplog):
    from chromoseg.cli import fail

    with caplog.at_level(logging.ERROR), pytest.raises(Exception) as exc:
        fail("server exited with code 1:\n  Traceback (most recent call last):\n\n  OSError: port in use")
    assert getattr(exc.value, "exit_code", None) == 2
    (message,) = [r.getMessage() for r in caplog.records]
    assert message == "server exited with code 1:; Traceback (most recent call last):; OSError: port in use"


def test_sweep_checks_every_preset_before_running_any(workdir, monkeypatch):
    from chromoseg import bench

    ran = []
    monkeypatch.setattr(bench, "sweep", lambda names, *a, **k: ran.append(names) or [])
    res = CliRunner().invoke(app, ["bench", "--sweep", "r18-d3,nope", "--quick"])
    assert res.exit_code == 2
    assert ran == []
