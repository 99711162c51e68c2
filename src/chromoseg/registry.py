"""Stage `register`: register the new model and move the champion alias only if it wins.

The comparison is made on the same test split and label mode: the champion's recorded score is
reused when it was measured on an identical split (same fingerprint), otherwise the champion is
loaded and re-scored on the current split with the same code as the candidate.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from chromoseg.config import Params
from chromoseg.fsutil import write_json
from chromoseg.prepare import load_split

log = logging.getLogger(__name__)


def split_fingerprint(test: dict[str, np.ndarray], combine_label: bool) -> str:
    h = hashlib.sha256()
    for k in ("images", "labels4"):
        h.update(np.ascontiguousarray(test[k]).tobytes())
    h.update(b"combined" if combine_label else b"four")
    return h.hexdigest()[:16]


def registry_score(metrics: dict, combine_label: bool) -> tuple[str, float]:
    """The figure compared for promotion: dice (combined) or permutation-invariant dice (4 classes)."""
    key = "dice" if combine_label else "dice_pi"
    return key, float(metrics[key])


def resolve_model_uri(model_uri: str, client=None):
    """The ModelVersion behind `models:/NAME@ALIAS` or `models:/NAME/VERSION` (None for other URIs).

    Call it before loading a registered model (`rescore_model`, `chromoseg predict`): it raises a
    ValueError naming what is missing and the aliases and versions that do exist, instead of
    MLflow's bare RESOURCE_DOES_NOT_EXIST.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    prefix = "models:/"
    if not model_uri.startswith(prefix):
        return None
    ref = model_uri[len(prefix) :]
    name, sep, alias = ref.partition("@")
    version = None
    if not sep:
        name, _, version = ref.partition("/")
    client = client or mlflow.MlflowClient()
    try:
        rm = client.get_registered_model(name)
    except MlflowException as exc:
        names = sorted(m.name for m in client.search_registered_models())
        raise ValueError(
            f"{model_uri}: no registered model {name!r} in {mlflow.get_tracking_uri()} "
            f"(registered: {names}); run `chromoseg register` or check MLFLOW_TRACKING_URI"
        ) from exc
    aliases = sorted(getattr(rm, "aliases", {}) or {})
    try:
        if sep:
            return client.get_model_version_by_alias(name, alias)
        if version and version.isdigit():
            return client.get_model_version(name, version)
    except MlflowException as exc:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        what = f"alias {alias!r}" if sep else f"version {version}"
        raise ValueError(
            f"{model_uri}: model {name!r} has no {what} (aliases: {aliases}, versions: {versions}); "
            f"use one of them, e.g. models:/{name}@{aliases[0] if aliases else 'champion'}"
        ) from exc
    return None  # models:/NAME/STAGE (e.g. latest): left to MLflow


def rescore_model(model_uri: str, test: dict[str, np.ndarray], combine_label: bool) -> float:
    """Load any registered chromoseg model and score it on `test` in the current label mode."""
    import mlflow

    from chromoseg.evaluate import score
    from chromoseg.labels import combine_labels, instances_to_labels4

    resolve_model_uri(model_uri)  # a clear error for a missing alias or version
    model = mlflow.pyfunc.load_model(model_uri)
    out = model.predict(test["images"])
    pred4 = instances_to_labels4(out["mask_a"], out["mask_b"])
    pred = combine_labels(pred4) if combine_label else pred4
    # In 4-class mode `score` already holds the permutation-invariant figures (dice_pi).
    metrics, _ = score(pred, test["labels"], test["labels4"], combine_label)
    return registry_score(metrics, combine_label)[1]


def _digits(a: float, b: float, lo: int = 4, hi: int = 8) -> int:
    """Decimals needed to show two different scores as different (4 unless they agree that far)."""
    d = lo
    while d < hi and a != b and f"{a:.{d}f}" == f"{b:.{d}f}":
        d += 1
    return d


def run_register(params: Params) -> dict:
    import mlflow
    from mlflow.exceptions import MlflowException

    from chromoseg.tracking import setup_mlflow

    cfg = params.register
    for f in (Path(params.train.out_dir) / "run.json", Path("eval/run.json"), Path(params.evaluate.out)):
        if not f.is_file():  # checked before MLflow is touched: a failed start leaves no trace there
            raise FileNotFoundError(f"{f}: missing; run `dvc repro evaluate` (train and evaluate) first")
    setup_mlflow(params.mlflow)
    client = mlflow.MlflowClient()
    run_info = json.loads((Path(params.train.out_dir) / "run.json").read_text())
    eval_run = json.loads(Path("eval/run.json").read_text())["run_id"]
    metrics = json.loads(Path(params.evaluate.out).read_text())
    test = load_split(params.prepare.out_dir, "test")
    fp = split_fingerprint(test, params.combine_label)
    kind, new_score = registry_score(metrics, params.combine_label)

    try:
        client.get_registered_model(cfg.model_name)
    except MlflowException:
        client.create_registered_model(
            cfg.model_name, description="chromoseg U-Net for overlapping chromosome pairs"
        )
    mv = mlflow.register_model(run_info["model_uri"], cfg.model_name)
    tags = {
        "test_split": fp,
        "score_kind": kind,
        "score": f"{new_score:.6f}",
        "combine_label": str(params.combine_label).lower(),
        "eval_run_id": eval_run,
    }
    for k, v in tags.items():
        client.set_model_version_tag(cfg.model_name, mv.version, k, v)

    try:
        champ = client.get_model_version_by_alias(cfg.model_name, cfg.alias)
    except MlflowException:
        champ = None
    if champ is None:
        promoted, champ_score, champ_version = True, None, None
        verdict = f"v{mv.version} ({kind} {new_score:.4f}) becomes {cfg.alias}: there was no {cfg.alias}"
    else:
        champ_version = champ.version
        if champ.tags.get("test_split") == fp and champ.tags.get("score_kind") == kind:
            champ_score = float(champ.tags["score"])
        else:
            log.info("champion v%s was scored on another split or mode: re-scoring it", champ.version)
            champ_score = rescore_model(
                f"models:/{cfg.model_name}/{champ.version}", test, params.combine_label
            )
        promoted = new_score > champ_score
        verb = "beats" if promoted else "does not beat"
        d = _digits(new_score, champ_score)
        verdict = (
            f"v{mv.version} ({kind} {new_score:.{d}f}) {verb} {cfg.alias} v{champ.version} "
            f"({kind} {champ_score:.{d}f}) on the same test split"
            + (
                f": v{mv.version} is the new {cfg.alias}"
                if promoted
                else f": {cfg.alias} stays v{champ.version}"
            )
        )
    if promoted:
        client.set_registered_model_alias(cfg.model_name, cfg.alias, mv.version)
    log.info(verdict)
    client.set_model_version_tag(cfg.model_name, mv.version, "promotion", verdict)
    for rid in {run_info["run_id"], eval_run}:
        client.set_tag(rid, "chromoseg.promotion", verdict)
        client.set_tag(rid, "chromoseg.model_version", str(mv.version))
    summary = {
        "version": int(mv.version),
        "promoted": promoted,
        "score_kind": kind,
        "candidate_score": new_score,
        "champion_score": champ_score,
        "champion_version_before": int(champ_version) if champ_version else None,
        "verdict": verdict,
    }
    write_json(cfg.out, summary)
    return summary
