"""Bad input at every boundary: one clear error line, a non-zero exit, and no output touched.

Each case runs the real `chromoseg` CLI in a subprocess inside a small project that has already been
prepared once, and checks the exit code, the message, and that every file that was there before
(prepared splits, metrics, an earlier import) is unchanged byte for byte, with no stray temp file.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

RAW = "data/raw/LowRes_13434_overlapping_pairs.h5"


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def chromoseg(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["chromoseg", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root` (except `skip`)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in skip:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, small_synth) -> Path:
    """A project with params.yaml, a 40-image raw file and its prepared outputs."""
    from chromoseg.data.io import write_dataset

    root = tmp_path_factory.mktemp("prepared")
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["prepare"]["val_size"] = 4
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    images, labels, groups = small_synth
    write_dataset(root / RAW, images[:40], labels[:40], source_ids=groups[:40])
    res = chromoseg(["prepare"], root)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (root / "data/prepared/train.npz").is_file()
    return root


@pytest.fixture
def project(prepared, tmp_path) -> Path:
    dst = tmp_path / "proj"
    shutil.copytree(prepared, dst)
    return dst


def assert_clean_failure(res: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """Exit `code`, no traceback, and one ERROR line holding every needle; return that line."""
    assert res.returncode == code, f"exit {res.returncode}\n{res.stdout}\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, res.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def run_and_check(project: Path, args: list[str], *needles: str, changed: tuple[str, ...] = ()) -> str:
    """Run a command that must fail; everything but the deliberately broken input stays as it was."""
    before = snapshot(project, skip=changed)
    line = assert_clean_failure(chromoseg(args, project), *needles)
    assert snapshot(project, skip=changed) == before
    return line


def _replace_raw(project: Path, write) -> None:
    raw = project / RAW
    raw.unlink()
    write(raw)


# --- raw HDF5 -------------------------------------------------------------------------------------


def test_truncated_hdf5(project):
    raw = project / RAW
    data = raw.read_bytes()
    raw.write_bytes(data[: len(data) // 2])
    run_and_check(project, ["prepare"], str(raw.relative_to(project)), "truncated or corrupt", changed=(RAW,))


def test_corrupt_hdf5(project):
    (project / RAW).write_bytes(np.random.default_rng(0).bytes(4096))
    run_and_check(project, ["prepare"], "not a readable HDF5 file", changed=(RAW,))


def test_wrong_key(project):
    def write(p):
        with h5py.File(p, "w") as f:
            f.create_dataset("images", data=np.zeros((8, 88, 88, 2), np.uint8))

    _replace_raw(project, write)
    run_and_check(
        project, ["prepare"], "none of the expected keys", "'images'", "prepare.key", changed=(RAW,)
    )


def test_explicit_key_missing(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prepare"]["key"] = "nope"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    run_and_check(project, ["prepare"], "key 'nope' not found", "dataset_1", changed=("params.yaml",))


def test_wrong_shape(project):
    def write(p):
        with h5py.File(p, "w") as f:
            f.create_dataset("dataset_1", data=np.zeros((8, 88, 88, 3), np.uint8))

    _replace_raw(project, write)
    run_and_check(project, ["prepare"], "(8, 88, 88, 3)", "expected (N, H, W, 2)", changed=(RAW,))


def test_wrong_dtype(project):
    def write(p):
        with h5py.File(p, "w") as f:
            f.create_dataset("dataset_1", data=np.zeros((8, 88, 88, 2), np.float32))

    _replace_raw(project, write)
    run_and_check(project, ["prepare"], "dtype float32", "expected uint8", changed=(RAW,))


def test_labels_outside_class_range(project):
    from chromoseg.data.io import read_dataset, write_dataset

    ds = read_dataset(project / RAW)
    labels = ds.labels.copy()
    labels[3, 40:44, 40:44] = 7  # class 7 in a 4-class file
    write_dataset(project / RAW, ds.images, labels, source_ids=ds.source_ids)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prepare"]["label_policy"] = "none"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    run_and_check(
        project, ["prepare"], "16 label pixels in 1 images", "values >= 4", "label_policy",
        changed=(RAW, "params.yaml"),
    )  # fmt: skip


def test_empty_dataset(project):
    def write(p):
        with h5py.File(p, "w") as f:
            f.create_dataset("dataset_1", shape=(0, 88, 88, 2), dtype=np.uint8)

    _replace_raw(project, write)
    run_and_check(project, ["prepare"], "holds no images", "empty", changed=(RAW,))


def test_missing_raw_file(project):
    (project / RAW).unlink()
    run_and_check(project, ["prepare"], "file not found", "chromoseg synth", changed=(RAW,))


def test_import_kaggle_corrupt_keeps_previous_import(project):
    bad = project / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    # The existing raw file doubles as an earlier import that must survive a failed one.
    run_and_check(project, ["import", "kaggle", "bad.h5", "--out", RAW], "not a readable HDF5 file")


# --- labelme --------------------------------------------------------------------------------------


def _labelme_doc(n_polygons: int) -> dict:
    from PIL import Image

    img = np.full((120, 120), 5, np.uint8)  # bright chromosomes on a dark background, as imported
    img[30:90, 50:62] = 80
    img[54:66, 30:90] = 90
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    polys = [
        [[50, 30], [62, 30], [62, 90], [50, 90]],
        [[30, 54], [90, 54], [90, 66], [30, 66]],
        [[20, 20], [30, 20], [30, 30], [20, 30]],
    ]
    return {
        "version": "5.4.1",
        "shapes": [{"label": "chromosome", "points": p, "shape_type": "polygon"} for p in polys[:n_polygons]],
        "imagePath": "pair.png",
        "imageData": base64.b64encode(buf.getvalue()).decode(),
        "imageHeight": 120,
        "imageWidth": 120,
    }


@pytest.mark.parametrize("n_polygons", [1, 3])
def test_labelme_wrong_polygon_count(project, n_polygons):
    d = project / "annotations"
    d.mkdir()
    (d / "pair.json").write_text(json.dumps(_labelme_doc(n_polygons)))
    run_and_check(
        project,
        ["import", "labelme", "annotations", "--out", RAW],
        "pair.json",
        f"found {n_polygons} polygon(s)",
        "expected exactly 2",
        changed=("annotations/pair.json",),
    )


def test_labelme_two_polygons_imports(project):
    """Control for the two cases above: the same file with two polygons is accepted."""
    d = project / "annotations"
    d.mkdir()
    (d / "pair.json").write_text(json.dumps(_labelme_doc(2)))
    res = chromoseg(["import", "labelme", "annotations", "--out", "data/raw/labelme.h5"], project)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (project / "data/raw/labelme.h5").is_file()


# --- params.yaml ----------------------------------------------------------------------------------


def test_params_unknown_key(project):
    text = (project / "params.yaml").read_text().replace("  epochs:", "  epochz:")
    (project / "params.yaml").write_text(text)
    line = run_and_check(
        project, ["train"], "unknown key(s) ['epochz']", "section 'train'", "valid keys", "'epochs'",
        changed=("params.yaml",),
    )  # fmt: skip
    assert "params.yaml" in line


def test_params_wrong_type(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["batch_size"] = "ten"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    run_and_check(
        project, ["prepare"], "train.batch_size", "expected an integer", "'ten'", changed=("params.yaml",)
    )


def test_params_bad_choice(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prepare"]["label_policy"] = "fix"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    run_and_check(
        project, ["prepare"], "prepare.label_policy", "'fix' is not one of", changed=("params.yaml",)
    )


def test_params_architecture_that_cannot_be_built(project):
    """An smp architecture at a depth it cannot do stops training before anything is written."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(arch="FPN", full_res_channels=0, global_context=0)  # encoder_depth stays 3
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    run_and_check(
        project, ["train"], "train.arch 'FPN' with train.encoder_depth 3", "use encoder_depth 5 for FPN",
        changed=("params.yaml",),
    )  # fmt: skip


# --- later stages and the registry ----------------------------------------------------------------


def test_unusable_tracking_store(project):
    """A tracking URI that cannot be opened stops training before it starts, naming the store."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["mlflow"]["tracking_uri"] = "sqlite:////proc/no-such-dir/mlruns.db"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    run_and_check(
        project,
        ["train"],
        "MLflow tracking store sqlite:////proc/no-such-dir/mlruns.db cannot be used",
        "mlflow.tracking_uri",
        changed=("params.yaml",),
    )


def test_evaluate_without_model(project):
    run_and_check(project, ["evaluate"], "no trained model", "dvc repro train")


def test_register_without_eval(project):
    run_and_check(project, ["register"], "models/run.json: missing", "dvc repro evaluate")


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A sqlite registry with model `chromoseg-unet` v1 under alias `champion` (no training needed)."""
    import mlflow

    # The store `project` uses by default (params.yaml's sqlite:///mlruns.db in its folder).
    (tmp_path / "proj").mkdir(exist_ok=True)
    uri = f"sqlite:///{tmp_path / 'proj' / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient()
    client.create_registered_model("chromoseg-unet")
    src = tmp_path / "artifact"
    src.mkdir()
    mv = client.create_model_version("chromoseg-unet", source=src.as_uri())
    client.set_registered_model_alias("chromoseg-unet", "champion", mv.version)
    yield client
    mlflow.set_tracking_uri(None)


def test_registry_missing_alias(registry):
    from chromoseg.registry import resolve_model_uri

    assert str(resolve_model_uri("models:/chromoseg-unet@champion", registry).version) == "1"
    with pytest.raises(ValueError) as err:
        resolve_model_uri("models:/chromoseg-unet@nope", registry)
    msg = str(err.value)
    assert "has no alias 'nope'" in msg and "['champion']" in msg and "versions: [1]" in msg
    assert "\n" not in msg


def test_registry_missing_version_and_model(registry):
    from chromoseg.registry import resolve_model_uri

    with pytest.raises(ValueError, match=r"has no version 7 .*versions: \[1\]"):
        resolve_model_uri("models:/chromoseg-unet/7", registry)
    with pytest.raises(ValueError, match=r"no registered model 'other' .*\['chromoseg-unet'\]"):
        resolve_model_uri("models:/other@champion", registry)


def test_predict_missing_alias(project, registry):
    """`chromoseg predict --model models:/chromoseg-unet@nope`: a one-line error naming the aliases."""
    helped = chromoseg(["predict", "--help"], project)
    assert helped.returncode == 0 and "--model" in helped.stdout, helped.stderr[-2000:]
    from PIL import Image

    Image.fromarray(np.zeros((88, 88), np.uint8)).save(project / "x.png")
    run_and_check(
        project, ["predict", "--model", "models:/chromoseg-unet@nope", "--out", "pred", "--scale", "1", "x.png"],
        "models:/chromoseg-unet@nope", changed=("x.png", "mlruns.db"),
    )  # fmt: skip
    assert not (project / "pred").exists()
