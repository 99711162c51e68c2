"""Helpers for tests that run the real CLI / DVC in a temp copy of the project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAW = "data/raw/LowRes_13434_overlapping_pairs.h5"
# The real-dev images live beside the project (../shared), in every clone alike.
REAL_DEV = ROOT.parent / "shared" / "data" / "real-dev" / "labelme"


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


def copy_project(dst: Path, skip: tuple[str, ...] = ("data/", "tests/")) -> Path:
    """Copy the tracked and untracked non-ignored files (except `skip` prefixes) into `dst`."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file() and not f.startswith(skip):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    return dst
