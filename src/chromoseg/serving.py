"""The registered model: an MLflow pyfunc with its own pre- and post-processing.

Input: grey images, (H, W) or (N, H, W), uint8 0..255 or float 0..1. Output per batch: `labels`
(N, H, W) in the model's label space, and the instance masks `mask_a`, `mask_b` (each chromosome
including the overlap) and `overlap`, as uint8 0/1.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
PACKAGE_DIR = Path(__file__).resolve().parent


def load_checkpoint(path: str | Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def predictor_from_checkpoint(path: str | Path, precision: str | None = None, backend: str = "auto"):
    """Build an `infer.Predictor` from a `models/model.pt` checkpoint."""
    from chromoseg.config import TrainConfig, _build
    from chromoseg.infer import Predictor
    from chromoseg.model import exec_plan

    ck = load_checkpoint(path)
    cfg = _build(TrainConfig, ck["train"], "train")
    plan = exec_plan(precision or cfg.precision, cfg.channels_last)
    return Predictor(ck["state_dict"], cfg, ck["n_classes"], plan, backend=backend), ck


def to_float_images(x: Any) -> np.ndarray:
    """Validate and convert user input to (N, H, W) float32 in [0, 1]. Raise ValueError with the fix."""
    if isinstance(x, dict) and len(x) == 1:
        # A named tensor signature hands the input over as {"images": array}.
        x = next(iter(x.values()))
    arr = np.asarray(x)
    if arr.dtype == object:
        raise ValueError("input must be numeric grey images, (H, W) or (N, H, W)")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"input has {arr.ndim} dimensions {arr.shape}; send (H, W) or (N, H, W) grey images")
    if arr.size == 0:
        raise ValueError(f"input is empty {arr.shape}; send at least one image")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"input dtype {arr.dtype} is not numeric")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("input contains NaN or infinite values")
    # Floats above 1 are taken as 0..255 grey values.
    return arr / 255.0 if arr.max() > 1.0 else arr


def postprocess(labels: np.ndarray, combine_label: bool, images: np.ndarray | None = None) -> dict:
    """Label maps -> dict of label map and instance masks (A, B include the overlap)."""
    from chromoseg.labels import labels_to_instances

    if combine_label:
        from chromoseg.separate import separate_instances

        labels4 = separate_instances(labels, images)
    else:
        labels4 = labels
    a, b, ov = labels_to_instances(labels4)
    return {
        "labels": labels.astype(np.uint8),
        "mask_a": a.astype(np.uint8),
        "mask_b": b.astype(np.uint8),
        "overlap": ov.astype(np.uint8),
    }


try:
    import mlflow.pyfunc

    _Base = mlflow.pyfunc.PythonModel
except ImportError:  # pragma: no cover
    _Base = object


class ChromosegModel(_Base):
    """MLflow pyfunc wrapper around `infer.Predictor`."""

    def load_context(self, context) -> None:
        self.predictor, ck = predictor_from_checkpoint(context.artifacts[MODEL_ARTIFACT])
        self.combine_label = bool(ck["combine_label"])

    def predict(self, context, model_input, params: dict | None = None) -> dict:
        from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

        try:
            images = to_float_images(model_input)
        except ValueError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
        labels = self.predictor.predict_labels(images)
        return postprocess(labels, self.combine_label, images)


def log_pyfunc_model(model_path: str | Path, params, plan, example: np.ndarray | None = None):
    """Log the checkpoint as a pyfunc model (with signature and input example) to the active run."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    if example is None:
        example = np.zeros((1, 88, 88), np.uint8)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1), name="images")]),
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.uint8), (-1, -1, -1), name=n)
                for n in ("labels", "mask_a", "mask_b", "overlap")
            ]
        ),
    )
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=ChromosegModel(),
        artifacts={MODEL_ARTIFACT: str(model_path)},
        code_paths=[str(PACKAGE_DIR)],
        signature=signature,
        input_example=example,
        pip_requirements=_requirements(),
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    pkgs = ("torch", "segmentation-models-pytorch", "timm", "numpy", "mlflow", "scipy", "scikit-image",
            "pyyaml", "pillow", "onnxruntime", "onnx")  # fmt: skip
    out = []
    for p in pkgs:
        try:
            out.append(f"{p}=={version(p)}")
        except Exception:
            continue
    return out
