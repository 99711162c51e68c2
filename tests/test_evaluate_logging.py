"""Where evaluation is logged in MLflow: the training run, a run of its own, or a clear error."""

from __future__ import annotations

import json

import mlflow
import pytest

from chromoseg.config import params_from_dict
from chromoseg.evaluate import log_to_mlflow


def _params(tmp_path, **infer):
    return params_from_dict(
        {
            "infer": infer,
            "mlflow": {
                "tracking_uri": f"sqlite:///{tmp_path}/mlruns.db",
                "artifact_root": str(tmp_path / "art"),
            },
            "train": {"out_dir": str(tmp_path / "models")},
        }
    )


def _train_run(params, tmp_path) -> str:
    from chromoseg.tracking import setup_mlflow

    setup_mlflow(params.mlflow)
    with mlflow.start_run() as run:
        mlflow.log_params(params.flat())
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "run.json").write_text(json.dumps({"run_id": run.info.run_id}))
    return run.info.run_id


def test_evaluation_joins_the_training_run_unless_inference_settings_changed(tmp_path) -> None:
    plots = tmp_path / "plots"
    plots.mkdir()
    trained = _params(tmp_path)
    train_run = _train_run(trained, tmp_path)
    assert log_to_mlflow(trained, {"dice": 0.9}, plots, {}) == train_run
    other = log_to_mlflow(_params(tmp_path, tta_views=1), {"dice": 0.8}, plots, {})
    assert other != train_run
    assert mlflow.MlflowClient().get_run(other).data.tags["chromoseg.train_run_id"] == train_run


def test_a_training_run_missing_from_the_store_is_a_clear_error(tmp_path) -> None:
    params = _params(tmp_path)
    _train_run(params, tmp_path)
    (tmp_path / "models" / "run.json").write_text(json.dumps({"run_id": "0" * 32}))
    with pytest.raises(FileNotFoundError, match=r"dvc repro -f train"):
        log_to_mlflow(params, {"dice": 0.9}, tmp_path, {})
