"""Data-parallel training: `torchrun --nproc_per_node 2 -m chromoseg.cli train` (gloo on CPU).

Both runs use the same global batch (8): one process with 8 images a step, two with 4 each. The
data stream is the same (every rank draws the seeded global batch and keeps its shard), so the best
validation dice must agree within 0.02; the difference left comes from per-rank batch norm (CPU has
no SyncBatchNorm), which changes the path of a short run. The run is long enough (800 samples) and
the validation set larger (32 images) for the dice to have settled, so the comparison is of
the quality reached, not of early noise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .conftest import run, tiny_params

TOLERANCE = 0.02


def test_two_processes_match_one(tiny_project: Path, tmp_path: Path):
    tiny_params(tiny_project, epochs=10, samples_per_epoch=80, batch_size=8, lr=0.001, num_threads=1)
    single = tiny_project
    multi = tmp_path / "ddp"
    shutil.copytree(single, multi)

    run(["chromoseg", "train"], single)
    run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "chromoseg.cli", "train"], multi)
    one = json.loads((single / "metrics/train.json").read_text())
    two = json.loads((multi / "metrics/train.json").read_text())
    print(f"DDP: 1 process best val dice {one['best_val_dice']:.4f}, 2 processes {two['best_val_dice']:.4f}")
    assert abs(one["best_val_dice"] - two["best_val_dice"]) < TOLERANCE, (one, two)

    # Rank 0 alone wrote the outputs and logged one finished MLflow run with world_size 2.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{multi / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("chromoseg").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].data.tags["exec.world_size"] == "2"
    ck = torch.load(multi / "models/model.pt", weights_only=False)
    assert not any(k.startswith("module.") for k in ck["state_dict"])  # the plain module, not DDP's
    run(["chromoseg", "evaluate"], multi)  # the DDP-trained model evaluates like any other
