"""Shared fixtures: small real datasets made by the project's own generator."""

from __future__ import annotations

import os

import pytest

from _project import REAL_DEV

for var, val in (
    ("NO_ALBUMENTATIONS_UPDATE", "1"),
    ("MLFLOW_DISABLE_TELEMETRY", "true"),
    ("DVC_NO_ANALYTICS", "1"),
    ("HF_HUB_OFFLINE", "1"),
    ("GIT_PYTHON_REFRESH", "quiet"),
):
    os.environ.setdefault(var, val)


@pytest.fixture(scope="session")
def real_dev_dir() -> str:
    path = str(REAL_DEV)
    if not os.path.isdir(path):
        pytest.skip(f"real-dev images not found at {path}")
    return path


@pytest.fixture(scope="session")
def small_synth():
    """(images, labels, source_ids) of 64 synthetic images from the default generator."""
    from chromoseg.config import SynthConfig
    from chromoseg.data.synth import generate

    return generate(SynthConfig(), n=64)
