"""Stage `register`: register the new model and move the champion alias only if it wins.

The comparison is made on the same test split, label mode and test-time augmentation: the champion's
recorded score is reused when it was measured on an identical split (same fingerprint) with as many
TTA views, otherwise the champion is loaded and re-scored with the same code as the candidate.
The served model (the pyfunc of `chromoseg.serving`) is built here from the trained checkpoint
(`mlmodel.log_pyfunc_model`), with the `infer` settings as its defaults.

Real-image gate (`register.real_labelme`): the synthetic test split alone can promote a model that
is worse on real images (a longer training can score higher on the split and lower on real-dev). With a
folder of labelme-annotated real images set, both models are also scored there (the same metric,
as `chromoseg evaluate-external` scores them) and the candidate is promoted only if it does not
fall more than `register.real_tolerance` below the champion there. Scores are recorded as model
version tags with the set's fingerprint and reused while the set is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from chromoseg.config import InferConfig, Params
from chromoseg.evaluate import score_output
from chromoseg.fsutil import write_json
from chromoseg.pipeline import load_model, resolve_model_uri
from chromoseg.prepare import load_split

__all__ = ["resolve_model_uri", "run_register", "score_model"]

log = logging.getLogger(__name__)


def split_fingerprint(test: dict[str, np.ndarray], combine_label: bool) -> str:
    return labels_fingerprint(test["images"], test["labels4"], combine_label)


def labels_fingerprint(images: np.ndarray, labels4: np.ndarray, combine_label: bool) -> str:
    """Identity of a scored image set (images, 4-class truth, label mode): equal sets, equal scores."""
    h = hashlib.sha256()
    for a in (images, labels4):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(b"combined" if combine_label else b"four")
    return h.hexdigest()[:16]


def registry_score(metrics: dict, key: str) -> tuple[str, float]:
    """The figure compared for promotion (`Params.register_metric`), as (key, value)."""
    if key not in metrics:
        raise ValueError(
            f"metric {key!r} is not in the scores (keys: {sorted(metrics)}); set register.metric"
        )
    return key, float(metrics[key])


def score_model(
    model: str, images: np.ndarray, labels4: np.ndarray, combine_label: bool, infer: InferConfig | None = None
) -> dict:
    """Load a chromoseg model (`pipeline.load_model`: a registry URI or a checkpoint) and score it on
    (images, 4-class truth) in the current label mode, with the code `evaluate` uses. A and B of the
    truth are named by the model's rule."""
    m = load_model(model, infer)
    # In 4-class mode the scores already hold the permutation-invariant figures (dice_pi).
    return score_output(m.predict(images), labels4, m.ab_order, m.combine_label, combine_label, m.separation)


def real_set_path(cfg_path: str) -> Path:
    """`register.real_labelme` as a path: absolute, or relative to the project root (also under
    `dvc exp run`, which runs the stage in a temporary copy)."""
    from chromoseg.tracking import project_root

    p = Path(cfg_path).expanduser()
    return p if p.is_absolute() else project_root() / p


def load_real_set(params: Params) -> dict | None:
    """The gate's real images (labelme folder, at the 88 x 88 scale) or None when the gate is off."""
    from chromoseg.data.labelme import load_labelme_dir

    if not params.register.real_labelme:
        return None
    d = real_set_path(params.register.real_labelme)
    if not d.is_dir():
        raise FileNotFoundError(
            f"register.real_labelme: {d} is not a folder; point it at a folder of labelme *.json files "
            "(e.g. ../shared/data/real-dev/labelme) or set it to an empty string to turn the real-image gate off"
        )
    images, labels4, _, names = load_labelme_dir(d)
    fp = labels_fingerprint(images, labels4, params.combine_label)
    return {"dir": str(d), "images": images, "labels4": labels4, "n": len(names), "fingerprint": fp}


class _Side:
    """One model's scores for the promotion decision: the test split, and the real set if gated."""

    def __init__(self, score: float, real: float | None = None) -> None:
        self.score = score
        self.real = real


def promotion(new: _Side, champ: _Side | None, tolerance: float, min_gain: float = 0.0) -> tuple[bool, str]:
    """(promote?, why). Promote when there is no champion, or the candidate beats it on the test
    split by more than `min_gain` and, with a real-image gate, does not fall more than `tolerance`
    below it on real images."""
    if champ is None:
        return True, "there was no champion"
    if not new.score > champ.score:
        return False, "it does not beat the champion on the test split"
    if not new.score > champ.score + min_gain:
        return False, (
            f"it beats the champion on the test split by {new.score - champ.score:.4f}, "
            f"not by more than min_gain {min_gain:g}"
        )
    if new.real is not None and champ.real is not None and new.real < champ.real - tolerance:
        return False, (
            f"it beats the champion on the test split but scores lower on the real images "
            f"(by {champ.real - new.real:.4f}, tolerance {tolerance:g})"
        )
    return True, "it beats the champion on the test split" + (
        " and holds up on the real images" if new.real is not None else ""
    )


def _digits(a: float, b: float, lo: int = 4, hi: int = 8) -> int:
    """Decimals needed to show two different scores as different (4 unless they agree that far)."""
    d = lo
    while d < hi and a != b and f"{a:.{d}f}" == f"{b:.{d}f}":
        d += 1
    return d


def _real_score(version, model: str, real: dict, key: str, params: Params) -> float:
    """A version's score on the real set: its recorded tag when made on the same set, else scored now."""
    tags = getattr(version, "tags", None) or {}
    same_views = tags.get("tta_views") == str(params.infer.tta_views)
    if same_views and tags.get("real_set") == real["fingerprint"] and tags.get("real_score_kind") == key:
        return float(tags["real_score"])
    log.info("scoring %s on the %d real images of %s", model, real["n"], real["dir"])
    metrics = score_model(model, real["images"], real["labels4"], params.combine_label, params.infer)
    return registry_score(metrics, key)[1]


def served_model_config(params: Params) -> dict:
    """The served model's defaults, from the inference settings (`mlmodel.log_pyfunc_model`)."""
    return {
        "tta_views": params.infer.tta_views,
        "precision": params.infer.precision,
        "backend": params.infer.backend,
    }


def _compare(kind: str, a: float, b: float) -> str:
    d = _digits(a, b)
    return f"{kind} {a:.{d}f} against {b:.{d}f}"


def run_register(params: Params) -> dict:
    import mlflow
    from mlflow.exceptions import MlflowException

    from chromoseg.mlmodel import log_pyfunc_model
    from chromoseg.tracking import setup_mlflow

    cfg = params.register
    checkpoint = Path(params.train.out_dir) / "model.pt"
    for f in (
        Path(params.train.out_dir) / "run.json",
        checkpoint,
        Path("eval/run.json"),
        Path(params.evaluate.out),
    ):
        if not f.is_file():  # checked before MLflow is touched: a failed start leaves no trace there
            raise FileNotFoundError(f"{f}: missing; run `dvc repro evaluate` (train and evaluate) first")
    real = load_real_set(params)  # a bad folder fails here too, before anything is registered
    if params.finetune.data:  # never gate a fine-tuned model on images it was trained on
        from chromoseg.finetune_gate import check_gate_disjoint

        check_gate_disjoint(params)
    setup_mlflow(params.mlflow)
    client = mlflow.MlflowClient()
    run_info = json.loads((Path(params.train.out_dir) / "run.json").read_text())
    eval_run = json.loads(Path("eval/run.json").read_text())["run_id"]
    metrics = json.loads(Path(params.evaluate.out).read_text())
    test = load_split(params.prepare.out_dir, "test")
    fp = split_fingerprint(test, params.combine_label)
    kind, new_score = registry_score(metrics, params.register_metric)
    new_real = None
    if real is not None:  # scored before registering: a model that cannot be scored is not registered
        new_real = _real_score(None, str(checkpoint), real, kind, params)

    try:
        client.get_registered_model(cfg.model_name)
    except MlflowException:
        client.create_registered_model(
            cfg.model_name, description="chromoseg U-Net for overlapping chromosome pairs"
        )
    # The served model is built here, not in training: it carries today's serving code and the
    # inference settings (`infer`), which can change without retraining.
    with mlflow.start_run(run_id=run_info["run_id"]):
        info = log_pyfunc_model(checkpoint, served_model_config(params))
    mv = mlflow.register_model(info.model_uri, cfg.model_name)
    tags = {
        "test_split": fp,
        "score_kind": kind,
        "score": f"{new_score:.6f}",
        "combine_label": str(params.combine_label).lower(),
        "eval_run_id": eval_run,
        # Scores depend on how the model predicts: reused only under the same test-time augmentation.
        "tta_views": str(params.infer.tta_views),
    }
    if real is not None:
        tags.update(
            {"real_set": real["fingerprint"], "real_score_kind": kind, "real_score": f"{new_real:.6f}"}
        )
    for k, v in tags.items():
        client.set_model_version_tag(cfg.model_name, mv.version, k, v)

    try:
        champ = client.get_model_version_by_alias(cfg.model_name, cfg.alias)
    except MlflowException:
        champ = None
    champ_score = champ_real = champ_version = None
    if champ is not None:
        champ_version = champ.version
        champ_uri = f"models:/{cfg.model_name}/{champ.version}"
        same_views = champ.tags.get("tta_views") == str(params.infer.tta_views)
        if same_views and champ.tags.get("test_split") == fp and champ.tags.get("score_kind") == kind:
            champ_score = float(champ.tags["score"])
        else:
            log.info("champion v%s was scored on another split, mode or TTA: re-scoring it", champ.version)
            champ_metrics = score_model(
                champ_uri, test["images"], test["labels4"], params.combine_label, params.infer
            )
            champ_score = registry_score(champ_metrics, kind)[1]
        if real is not None:
            champ_real = _real_score(champ, champ_uri, real, kind, params)
    if params.finetune.data:
        from chromoseg.finetune_gate import finetune_promotion

        promoted, why = finetune_promotion(
            _Side(new_score, new_real),
            None if champ is None else _Side(champ_score, champ_real),
            cfg.min_gain,
            params.finetune.max_synthetic_drop,
        )
    else:
        promoted, why = promotion(
            _Side(new_score, new_real),
            None if champ is None else _Side(champ_score, champ_real),
            cfg.real_tolerance,
            cfg.min_gain,
        )
    if champ is None:
        verdict = f"v{mv.version} ({kind} {new_score:.4f}) becomes {cfg.alias}: {why}"
    else:
        verdict = f"v{mv.version} against {cfg.alias} v{champ.version}: test split " + _compare(
            kind, new_score, champ_score
        )
        if real is not None:
            verdict += f", {real['n']} real images " + _compare(kind, new_real, champ_real)
        verdict += f"; {why}: " + (
            f"v{mv.version} is the new {cfg.alias}" if promoted else f"{cfg.alias} stays v{champ.version}"
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
        "real_set": None if real is None else {"dir": real["dir"], "n_images": real["n"]},
        "real_tolerance": cfg.real_tolerance if real is not None else None,
        "min_gain": cfg.min_gain,
        "candidate_real_score": new_real,
        "champion_real_score": champ_real,
        "verdict": verdict,
    }
    write_json(cfg.out, summary)
    return summary
