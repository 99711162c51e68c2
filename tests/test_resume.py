"""Interrupted training resumes exactly: SIGTERM and SIGKILL mid-run, then the stage again.

A tiny project (3 epochs of 40 images, a depth-3 U-Net) is prepared once; each scenario trains in its
own copy. After an interruption (taken once the first epoch checkpoint exists) the stage is run again
and must end with the same weights and, after `chromoseg evaluate`, the same metrics/eval.json bytes
as an uninterrupted run. Two uninterrupted runs must agree too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_RUN_ID", None)
    return env


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    res = subprocess.run(
        ["chromoseg", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, f"chromoseg {args} failed ({res.returncode}):\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"]["val_size"] = 16
    params["train"].update(
        epochs=3, samples_per_epoch=40, batch_size=8, encoder_depth=3, decoder_channels=[32, 16, 8]
    )
    params["evaluate"]["n_overlays"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["synth", "--n", "120", "--out", "data/raw/LowRes_13434_overlapping_pairs.h5"], root)
    run(["prepare"], root)
    return root


def clone(base: Path, dst: Path) -> Path:
    shutil.copytree(base, dst)  # copy2 keeps mtimes, which the resume fingerprint includes
    return dst


def outputs(proj: Path) -> tuple[bytes, dict[str, torch.Tensor]]:
    run(["evaluate"], proj)
    state = torch.load(proj / "models/model.pt", weights_only=False)["state_dict"]
    return (proj / "metrics/eval.json").read_bytes(), state


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    proj = clone(base, tmp_path_factory.mktemp("ref") / "p")
    run(["train"], proj)
    assert not list((proj / ".chromoseg/resume").glob("*.pt")), "checkpoint not removed after success"
    return proj


def assert_same_as_reference(proj: Path, reference: Path) -> None:
    eval_json, state = outputs(proj)
    # The reference is evaluated now, with the same code (evaluate's modules may change under a test).
    ref_json, ref_state = outputs(reference)
    assert same_weights(state, ref_state)
    assert eval_json == ref_json


def interrupt(proj: Path, sig: int) -> subprocess.CompletedProcess:
    """Start training, send `sig` as soon as the first epoch checkpoint exists, wait for the end."""
    ckpt_dir = proj / ".chromoseg/resume"
    proc = subprocess.Popen(
        ["chromoseg", "train"],
        cwd=proj,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not list(ckpt_dir.glob("train-*.pt")):
        assert proc.poll() is None, f"training ended before a checkpoint:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run_statuses(proj: Path) -> list[str]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlruns.db'}")
    exp = client.get_experiment_by_name("chromoseg")
    return [r.info.status for r in client.search_runs([exp.experiment_id])]


def test_sigterm_then_resume(base, reference, tmp_path):
    proj = clone(base, tmp_path / "p")
    res = interrupt(proj, signal.SIGTERM)
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert "training stopped by SIGTERM" in res.stderr and "run the stage again to resume" in res.stderr
    # Nothing written that DVC could take for a result; the MLflow run is KILLED, not left RUNNING.
    assert not (proj / "models").exists() and not (proj / "metrics/train.json").exists()
    assert not list(proj.rglob(".*.tmp"))
    assert _run_statuses(proj) == ["KILLED"]

    res = run(["train"], proj)
    assert "resuming from" in res.stderr
    assert _run_statuses(proj) == ["FINISHED"]  # the same run, reopened and finished
    assert_same_as_reference(proj, reference)


def test_sigkill_then_resume(base, reference, tmp_path):
    proj = clone(base, tmp_path / "p")
    res = interrupt(proj, signal.SIGKILL)
    assert res.returncode == -signal.SIGKILL
    assert not (proj / "models").exists()
    res = run(["train"], proj)
    assert "resuming from" in res.stderr
    assert_same_as_reference(proj, reference)


def test_same_params_same_result(base, reference, tmp_path):
    proj = clone(base, tmp_path / "p")
    run(["train"], proj)
    assert_same_as_reference(proj, reference)
