"""Importing a labelme folder as a real set, and fine-tuning a checkpoint on it.

The labelme files are made here (two crossing or touching bars on a black image), the checkpoint is
a tiny untrained network and the synthetic splits come from the project's generator, so the tests
need neither real-dev nor a trained model.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from chromoseg.cli import app
from chromoseg.config import TrainConfig, load_params, params_from_dict
from chromoseg.data.io import DataError, read_dataset
from chromoseg.data.labelme import polygon_mask

TINY = {
    "encoder_depth": 3,
    "decoder_channels": [8, 8, 8],
    "full_res_channels": 8,
    "global_context": 8,
    "ab_aux": True,
    "loss": "ce+dice",
    "normalize": "single",
    "precision": "fp32",
    "num_threads": 1,
}


def _doc(k: int, shape=(180, 180), invert: bool = False) -> dict:
    """A labelme document: two 22 px wide bars crossing (or, for odd k, touching) on black."""
    h, w = shape
    img = np.zeros((h, w), np.uint8)
    c = 50 + 5 * k
    pa = [(30.0, c), (150.0, c), (150.0, c + 21.0), (30.0, c + 21.0)]
    x = 80.0 + 3 * k if k % 2 == 0 else 30.0 + 3 * k
    y0, length = (30.0, 110.0) if k % 2 == 0 else (c + 22.0, 60.0)
    pb = [(x, y0), (x + 21.0, y0), (x + 21.0, y0 + length), (x, y0 + length)]
    for p in (pa, pb):
        img[polygon_mask(p, (h, w))] += 70
    if invert:
        img = 255 - img
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return {
        "shapes": [
            {"label": "chromosome", "points": pa, "shape_type": "polygon"},
            {"label": "chromosome", "points": pb, "shape_type": "polygon"},
        ],
        "imagePath": f"pair{k}.png",
        "imageData": base64.b64encode(buf.getvalue()).decode(),
        "imageHeight": h,
        "imageWidth": w,
    }


def _folder(path: Path, ks=range(4)) -> Path:
    path.mkdir(parents=True)
    for k in ks:
        (path / f"pair{k}.json").write_text(json.dumps(_doc(k)))
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- import ----------------------------------------------------------------------------------------


def test_import_writes_real_set_and_provenance_and_prints_one_command(tmp_path, monkeypatch):
    _folder(tmp_path / "mylab" / "labelme")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["import", "labelme", "mylab/labelme"])
    assert res.exit_code == 0, res.output
    h5, prov = Path("data/real/mylab.h5"), Path("data/real/mylab.provenance.json")
    assert not Path("data/raw").exists()  # never mixed into the synthetic default's folder
    ds = read_dataset(h5)
    assert ds.images.shape == (4, 88, 88) and set(np.unique(ds.labels)) <= {0, 1, 2, 3}
    doc = json.loads(prov.read_text())
    assert [r["file"] for r in doc["images"]] == [f"pair{k}.json" for k in range(4)]
    assert doc["source_dir"] == "mylab/labelme" and doc["n_images"] == 4
    assert all(0.45 < r["scale"] < 0.6 and len(r["sha256"]) == 64 for r in doc["images"])
    commands = [ln for ln in res.stdout.splitlines() if ln.startswith("next:")]
    assert commands == [f"next: dvc add {h5} && dvc exp run -S finetune.data={h5}"]
    first = _tree(tmp_path / "data")
    assert CliRunner().invoke(app, ["import", "labelme", "mylab/labelme"]).exit_code == 0
    assert _tree(tmp_path / "data") == first  # byte-identical: re-importing changes nothing


def test_import_in_the_project_sets_finetune_data_and_nothing_else(tmp_path, monkeypatch):
    root = Path(__file__).resolve().parents[1]
    original = (root / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(original)
    _folder(tmp_path / "mylab")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["import", "labelme", "mylab"])
    assert res.exit_code == 0, res.output
    new = (tmp_path / "params.yaml").read_text()
    changed = [(a, b) for a, b in zip(original.splitlines(), new.splitlines(), strict=True) if a != b]
    assert len(changed) == 1 and changed[0][1].startswith("  data: data/real/mylab.h5 ")
    assert load_params(tmp_path / "params.yaml").finetune.data == "data/real/mylab.h5"
    assert [ln for ln in res.stdout.splitlines() if ln.startswith("next:")] == [
        "next: dvc add data/real/mylab.h5   (then `dvc repro` fine-tunes on it)"
    ]
    # A bad folder changes neither params.yaml nor data/.
    (tmp_path / "params.yaml").write_text(original)
    _folder(tmp_path / "bad", ks=())
    assert CliRunner().invoke(app, ["import", "labelme", "bad"]).exit_code == 2
    assert (tmp_path / "params.yaml").read_text() == original
    assert not Path("data/real/bad.h5").exists()


def _break(folder: Path, case: str) -> None:
    f = folder / "pair1.json"
    doc = json.loads(f.read_text())
    if case == "one polygon":
        doc["shapes"] = doc["shapes"][:1]
    elif case == "three polygons":
        doc["shapes"].append(doc["shapes"][0])
    elif case == "other size":
        doc["imageHeight"], doc["imageWidth"] = 360, 360
    elif case == "outside":
        doc["shapes"][1]["points"] = [[x + 150.0, y] for x, y in doc["shapes"][1]["points"]]
    elif case == "inverted":
        doc = _doc(1, invert=True)
    f.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("one polygon", "found 1 polygon"),
        ("three polygons", "found 3 polygon"),
        ("other size", "drawn on 360 x 360"),
        ("outside", "outside the 180 x 180 px image"),
        ("inverted", "not brighter than the background"),
        ("empty", r"no \*\.json files"),
    ],
)
def test_import_rejects_bad_input_in_one_line_and_writes_nothing(tmp_path, monkeypatch, caplog, case, words):
    folder = _folder(tmp_path / "lab", ks=() if case == "empty" else range(3))
    if case != "empty":
        _break(folder, case)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "keep.h5").write_bytes(b"synthetic")
    before = _tree(tmp_path / "data")
    res = CliRunner().invoke(app, ["import", "labelme", "lab"])
    assert res.exit_code == 2 and res.stdout == ""
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert re.search(words, errors[0]), errors[0]
    if case != "empty":
        assert "pair1.json" in errors[0]
    assert _tree(tmp_path / "data") == before
    assert not (tmp_path / "data" / "real").exists()


# --- fine-tuning -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory, small_synth):
    """A project folder with small prepared splits, a real set and a tiny checkpoint."""
    from chromoseg.data.labelme import import_labelme
    from chromoseg.labels import combine_labels
    from chromoseg.model import build_model
    from chromoseg.prepare import save_npz

    root = tmp_path_factory.mktemp("ft")
    images, labels4, _ = small_synth
    for name, sl in (("train", slice(0, 48)), ("val", slice(48, 56)), ("test", slice(56, 64))):
        save_npz(
            root / "data/prepared" / f"{name}.npz",
            images=images[sl],
            labels=combine_labels(labels4[sl]),
            labels4=labels4[sl],
            index=np.arange(64)[sl],
            source=np.full(len(images[sl]), -1, np.int64),
        )
    _folder(root / "lab")
    import_labelme(root / "lab", root / "data/real/lab.h5")
    cfg = TrainConfig(**{**TINY, "decoder_channels": (8, 8, 8)})
    torch.manual_seed(0)
    net = build_model(cfg, 3)
    ck = {
        "state_dict": net.state_dict(),
        "train": asdict(cfg),
        "n_classes": 3,
        "combine_label": True,
        "ab_order": "position",
    }
    torch.save(ck, root / "init.pt")
    return root


def _params(root: Path, **finetune):
    return params_from_dict(
        {
            "seed": 1,
            "prepare": {"out_dir": str(root / "data/prepared"), "ab_order": "position"},
            "train": {
                **TINY,
                "out_dir": str(root / "models"),
                "metrics": str(root / "metrics/train.json"),
                "history": str(root / "plots/history.csv"),
            },
            "finetune": {
                "data": str(root / "data/real/lab.h5"),
                "init": str(root / "init.pt"),
                "steps": 4,
                "batch_size": 4,
                "eval_every": 2,
                **finetune,
            },
            "register": {"real_labelme": str(root / "gate") if (root / "gate").is_dir() else ""},
            "mlflow": {
                "tracking_uri": f"sqlite:///{root}/mlruns.db",
                "artifact_root": str(root / "mlartifacts"),
            },
        }
    )


def test_finetune_changes_the_weights_and_logs_its_params(project, monkeypatch):
    import mlflow

    from chromoseg.finetune import run_finetune as run_train

    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _params(project)
    summary = run_train(params)
    ck = torch.load(project / "models/model.pt", weights_only=False)
    init = torch.load(project / "init.pt", weights_only=False)
    assert ck["train"] == init["train"] and ck["n_classes"] == 3
    changed = [
        k
        for k, v in init["state_dict"].items()
        if v.is_floating_point() and not torch.equal(v, ck["state_dict"][k])
    ]
    assert len(changed) > len(init["state_dict"]) // 2  # the network moved, not a copy of init
    assert summary["finetune"]["n_real"] == 4 and summary["epochs"] == 2
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns.db")
    run = mlflow.get_run(run_id)
    p = run.data.params
    assert p["finetune.data"] == str(project / "data/real/lab.h5") and p["finetune.steps"] == "4"
    assert p["finetune.real_fraction"] == "0.5" and p["finetune.n_real"] == "4"
    assert len(p["finetune.data_sha256"]) == 64 and len(p["finetune.init_sha256"]) == 64
    assert run.data.tags["chromoseg.finetune"] == "true"
    assert "val_dice" in run.data.metrics


def test_register_refuses_a_gate_that_shares_images_with_the_fine_tune_set(project, monkeypatch):
    from chromoseg.finetune_gate import check_gate_disjoint
    from chromoseg.registry import run_register

    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    gate = _folder(project / "gate", ks=(2, 7))  # pair2 is in the fine-tune set, pair7 is not
    try:
        params = _params(project)
        for f, text in (("models/run.json", '{"run_id": "x", "checkpoint_uri": "runs:/x/model.pt"}'),
                        ("models/model.pt", "x"), ("eval/run.json", '{"run_id": "x"}'),
                        ("metrics/eval.json", '{"dice": 0.5}')):  # fmt: skip
            (project / f).parent.mkdir(parents=True, exist_ok=True)
            if not (project / f).exists():
                (project / f).write_text(text)
        store = project / "mlruns.db"
        before = store.read_bytes() if store.exists() else None
        with pytest.raises(DataError, match=r"share 1 image\(s\) \(pair2\.json\): the gate would score"):
            run_register(params)
        assert (store.read_bytes() if store.exists() else None) == before  # the registry is untouched
        # A gate of other images passes the check.
        (gate / "pair2.json").unlink()
        check_gate_disjoint(_params(project))
    finally:
        import shutil

        shutil.rmtree(gate)


@pytest.mark.parametrize(
    ("finetune", "words"),
    [
        ({"data": "nowhere.h5"}, "file not found; import the annotations first"),
        ({"init": "missing.pt"}, "finetune.init: missing.pt: file not found"),
        ({"init": "models:/chromoseg-unet@champion"}, "no model yet"),
    ],
)
def test_finetune_bad_setup_is_one_clear_error(project, monkeypatch, finetune, words):
    from chromoseg.finetune import run_finetune as run_train

    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _params(project, **finetune)
    params = params_from_dict({**_as_dict(params), "mlflow": {"tracking_uri": "sqlite:///none.db"}})
    with pytest.raises(DataError, match=words):
        run_train(params)
    assert not (project / "none.db").exists()


def _as_dict(params) -> dict:
    d = asdict(params)
    d.pop("synth")
    return d


def test_finetuned_versions_are_promoted_by_the_real_gate_not_the_synthetic_split():
    from chromoseg.finetune_gate import finetune_promotion
    from chromoseg.registry import _Side

    champ = _Side(0.98, 0.92)
    ok, why = finetune_promotion(_Side(0.975, None), champ, 0.001, 0.01)
    assert not ok and "only through the real-image gate" in why
    ok, why = finetune_promotion(_Side(0.975, 0.93), champ, 0.001, 0.01)  # lower on synthetic, within 0.01
    assert ok and "beats the champion on the real images" in why
    ok, why = finetune_promotion(_Side(0.96, 0.95), champ, 0.001, 0.01)
    assert not ok and "0.0200 below it on the synthetic test split" in why
    ok, why = finetune_promotion(_Side(0.99, 0.9205), champ, 0.001, 0.01)
    assert not ok and "does not beat the champion on the real images" in why
