"""Shared set-up for the opt-in integration tests (`make test-integration`, marker `integration`).

Each test works in a temp copy of the project (tracked and untracked, non-ignored files) with tiny
params, so nothing here touches the working tree, its MLflow store or its DVC cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RAW = "data/raw/LowRes_13434_overlapping_pairs.h5"


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.integration)


def project_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "CHROMOSEG_ARTIFACT_ROOT"):
        env.pop(var, None)
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 900) -> str:
    res = subprocess.run(
        cmd, cwd=cwd, env=env or project_env(), capture_output=True, text=True, timeout=timeout
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{out[-4000:]}"
    return out


def copy_project(dst: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file() and not f.startswith(("data/", "tests/")):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    return dst


def tiny_params(proj: Path, **train) -> None:
    """3 epochs of 40 images on a depth-3 U-Net unless overridden."""
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["synth"]["n_images"] = 120
    params["prepare"]["val_size"] = 16
    params["train"].update(
        dict(epochs=3, samples_per_epoch=40, batch_size=8, encoder_depth=3, decoder_channels=[32, 16, 8])
        | train
    )
    params["evaluate"]["n_overlays"] = 2
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def tiny_project(tmp_path) -> Path:
    """A copy of the project with tiny params, its synthetic raw data and prepared splits."""
    proj = copy_project(tmp_path / "proj")
    tiny_params(proj)
    run(["chromoseg", "synth", "--out", RAW], proj)
    run(["chromoseg", "prepare"], proj)
    return proj
