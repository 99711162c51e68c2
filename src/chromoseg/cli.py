"""The `chromoseg` command line: one subcommand per DVC stage, plus data, predict and bench tools.

Heavy imports (torch, mlflow) happen inside the commands so that `chromoseg --help` is fast.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from chromoseg.config import ConfigError, Params, load_params

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
import_app = typer.Typer(no_args_is_help=True, help="Import real data into data/raw/ in Pommier's format.")
data_app = typer.Typer(no_args_is_help=True, help="Dataset tools.")
app.add_typer(import_app, name="import")
app.add_typer(data_app, name="data")

log = logging.getLogger("chromoseg")

ParamsOpt = Annotated[Path, typer.Option("--params", help="Parameter file (YAML).")]

for _var, _val in (
    ("NO_ALBUMENTATIONS_UPDATE", "1"),
    ("MLFLOW_DISABLE_TELEMETRY", "true"),
    ("DVC_NO_ANALYTICS", "1"),
    ("HF_HUB_OFFLINE", "1"),
    ("GIT_PYTHON_REFRESH", "quiet"),
):
    os.environ.setdefault(_var, _val)


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("urllib3", "alembic", "git", "matplotlib", "PIL", "h5py", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    _setup_logging(verbose)


def _params(path: Path) -> Params:
    try:
        return load_params(path)
    except ConfigError as exc:
        fail(str(exc))


def fail(message: str, code: int = 2) -> typer.Exit:
    """Log a one-line error for the user and exit non-zero."""
    log.error(message)
    raise typer.Exit(code)


def run_guarded(fn, *args, **kwargs):
    """Run `fn`, turning expected user errors into a clean one-line message and exit code 2."""
    from chromoseg.data.io import DataError

    try:
        return fn(*args, **kwargs)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        fail(str(exc))


@app.command()
def synth(
    params: ParamsOpt = Path("params.yaml"),
    n: Annotated[int | None, typer.Option(help="Number of images (default: synth.n_images).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output HDF5 (default: synth.out).")] = None,
) -> None:
    """Generate the default synthetic dataset in Pommier's HDF5 format (deterministic)."""
    from chromoseg.data.synth import synthesize_to_file

    p = _params(params)
    run_guarded(synthesize_to_file, p.synth, out=out, n=n)


@app.command()
def prepare(params: ParamsOpt = Path("params.yaml")) -> None:
    """Stage 1: validate labels, combine classes, split into train/val/test."""
    from chromoseg.prepare import run_prepare

    run_guarded(run_prepare, _params(params))


@app.command()
def train(params: ParamsOpt = Path("params.yaml")) -> None:
    """Stage 2: train the U-Net, log the run and the model to MLflow."""
    from chromoseg.train import run_train

    run_guarded(run_train, _params(params))


@app.command()
def evaluate(params: ParamsOpt = Path("params.yaml")) -> None:
    """Stage 3: score the trained model on the test split; metrics, plots, overlays."""
    from chromoseg.evaluate import run_evaluate

    run_guarded(run_evaluate, _params(params))


@app.command()
def register(params: ParamsOpt = Path("params.yaml")) -> None:
    """Stage 4: register the model and move the champion alias if it wins on the test split."""
    from chromoseg.registry import run_register

    run_guarded(run_register, _params(params))


if __name__ == "__main__":  # pragma: no cover
    app()
