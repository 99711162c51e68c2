"""End to end: the real `dvc repro` on a tiny synthetic set in a copy of the repository.

The module fixture builds the project once and records what the first `dvc repro` wrote; tests that
change the project (an experiment, a param edit) compare against the state they find, so any order
of the tests passes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from _project import copy_project, project_env
from _project import run as _run

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    proj = tmp_path_factory.mktemp("proj")
    copy_project(proj, skip=())
    env = project_env()
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["synth"]["n_images"] = 96
    params["prepare"]["val_size"] = 8
    params["train"].update(
        epochs=1, samples_per_epoch=24, batch_size=8, encoder_depth=3, decoder_channels=[32, 16, 8]
    )
    params["evaluate"]["n_overlays"] = 4
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init", "--allow-empty"],
    ):
        _run(cmd, proj, env)
    _run(["chromoseg", "synth"], proj, env)
    _run(["dvc", "commit", "-q", "-f", "data.dvc"], proj, env)
    _run(["git", "add", "-A"], proj, env)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tiny"], proj, env)
    out = _run(["dvc", "repro"], proj, env)
    first = {
        "eval": json.loads((proj / "metrics/eval.json").read_text()),
        "register": json.loads((proj / "metrics/register.json").read_text()),
        "run_id": json.loads((proj / "models/run.json").read_text())["run_id"],
        "history": (proj / "plots/train_history.csv").read_text(),
        "predictions_png": (proj / "plots/eval/predictions.png").is_file(),
    }
    return proj, env, out, first


def params_of(proj) -> dict:
    return yaml.safe_load((proj / "params.yaml").read_text())


def test_repro_runs_all_stages_and_writes_metrics(project):
    proj, _, out, first = project
    for stage in ("prepare", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out
    ev = first["eval"]
    assert ev["combine_label"] is True
    assert ev["n_images"] > 0
    assert 0.0 <= ev["dice"] <= 1.0
    assert sorted(ev["dice_per_class"]) == ["background", "chromosome", "overlap"]
    assert sorted(ev["iou_per_class"]) == ["background", "chromosome", "overlap"]
    assert "iou_chromosomes_pi" in ev
    # The default trains the A/B head, and its split gives the chromosome masks.
    assert params_of(proj)["train"]["ab_aux"] is True and ev["separation"] == "ab_head"
    # Evaluation predicts with the test-time views params.yaml sets (more than one by default).
    views = params_of(proj)["infer"]["tta_views"]
    assert views > 1 and ev["tta_views"] == views
    assert first["predictions_png"]
    assert first["history"].startswith("epoch,train_loss,val_dice")


def test_mlflow_run_and_champion(project):
    import mlflow

    proj, _, _, first = project
    uri = f"sqlite:///{proj}/mlruns.db"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(first["run_id"])  # the first training run, whatever ran since
    assert run.data.params["combine_label"] == "True"
    assert run.data.params["train.epochs"] == "1"
    assert "dice" in run.data.metrics and "val_dice" in run.data.metrics and "train_loss" in run.data.metrics
    ev = first["eval"]
    assert run.data.metrics["dice"] == pytest.approx(ev["dice"])
    assert "chromoseg.promotion" in run.data.tags
    # The default predicts with test-time augmentation, in evaluation and in the served model alike.
    views = params_of(proj)["infer"]["tta_views"]
    assert views > 1 and run.data.tags["eval.tta_views"] == str(views)
    assert first["register"]["version"] == 1 and first["register"]["promoted"] is True
    mlflow.set_registry_uri(uri)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/chromoseg-unet/1")
    assert model.unwrap_python_model().predictor.tta_views == views
    from chromoseg.prepare import load_split

    test = load_split(proj / "data/prepared", "test")
    out = model.predict(test["images"][:3])
    assert np.asarray(out["labels"]).shape == (3, 88, 88)
    assert set(np.unique(out["labels"])) <= {0, 1, 2}


def test_second_repro_runs_nothing_and_eval_param_reruns_only_eval(project):
    proj, env, _, _ = project
    out = _run(["dvc", "repro"], proj, env)
    assert "Running stage" not in out
    before = json.loads((proj / "metrics/register.json").read_text())
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["evaluate"]["n_overlays"] = 2 if params["evaluate"]["n_overlays"] != 2 else 3
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(["dvc", "repro"], proj, env)
    assert "Running stage 'evaluate'" in out and "Running stage 'register'" in out
    assert "Running stage 'train'" not in out and "Running stage 'prepare'" not in out
    reg = json.loads((proj / "metrics/register.json").read_text())
    champion = before["version"] if before["promoted"] else before["champion_version_before"]
    assert reg["version"] == before["version"] + 1 and reg["champion_version_before"] == champion


def test_inference_setting_reruns_evaluate_and_register_only(project):
    proj, env, _, _ = project
    params = params_of(proj)
    views = 4 if params["infer"]["tta_views"] != 4 else 2
    params["infer"]["tta_views"] = views
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _run(["dvc", "status"], proj, env)
    assert "evaluate:" in status and "register:" in status and "train:" not in status
    out = _run(["dvc", "repro"], proj, env)
    assert "Running stage 'evaluate'" in out and "Running stage 'register'" in out
    assert "Running stage 'train'" not in out and "Running stage 'prepare'" not in out
    assert json.loads((proj / "metrics/eval.json").read_text())["tta_views"] == views


def assert_saved_best_epoch(proj, selected_by: str) -> None:
    """metrics/train.json names the selection metric, and its epoch is the history's best."""
    tr = json.loads((proj / "metrics/train.json").read_text())
    assert tr["selected_by"] == selected_by
    lines = (proj / "plots/train_history.csv").read_text().split()
    col = lines[0].split(",").index("val_selection")
    values = [float(line.split(",")[col]) for line in lines[1:]]
    assert len(values) == params_of(proj)["train"]["epochs"]
    assert tr["best_val_dice"] == pytest.approx(max(values), abs=1e-5)
    assert values[tr["best_epoch"]] == pytest.approx(max(values), abs=1e-5)
    assert all(v < max(values) - 1e-5 for v in values[: tr["best_epoch"]])  # the first best is kept


@pytest.mark.slow  # a second full training through `dvc exp run`; the 4-class path has unit tests too
def test_exp_run_four_classes(project):
    proj, env, _, _ = project
    assert_saved_best_epoch(proj, "dice")
    _run(["git", "add", "-A"], proj, env)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "eval"], proj, env)
    _run(["dvc", "exp", "run", "-S", "combine_label=false", "-S", "train.epochs=3"], proj, env)
    ev = json.loads((proj / "metrics/eval.json").read_text())
    assert ev["combine_label"] is False
    # 4 classes select on the dice with A and B merged (train.select_by: auto).
    assert_saved_best_epoch(proj, "dice_combined")
    assert sorted(ev["iou_per_class"]) == ["background", "chromosome_a", "chromosome_b", "overlap"]
    # Merging A and B can only turn wrong pixels right: never below the plain 4-class dice.
    assert ev["dice"] <= ev["dice_combined"] <= 1.0
    summary = _run(["chromoseg", "summary"], proj, env)
    assert "4 classes" in summary and f"{ev['dice_combined']:.4f}" in summary
    assert f"{ev['dice_pi']:.4f}" in summary
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], proj, env))
    text = json.dumps(shown)
    assert text.count('"dice"') >= 2


def test_promotion_verdict_shows_enough_digits_to_tell_scores_apart():
    from chromoseg.registry import _digits

    assert _digits(0.97, 0.95) == 4
    assert _digits(0.216684098, 0.216689439) == 5  # 0.2167 twice, then 0.21668 vs 0.21669
    assert _digits(0.5, 0.5) == 4  # a tie stays at 4 decimals
    assert _digits(0.1, 0.1 + 1e-12) == 8  # capped


def test_promotion_rule():
    from chromoseg.registry import _Side, promotion

    assert promotion(_Side(0.5), None, 0.0)[0] is True  # no champion yet
    assert promotion(_Side(0.91), _Side(0.90), 0.0)[0] is True
    assert promotion(_Side(0.90), _Side(0.90), 0.0)[0] is False  # a tie keeps the champion
    # Better on the test split, worse on the real images: the gate keeps the champion ...
    ok, why = promotion(_Side(0.99, real=0.80), _Side(0.98, real=0.85), 0.0)
    assert ok is False and "real images" in why and "0.0500" in why
    # ... unless the drop is within the tolerance; a real-image gain never promotes on its own.
    assert promotion(_Side(0.99, real=0.80), _Side(0.98, real=0.85), 0.06)[0] is True
    assert promotion(_Side(0.97, real=0.95), _Side(0.98, real=0.85), 0.0)[0] is False
    # min_gain: a gain at or below it keeps the champion, and says by how much it beat it.
    ok, why = promotion(_Side(0.9841), _Side(0.9840), 0.0, min_gain=0.0005)
    assert ok is False and "by 0.0001" in why and "min_gain 0.0005" in why
    assert promotion(_Side(0.9850), _Side(0.9840), 0.0, min_gain=0.0005)[0] is True


def write_labelme_pairs(folder, images, labels4) -> None:
    """Each (grey image, 4-class label) as a labelme file: image embedded, one polygon per chromosome."""
    import base64
    import io

    from PIL import Image
    from skimage import measure

    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, lab) in enumerate(zip(images, labels4, strict=True)):
        shapes = []
        for cls in (1, 2):
            mask = np.pad((lab == cls) | (lab == 3), 1).astype(float)
            outline = max(measure.find_contours(mask, 0.5), key=len) - 1  # back to image coordinates
            points = [[float(x), float(y)] for y, x in outline[::2]]
            shapes.append({"label": "chromosome", "points": points, "shape_type": "polygon"})
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        doc = {
            "shapes": shapes,
            "imagePath": f"pair{i}.png",
            "imageData": base64.b64encode(buf.getvalue()).decode(),
            "imageHeight": int(img.shape[0]),
            "imageWidth": int(img.shape[1]),
        }
        (folder / f"pair{i}.json").write_text(json.dumps(doc))


def test_register_real_image_gate(project):
    """`register.real_labelme`: both models scored on the real set as evaluate-external scores them."""
    import subprocess

    import mlflow

    from chromoseg.prepare import load_split

    proj, env, _, _ = project
    test = load_split(proj / "data/prepared", "test")
    write_labelme_pairs(proj / "real", test["images"][:5], test["labels4"][:5])
    uri = f"sqlite:///{proj}/mlruns.db"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    n_versions = len(client.search_model_versions("name='chromoseg-unet'"))
    reg_file = proj / "metrics/register.json"
    before = reg_file.read_bytes()

    def set_gate(folder: str) -> None:
        params = params_of(proj)
        params["register"]["real_labelme"] = folder
        (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    # A folder that is not there: one clear error, nothing registered, register.json untouched.
    set_gate("no-such-folder")
    res = subprocess.run(["chromoseg", "register"], cwd=proj, env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "register.real_labelme" in res.stderr and "no-such-folder" in res.stderr
    assert len(client.search_model_versions("name='chromoseg-unet'")) == n_versions
    assert reg_file.read_bytes() == before

    set_gate("real")
    out = _run(["dvc", "repro"], proj, env)
    assert "Running stage 'register'" in out and "Running stage 'train'" not in out
    reg = json.loads(reg_file.read_text())
    assert reg["version"] == n_versions + 1 and reg["real_set"]["n_images"] == 5
    key = "dice" if params_of(proj)["combine_label"] else "dice_pi"  # register.metric auto
    assert reg["score_kind"] == key
    # The gate's figures are evaluate-external's on the same folder (at the polygons' scale), for
    # candidate and champion.
    # evaluate-external scores a model in its own label mode, the gate in the project's: compare where
    # they agree (the candidate always; the champion unless an earlier test made it the other mode).
    mode = str(params_of(proj)["combine_label"]).lower()
    compared = []
    for version, score in (
        (reg["version"], "candidate_real_score"),
        (reg["champion_version_before"], "champion_real_score"),
    ):
        if client.get_model_version("chromoseg-unet", str(version)).tags.get("combine_label") != mode:
            continue
        compared.append(version)
        _run(
            ["chromoseg", "evaluate-external", "--labelme", "real", "--model",
             f"models:/chromoseg-unet/{version}", "--out", "ext.json", "--width-from", "labels"],
            proj, env,
        )  # fmt: skip
        ext = json.loads((proj / "ext.json").read_text())
        assert reg[score] == pytest.approx(ext[key], abs=1e-9)
    assert reg["version"] in compared
    # By default the scale is measured on the grey image instead of the polygons: these are images at
    # the training scale, so each factor is near 1 (the polygons' width gives about 1 too).
    _run(
        ["chromoseg", "evaluate-external", "--labelme", "real", "--model",
         f"models:/chromoseg-unet/{reg['version']}", "--out", "ext_image.json"],
        proj, env,
    )  # fmt: skip
    ext_image = json.loads((proj / "ext_image.json").read_text())
    assert ext_image["width_from"] == "image" and ext["width_from"] == "labels"
    assert all(0.8 < s < 1.25 for s in ext_image["scale_factors"])
    bad = subprocess.run(
        ["chromoseg", "evaluate-external", "--labelme", "real", "--width-from", "polygons"],
        cwd=proj, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "--width-from must be one of labels, image" in bad.stderr
    promote = reg["candidate_score"] > reg["champion_score"] + reg["min_gain"] and (
        reg["candidate_real_score"] >= reg["champion_real_score"] - reg["real_tolerance"]
    )
    assert reg["promoted"] is promote and "5 real images" in reg["verdict"]
    tags = client.get_model_version("chromoseg-unet", str(reg["version"])).tags
    assert tags["real_score"] == f"{reg['candidate_real_score']:.6f}" and tags["real_score_kind"] == key
