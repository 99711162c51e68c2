"""Stage `evaluate`: score the trained model on the held-out test split.

Writes `metrics/eval.json` (stable keys, see `chromoseg.metrics`), DVC plots (per-class bars,
confusion matrix, worst/typical predictions) and logs the same to the training run in MLflow.
In combined mode the two chromosomes are also separated (`chromoseg.separate`) and scored against
the 4-class truth, so both modes report `iou_chromosomes_pi`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from chromoseg.config import Params, class_names
from chromoseg.fsutil import atomic_path, write_json
from chromoseg.labels import instances_to_labels4
from chromoseg.metrics import SegmentationMetrics, instances_connected, per_image_dice, permutation_invariant
from chromoseg.prepare import load_split

log = logging.getLogger(__name__)

EVAL_RUN_FILE = "eval/run.json"
# Overlay colours (RGB): A red, B blue, overlap yellow; combined chromosome green.
COLOURS_4 = np.array([[0, 0, 0], [230, 40, 40], [40, 90, 255], [255, 220, 0]], np.uint8)
COLOURS_3 = np.array([[0, 0, 0], [40, 200, 80], [255, 220, 0]], np.uint8)


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
    from chromoseg.serving import segment

    out = segment(predictor, images.astype(np.float32) / 255.0, combine_label)
    return out["labels"], instances_to_labels4(out["mask_a"], out["mask_b"])


def run_evaluate(params: Params) -> dict:
    from chromoseg.model import set_threads
    from chromoseg.serving import predictor_from_checkpoint

    cfg = params.evaluate
    set_threads(params.train.num_threads)
    test = load_split(params.prepare.out_dir, "test")
    model_path = Path(params.train.out_dir) / "model.pt"
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: no trained model; run `dvc repro train` first")
    predictor, ck = predictor_from_checkpoint(model_path)
    predictor.batch_size = cfg.batch_size
    if bool(ck["combine_label"]) != params.combine_label:
        raise ValueError(
            f"{model_path} was trained with combine_label={ck['combine_label']} but params.yaml says "
            f"{params.combine_label}; run `dvc repro` to retrain"
        )
    labels, labels4 = predict_split(predictor, test["images"], params.combine_label)
    metrics, conf = score(
        labels, test["labels"], test["labels4"], params.combine_label, labels4, predictor.separation
    )
    metrics["tta"] = predictor.tta
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
    _confusion_png(out / "confusion.png", total, names)
    scores = per_image_dice(conf)
    order = np.argsort(scores)
    worst = order[:n]
    typical = order[len(order) // 2 - n // 2 : len(order) // 2 - n // 2 + n]
    grid = overlay_grid(test["images"], test["labels"], pred, worst, typical, scores, params.combine_label)
    from PIL import Image

    with atomic_path(out / "predictions.png") as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _confusion_png(path: Path, total: np.ndarray, names: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = total / np.maximum(total.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(
                j,
                i,
                f"{norm[i, j]:.3f}",
                ha="center",
                va="center",
                color="black" if norm[i, j] < 0.6 else "white",
            )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("confusion (row-normalised)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def colourise(labels: np.ndarray, combine_label: bool) -> np.ndarray:
    return (COLOURS_3 if combine_label else COLOURS_4)[labels]


def overlay(image: np.ndarray, labels: np.ndarray, combine_label: bool, alpha: float = 0.45) -> np.ndarray:
    """(H, W) uint8 grey + labels -> (H, W, 3) uint8 with the classes tinted."""
    grey = np.repeat(image[..., None], 3, axis=-1).astype(np.float32)
    col = colourise(labels, combine_label).astype(np.float32)
    fg = (labels > 0)[..., None]
    return np.where(fg, (1 - alpha) * grey + alpha * col, grey).clip(0, 255).astype(np.uint8)


def overlay_grid(
    images, truth, pred, worst, typical, scores, combine_label: bool, scale: int = 2
) -> np.ndarray:
    """Rows of [image | truth overlay | prediction overlay] tiles: worst on the left, typical right."""
    tiles = []
    for a, b in zip(worst, typical):
        row = []
        for i in (a, b):
            row += [
                np.repeat(images[i][..., None], 3, axis=-1),
                overlay(images[i], truth[i], combine_label),
                overlay(images[i], pred[i], combine_label),
            ]
        tiles.append(
            np.concatenate([np.pad(t, ((1, 1), (1, 1), (0, 0)), constant_values=255) for t in row], 1)
        )
    grid = np.concatenate(tiles, 0)
    return np.kron(grid, np.ones((scale, scale, 1), np.uint8))


def log_to_mlflow(params: Params, metrics: dict, plots: Path, execution: dict[str, str]) -> str:
    """Log evaluation to the training run; a fresh run if evaluate params changed since training."""
    import mlflow

    from chromoseg.config import flatten
    from chromoseg.tracking import setup_mlflow

    setup_mlflow(params.mlflow)
    run_file = Path(params.train.out_dir) / "run.json"
    train_run = json.loads(run_file.read_text())["run_id"]
    client = mlflow.MlflowClient()
    logged = client.get_run(train_run).data.params
    flat = {k: str(v) for k, v in params.flat().items()}
    changed = {k for k, v in flat.items() if k.startswith("evaluate.") and logged.get(k, v) != v}
    if changed:
        # MLflow params are immutable: a re-evaluation with new settings gets its own run.
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


def load_any_model(model: str):
    """A pyfunc from an MLflow URI (`models:/name@alias`, `runs:/...`, a model folder) or a `model.pt`.

    Returns (predict function (N, H, W) uint8 -> output dict, combine_label, ab_order, the model's
    `infer.Predictor` or None for a pyfunc that is not chromoseg's).
    """
    p = Path(model)
    if p.suffix == ".pt" and p.is_file():
        from chromoseg.serving import checkpoint_ab_order, predictor_from_checkpoint, segment

        predictor, ck = predictor_from_checkpoint(p)

        def predict(images: np.ndarray) -> dict:
            return segment(predictor, images.astype(np.float32) / 255.0, bool(ck["combine_label"]))

        return predict, bool(ck["combine_label"]), checkpoint_ab_order(ck), predictor
    import mlflow

    from chromoseg.config import load_params
    from chromoseg.tracking import setup_mlflow

    if "MLFLOW_TRACKING_URI" not in os.environ and Path("params.yaml").is_file():
        setup_mlflow(load_params().mlflow)
    try:
        pyfunc = mlflow.pyfunc.load_model(model)
    except Exception as exc:
        raise FileNotFoundError(
            f"cannot load model {model!r} ({type(exc).__name__}: {str(exc)[:200]}); give a registered "
            f"model URI such as models:/chromoseg-unet@champion (tracking store "
            f"{mlflow.get_tracking_uri()}), a runs:/ URI, or a models/model.pt file"
        ) from exc
    inner = pyfunc.unwrap_python_model()
    predictor = getattr(inner, "predictor", None)
    return pyfunc.predict, bool(inner.combine_label), getattr(inner, "ab_order", "area"), predictor


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
    labelme_dir: str | Path, model: str, out: str | Path, width_from: str = "labels"
) -> dict:
    """Score any model on a folder of labelme-annotated real images; same keys as metrics/eval.json.

    `width_from`: each image is rescaled by its polygons' width (`labels`) or by the width measured
    on the grey image (`image`), as `chromoseg predict --scale auto` does with unlabelled images.
    """
    from chromoseg.data.labelme import load_labelme_dir

    images, truth4, scales, names = load_labelme_dir(labelme_dir, width_from=width_from)
    predict, combine_label, ab_order, predictor = load_any_model(model)
    separation = getattr(predictor, "separation", "geometry")
    res = predict(images)
    metrics = score_output(res, truth4, ab_order, combine_label, combine_label, separation)
    metrics.update(
        {
            "tta": getattr(predictor, "tta", False),
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
