"""The served model as an MLflow artifact: `log_pyfunc_model` logs a checkpoint as the pyfunc of
`chromoseg.serving`, with its signature, an input example and pinned requirements.

Only registration logs it (`chromoseg.registry`), so training and evaluation never import the
HTTP-facing code, and the registered model carries the serving code of the day it was registered.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chromoseg.pipeline import OUTPUT_KEYS
from chromoseg.serving import MODEL_ARTIFACT, ChromosegModel

PACKAGE_DIR = Path(__file__).resolve().parent


def default_example() -> np.ndarray:
    """(1, 88, 88) uint8: one synthetic overlapping pair, the input example logged with the model."""
    from chromoseg.config import SynthConfig
    from chromoseg.data.synth import generate

    images, _, _ = generate(SynthConfig(), n=1)
    return np.ascontiguousarray(images[:1], dtype=np.uint8)


def model_signature():
    """Signature: any input (validated by the model itself), four uint8 (N, H, W) outputs, and one
    optional string param `scale` ("0.5", "auto"; "" for the server's default).

    The input spec is an unnamed object tensor on purpose: MLflow then passes arrays, PNG strings and
    DataFrames through unchanged, so the model answers bad input with its own short 400 message
    instead of MLflow's cast errors (which would turn floats into uint8 silently).
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(object), (-1,))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1), name=n) for n in OUTPUT_KEYS]),
        # "" = the server's default (CHROMOSEG_SCALE / model_config, else 1); "0.5"; "auto".
        params=ParamSchema([ParamSpec("scale", "string", "")]),
    )


def log_pyfunc_model(
    model_path: str | Path, model_config: dict | None = None, example: np.ndarray | None = None
):
    """Log the checkpoint as a pyfunc model (with signature and input example) to the active run.

    `model_config` holds the served model's defaults (`tta_views`, `precision`, `backend`, `scale`,
    `max_side`); a server can override them (`mlflow models serve` model_config, env vars).
    """
    import mlflow

    if example is None:
        example = default_example()
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=ChromosegModel(),
        artifacts={MODEL_ARTIFACT: str(model_path)},
        code_paths=[str(PACKAGE_DIR)],
        signature=model_signature(),
        input_example=example,
        pip_requirements=_requirements(),
        model_config=model_config or None,
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
