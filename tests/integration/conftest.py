"""Shared set-up for the opt-in integration tests (`make test-integration`, marker `integration`).

Each test works in a temp copy of the project (tracked and untracked, non-ignored files) with tiny
params, so nothing here touches the working tree, its MLflow store or its DVC cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from _project import RAW, ROOT, copy_project, project_env, run  # noqa: F401 - re-exported to the tests


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.integration)


def tiny_params(proj: Path, **train) -> None:
    """3 epochs of 40 images on a depth-3 U-Net unless overridden; 320 images, 32 for validation."""
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["synth"]["n_images"] = 320
    params["prepare"]["val_size"] = 32
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
