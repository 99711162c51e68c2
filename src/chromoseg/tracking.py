"""MLflow set-up shared by every stage: one tracking store inside the project, absolute URIs.

`dvc exp run --temp/--queue` runs stages in a copy under `.dvc/tmp/exps/`; the project root is found
above that copy, so every experiment logs to the same store as `dvc repro` and `make ui`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from chromoseg.config import ConfigError, MlflowConfig

log = logging.getLogger(__name__)

_EXPS_MARKER = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep


def project_root(start: str | os.PathLike[str] | None = None) -> Path:
    """The project folder holding dvc.yaml, skipping DVC's temporary experiment copies."""
    here = Path(start or Path.cwd()).resolve()
    s = str(here) + os.sep
    if _EXPS_MARKER in s:
        return Path(s.split(_EXPS_MARKER)[0])
    for p in (here, *here.parents):
        if (p / "dvc.yaml").is_file() or (p / "params.yaml").is_file():
            return p
    return here


def tracking_uri(cfg: MlflowConfig, root: Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set, else params' URI with a relative sqlite path made absolute."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    uri = cfg.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str((root or project_root()) / uri[len(prefix) :])
    return uri


def artifact_location(cfg: MlflowConfig, root: Path | None = None) -> str:
    loc = os.environ.get("CHROMOSEG_ARTIFACT_ROOT", cfg.artifact_root)
    if "://" in loc:
        return loc
    p = Path(loc)
    if not p.is_absolute():
        p = (root or project_root()) / p
    return p.as_uri()


def launcher_run_id() -> str | None:
    """The run of an enclosing `mlflow run` (MLFLOW_RUN_ID), taken out of the environment.

    Pipeline runs become its children instead of writing into it: its parameters are strings in
    MLproject's spelling and would clash with the typed ones each stage logs.
    """
    global _LAUNCHER
    env = os.environ.pop("MLFLOW_RUN_ID", None)
    if env:
        _LAUNCHER = env
    return _LAUNCHER


_LAUNCHER: str | None = None


def setup_mlflow(cfg: MlflowConfig) -> str:
    """Point MLflow at the project's store and experiment; return the experiment id."""
    import mlflow

    launcher_run_id()

    root = project_root()
    uri = tracking_uri(cfg, root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            exp_id = client.create_experiment(cfg.experiment, artifact_location=artifact_location(cfg, root))
        else:
            exp_id = exp.experiment_id
        mlflow.set_experiment(experiment_id=exp_id)
    except Exception as exc:  # MlflowException, SQLAlchemy and connection errors alike
        raise ConfigError(
            f"MLflow tracking store {uri} cannot be used ({type(exc).__name__}: {_first_line(exc)}); "
            "set mlflow.tracking_uri in params.yaml (or MLFLOW_TRACKING_URI) to a reachable store, "
            "e.g. sqlite:///mlruns.db"
        ) from exc
    log.info("MLflow: %s, experiment %s (%s)", uri, cfg.experiment, exp_id)
    return exp_id


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to `limit` characters."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:limit]
