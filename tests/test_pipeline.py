"""The inference core's model handle: every kind of model reference, and the errors for the ones
that lead nowhere (one line, nothing left behind)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _project import ROOT, project_env
from chromoseg.config import InferConfig
from chromoseg.pipeline import NO_MODEL, ModelLoadError, load_model
from test_serving import tiny_checkpoint


def write_png(path: Path, image: np.ndarray) -> Path:
    Image.fromarray(image).save(path)
    return path


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["chromoseg", *args], cwd=cwd, env=project_env(), capture_output=True, text=True, timeout=300
    )


def error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, res.stderr[-2000:]
    return errors[0]


def test_checkpoint_and_model_folder_load_alike(tmp_path: Path) -> None:
    ck = tiny_checkpoint(tmp_path / "model.pt", combine_label=True)
    m = load_model(ck, InferConfig(tta_views=2, precision="fp32", backend="torch"))
    assert (m.combine_label, m.ab_order, m.tta_views, m.uri) == (True, "area", 2, str(ck))
    images = np.random.default_rng(0).integers(0, 256, (2, 88, 88), dtype=np.uint8)
    out = m.predict(images)
    assert out["labels"].shape == (2, 88, 88) and set(np.unique(out["labels"])) <= {0, 1, 2}
    # An MLflow model folder holds the checkpoint under artifacts/: found there.
    folder = tmp_path / "folder" / "artifacts"
    folder.mkdir(parents=True)
    tiny_checkpoint(folder / "model.pt")
    assert load_model(tmp_path / "folder").combine_label is True


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"^file not found: .*nope\.pt$"):
        load_model(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="not a chromoseg checkpoint"):
        load_model(tmp_path / "junk.pt")


def test_empty_registry_says_no_model_yet(tmp_path: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments()  # creates the store
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with pytest.raises(ModelLoadError) as info:
            load_model("models:/chromoseg-unet@champion")
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    assert str(info.value) == NO_MODEL


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with the project's params.yaml and no tracking store yet."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    write_png(tmp_path / "x.png", np.full((88, 88), 30, np.uint8))
    return tmp_path


def test_predict_without_a_model_says_so_and_creates_no_store(project: Path) -> None:
    line = error_line(cli(["predict", "x.png", "--out", "o", "--scale", "1"], project))
    assert line.endswith(f"chromoseg: {NO_MODEL}")
    assert not (project / "mlruns.db").exists() and not (project / "o").exists()
    line = error_line(cli(["evaluate-external", "--labelme", ".", "--out", "e.json"], project))
    assert "no *.json files" in line  # the images are read first, then the model
    assert not (project / "mlruns.db").exists()


def test_predict_takes_a_checkpoint_path(project: Path) -> None:
    tiny_checkpoint(project / "model.pt")
    res = cli(["predict", "x.png", "--model", "model.pt", "--out", "o", "--scale", "1"], project)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (project / "o" / "x_labels.png").is_file() and (project / "o" / "x_summary.json").is_file()
    line = error_line(
        cli(["predict", "x.png", "--model", "missing.pt", "--out", "o2", "--scale", "1"], project)
    )
    assert line.endswith("chromoseg: file not found: missing.pt")
    assert not (project / "o2").exists() and not (project / "mlruns.db").exists()
