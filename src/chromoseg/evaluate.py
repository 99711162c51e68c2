"""Stage `evaluate`: score the trained model on the held-out test split.

Writes `metrics/eval.json` (stable keys, see `chromoseg.metrics`), DVC plots (per-class bars,
confusion matrix, worst/typical predictions) and logs the same to the training run in MLflow.
In combined mode the two chromosomes are also separated (`chromoseg.separate`) and scored against
the 4-class truth, so both modes report `iou_chromosomes_pi`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from chromoseg.config import InferConfig, Params, class_names
from chromoseg.fsutil import atomic_path, write_json
from chromoseg.labels import instances_to_labels4
from chromoseg.metrics import SegmentationMetrics, instances_connected, per_image_dice, permutation_invariant
from chromoseg.pipeline import load_model, model_from_checkpoint, segment
from chromoseg.plots import confusion_png, overlay_grid, save_png
from chromoseg.prepare import load_split

log = logging.getLogger(__name__)

EVAL_RUN_FILE = "eval/run.json"


def score(
    pred: np.ndarray,
    truth: np.ndarray,
    truth4: np.ndarray,
    combine_label: bool,
    pred4: np.ndarray | None = None,
    separation: str = "geometry",
) -> tuple[dict, np.ndarray]:
    """Metrics for predicted labels; `pred4` (4-class from instances) adds the PI chromosome scores,
    recorded as found by `separation` (`geometry` or the model's `ab_head`), and `instances_connected`.

    Returns (metrics dict, per-image confusions in the model's label space).
    """
    n_classes = 3 if combine_label else 4
    m = SegmentationMetrics(n_classes)
    conf = m.update(truth, pred)
    out = m.compute()
    if combine_label and pred4 is not None:
        sep = SegmentationMetrics(4)
        sep.update(truth4, pred4)
        pi = permutation_invariant(sep.per_image)
        out.update({k: v for k, v in pi.items() if k.startswith("iou_chromosome")})
        out["separation"] = separation
    if pred4 is not None:
        out["instances_connected"] = float(instances_connected(pred4).mean())
    return out, conf


def predict_split(predictor, images: np.ndarray, combine_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) uint8 -> (labels in the model's space, 4-class labels from the instance masks)."""
    out = segment(predictor, images.astype(np.float32) / 255.0, combine_label)
    return out["labels"], instances_to_labels4(out["mask_a"], out["mask_b"])


def run_evaluate(params: Params) -> dict:
    from chromoseg.model import set_threads

    cfg = params.evaluate
    set_threads(params.infer.num_threads)
    test = load_split(params.prepare.out_dir, "test")
    model_path = Path(params.train.out_dir) / "model.pt"
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: no trained model; run `dvc repro train` first")
    model = model_from_checkpoint(model_path, params.infer, batch_size=cfg.batch_size)
    predictor = model.predictor
    if model.combine_label != params.combine_label:
        raise ValueError(
            f"{model_path} was trained with combine_label={model.combine_label} but params.yaml says "
            f"{params.combine_label}; run `dvc repro` to retrain"
        )
    labels, labels4 = predict_split(predictor, test["images"], params.combine_label)
    metrics, conf = score(
        labels, test["labels"], test["labels4"], params.combine_label, labels4, predictor.separation
    )
    metrics["tta_views"] = predictor.tta_views
    write_json(cfg.out, metrics)
    plots = Path(cfg.plots_dir)
    write_plots(plots, metrics, conf, test, labels, params, n=cfg.n_overlays)
    run_id = log_to_mlflow(params, metrics, plots, predictor.describe())
    write_json(EVAL_RUN_FILE, {"run_id": run_id})
    log.info(
        "test dice %.4f, overlap IoU %.4f, chromosomes PI IoU %s on %d images",
        metrics["dice"], metrics["iou_overlap"], metrics.get("iou_chromosomes_pi"), metrics["n_images"],
    )  # fmt: skip
    return metrics


def write_plots(
    out: Path, metrics: dict, conf: np.ndarray, test: dict, pred: np.ndarray, params: Params, n: int
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    names = class_names(params.combine_label)
    rows = ["class,dice,iou"] + [
        f"{c},{metrics['dice_per_class'][c]:.6f},{metrics['iou_per_class'][c]:.6f}" for c in names
    ]
    _write_text(out / "per_class.csv", "\n".join(rows) + "\n")
    total = np.array(metrics["confusion_matrix"])
    rows = ["actual,predicted,pixels"] + [
        f"{names[i]},{names[j]},{int(total[i, j])}" for i in range(len(names)) for j in range(len(names))
    ]
    _write_text(out / "confusion.csv", "\n".join(rows) + "\n")
    confusion_png(out / "confusion.png", total, names)
    scores = per_image_dice(conf)
    order = np.argsort(scores)
    worst = order[:n]
    typical = order[len(order) // 2 - n // 2 : len(order) // 2 - n // 2 + n]
    grid = overlay_grid(test["images"], test["labels"], pred, worst, typical, scores, params.combine_label)
    save_png(out / "predictions.png", grid)


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def log_to_mlflow(params: Params, metrics: dict, plots: Path, execution: dict[str, str]) -> str:
    """Log evaluation to the training run; a fresh run if evaluate params changed since training."""
    import mlflow

    from chromoseg.config import flatten
    from chromoseg.tracking import setup_mlflow

    setup_mlflow(params.mlflow)
    run_file = Path(params.train.out_dir) / "run.json"
    train_run = json.loads(run_file.read_text())["run_id"]
    client = mlflow.MlflowClient()
    try:
        logged = client.get_run(train_run).data.params
    except mlflow.exceptions.MlflowException as exc:
        # DVC can restore models/ from its cache after the tracking store was deleted or replaced.
        raise FileNotFoundError(
            f"{run_file} names MLflow run {train_run}, which the tracking store {mlflow.get_tracking_uri()} "
            "does not hold (was the store replaced?); retrain with `dvc repro -f train`"
        ) from exc
    flat = {k: str(v) for k, v in params.flat().items()}
    # MLflow params are immutable: evaluation or inference settings changed since training get a run
    # of their own.
    changed = {k for k, v in flat.items() if k.startswith(("evaluate.", "infer.")) and logged.get(k, v) != v}
    if changed:
        run = mlflow.start_run(run_name="re-evaluation")
        mlflow.log_params(flat)
        mlflow.set_tag("chromoseg.train_run_id", train_run)
        log.info("evaluate params changed (%s): logging to new run %s", sorted(changed), run.info.run_id)
    else:
        run = mlflow.start_run(run_id=train_run)
    scalars = {
        k: v for k, v in flatten(metrics).items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    scalars = {k.replace("_per_class.", "."): v for k, v in scalars.items() if not k.startswith("confusion")}
    mlflow.log_metrics({("test_" + k if k != "dice" else "dice"): v for k, v in scalars.items()})
    mlflow.log_metric("test_dice", metrics["dice"])
    mlflow.set_tags({f"eval.{k}": v for k, v in execution.items()})
    mlflow.log_dict(metrics, "eval/eval.json")
    for f in sorted(plots.glob("*")):
        if f.is_file():
            mlflow.log_artifact(str(f), "eval/plots")
    mlflow.end_run()
    return run.info.run_id


def score_output(
    res: dict,
    labels4: np.ndarray,
    ab_order: str,
    model_combine_label: bool,
    combine_label: bool,
    separation: str = "geometry",
) -> dict:
    """Metrics of a chromoseg model's output (`labels`, `mask_a`, `mask_b`) against 4-class truth,
    in the label mode `combine_label`. A and B of the truth are named by the model's rule
    (`ab_order`); a model of the other mode is scored through its instance masks."""
    from chromoseg.labels import canonical_ab, combine_labels

    truth4 = canonical_ab(labels4, ab_order)
    pred4 = instances_to_labels4(np.asarray(res["mask_a"]), np.asarray(res["mask_b"]))
    if model_combine_label == combine_label:
        pred = np.asarray(res["labels"], np.uint8)  # the model's own label map
    else:
        pred = combine_labels(pred4) if combine_label else pred4
    truth = combine_labels(truth4) if combine_label else truth4
    return score(pred, truth, truth4, combine_label, pred4, separation)[0]


def run_evaluate_external(
    labelme_dir: str | Path,
    model: str,
    out: str | Path,
    width_from: str = "image",
    infer: InferConfig | None = None,
) -> dict:
    """Score any model on a folder of labelme-annotated real images; same keys as metrics/eval.json.

    `width_from`: each image is rescaled by the width measured on the grey image (`image`), as
    `chromoseg predict` and the served model do with unlabelled images, or by its polygons' width
    (`labels`, the annotation's own scale).
    """
    from chromoseg.data.labelme import load_labelme_dir

    images, truth4, scales, names = load_labelme_dir(labelme_dir, width_from=width_from)
    m = load_model(model, infer)
    res = m.predict(images)
    metrics = score_output(res, truth4, m.ab_order, m.combine_label, m.combine_label, m.separation)
    metrics.update(
        {
            "tta_views": m.tta_views,
            "source": str(labelme_dir),
            "model": str(model),
            "images": names,
            "width_from": width_from,
            "scale_factors": [round(float(s), 4) for s in scales],
        }
    )
    write_json(out, metrics)
    log.info(
        "%s on %d real images: dice %.4f, overlap IoU %.4f, chromosomes PI IoU %s",
        model, len(images), metrics["dice"], metrics["iou_overlap"], metrics.get("iou_chromosomes_pi"),
    )  # fmt: skip
    return metrics
