"""Progress and timing reports: the epoch clock, stage wall times, and the execution plan's choice."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from chromoseg import cli
from chromoseg.model import exec_plan
from chromoseg.train import clock


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0:00"), (59.4, "0:59"), (61, "1:01"), (3599, "59:59"), (3661, "1:01:01")]
)
def test_clock(seconds: float, text: str) -> None:
    assert clock(seconds) == text


def test_channels_last_only_where_it_pays() -> None:
    # fp32 on a CPU: plain NCHW (channels_last trained no faster on AVX2-only CPUs); bf16: channels_last.
    assert not exec_plan("fp32", "auto", device="cpu").channels_last
    assert exec_plan("bf16", "auto", device="cpu").channels_last
    assert exec_plan("fp32", "on", device="cpu").channels_last
    assert not exec_plan("bf16", "off", device="cpu").channels_last


def test_stage_times_recorded_and_summarised(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    calls = []
    cli.run_stage("prepare", calls.append, "p1")
    cli.run_stage("train", calls.append, "p2")
    assert calls == ["p1", "p2"]
    times = json.loads(cli.STAGE_TIMES.read_text())
    assert set(times) == {"prepare", "train"} and all(t >= 0 for t in times.values())

    # A failing stage exits 2 with its message and leaves the recorded times as they were.
    def bad(_):
        raise FileNotFoundError("data/prepared/test.npz: missing")

    with pytest.raises(cli.typer.Exit) as exc:
        cli.run_stage("evaluate", bad, None)
    assert exc.value.exit_code == 2
    assert set(json.loads(cli.STAGE_TIMES.read_text())) == {"prepare", "train"}


def test_summary_prints_stage_times(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    for path, data in (
        (
            "metrics/eval.json",
            {
                "combine_label": True,
                "n_images": 3,
                "dice": 0.9,
                "iou_overlap": 0.8,
                "iou_per_class": {"background": 0.99},
            },
        ),
        ("metrics/register.json", {"verdict": "v1 becomes champion"}),
        (
            "metrics/train.json",
            {"train_seconds": 12.5, "best_val_dice": 0.9, "best_epoch": 0, "precision": "fp32"},
        ),
    ):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(json.dumps(data))
    cli.STAGE_TIMES.parent.mkdir(parents=True)
    cli.STAGE_TIMES.write_text(json.dumps({"prepare": 3.2, "train": 100.4, "evaluate": 20.0}))
    res = CliRunner().invoke(cli.app, ["summary"])
    assert res.exit_code == 0, res.output
    assert "stage wall times (last run)  prepare 3 s, train 100 s, evaluate 20 s" in res.output
