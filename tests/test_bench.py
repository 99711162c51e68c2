"""bench: the CLI's JSON contract on a tiny model, and the pure helpers. No timing assertions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from chromoseg import bench
from chromoseg.cli import app
from chromoseg.config import TrainConfig


def test_presets_build_valid_configs() -> None:
    for name in bench.PRESETS:
        cfg = bench.preset(name)
        assert len(cfg.decoder_channels) == cfg.encoder_depth
    with pytest.raises(ValueError, match="r18-d5"):
        bench.preset("nope")


def test_count_params_counts_what_the_forward_pass_uses() -> None:
    # The encoder stages that depth 3 never runs are deleted, so every weight is used.
    counts = bench.count_params(
        TrainConfig(
            encoder_depth=3, decoder_channels=(16, 8, 8), full_res_channels=0, global_context=0, ab_aux=False
        ),
        3,
    )
    assert 0 < counts["params_used"] == counts["params"]


def test_default_config_benches_the_network_as_trained(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    for combine, aux, expected in ((True, True, 4), (True, False, 3), (False, True, 4)):
        params["combine_label"], params["train"]["ab_aux"] = combine, aux
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params))
        cfg, n_classes = bench.default_config(str(path))
        # A combined model with the A/B head has 4 output channels: benched as a 4-class network.
        assert (n_classes, cfg.ab_aux) == (expected, False if combine and aux else aux)


def test_toy_batch_labels() -> None:
    images, labels = bench.toy_batch(np.random.default_rng(0), 3, 4, size=32)
    assert images.shape == labels.shape == (3, 32, 32)
    assert images.dtype == np.float32 and images.min() >= 0 and images.max() <= 1
    assert set(np.unique(labels)) <= {0, 1, 2, 3}


def test_cli_bench_quick_json(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    tiny = {"encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [8, 8, 8]}
    params.write_text(yaml.safe_dump({"train": tiny}))
    args = ["bench", "--quick", "--json", "--no-isolate", "--threads", "1", "--params", str(params)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    for key in ("train_speedup", "infer_speedup", "cpu", "naive", "auto", "config"):
        assert key in res
    assert res["config"]["decoder_channels"] == [8, 8, 8]
    for side in ("naive", "auto"):
        assert set(res[side]) == set(bench.PHASES)
        for phase in bench.PHASES:
            assert res[side][phase]["img_s"] > 0 and res[side][phase]["peak_rss_mb"] > 0
    assert res["naive"]["infer_b64"]["backend"] == "torch"
    assert "speed-up" in bench.format_compare(res)


def test_isolated_phase_runs_in_a_subprocess() -> None:
    cfg = TrainConfig(
        encoder_depth=3, decoder_channels=(8, 8, 8), full_res_channels=0, global_context=0, ab_aux=False
    )
    res = bench.run_isolated(cfg, 3, bench.NAIVE, "infer_b1", bench.Budget(infer_b1_images=2, warmup=1), 1)
    assert res["img_s"] > 0 and res["backend"] == "torch" and res["peak_rss_mb"] >= res["rss_start_mb"]
