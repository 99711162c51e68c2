"""Dataset statistics and card: synthetic data must look like the real-dev images."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from _project import REAL_DEV
from chromoseg.cli import app
from chromoseg.config import SynthConfig
from chromoseg.data.labelme import load_labelme_dir
from chromoseg.data.report import MATCHED_KEYS, STAT_KEYS, compare_stats, dataset_stats
from chromoseg.data.synth import generate, synthesize_to_file

needs_real = pytest.mark.skipif(not REAL_DEV.is_dir(), reason="real-dev files not available")
CFG = SynthConfig(workers=1)


def _rod_images(grey: int) -> tuple[np.ndarray, np.ndarray]:
    """Two 40 x 12 px rods (A and B, crossing) of the given grey on black."""
    lab = np.zeros((1, 88, 88), np.uint8)
    lab[0, 20:60, 20:32] = 1
    lab[0, 40:52, 10:70] |= 2
    img = np.where(lab > 0, grey, 0).astype(np.uint8)
    img[lab == 3] = 2 * grey
    return img, lab


def test_stats_on_a_hand_made_image():
    img, lab = _rod_images(60)
    s = dataset_stats(img, lab)
    assert set(s) == set(STAT_KEYS)
    assert abs(s["width_px"] - 12) <= 1.0
    assert s["single_grey"] == pytest.approx(60)
    assert s["overlap_ratio"] == pytest.approx(2.0)
    assert s["background_grey"] == 0 and s["contrast"] == pytest.approx(60)
    assert s["edge_fraction"] == pytest.approx(1.0)  # hard edges: boundary as bright as interior
    assert s["blur_px"] < 2.5 and s["texture"] == 0 and s["overlap_images"] == 1


@needs_real
def test_synthetic_matches_real_dev_within_15_percent():
    ri, rl, _, _ = load_labelme_dir(REAL_DEV)
    si, sl, _ = generate(CFG, n=300)
    real, synth = dataset_stats(ri, rl), dataset_stats(si, sl)
    rel = compare_stats(synth, real)
    bad = {k: f"synth {synth[k]:.3f} real {real[k]:.3f}" for k in MATCHED_KEYS if abs(rel[k]) > 0.15}
    assert not bad, bad


@needs_real
def test_report_cli_writes_card(tmp_path):
    raw = synthesize_to_file(CFG, out=tmp_path / "s.h5", n=40)
    out = tmp_path / "reports"
    res = CliRunner().invoke(
        app, ["data", "report", "--raw", str(raw), "--real-dev", str(REAL_DEV), "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    card = (out / "dataset_card.md").read_text()
    assert "| width_px |" in card and "real-dev" in card
    for png in ("contact_sheet.png", "contact_sheet_real_dev.png", "class_frequencies.png"):
        assert (out / png).stat().st_size > 1000


def test_report_cli_missing_file_is_one_line_error(tmp_path):
    out = tmp_path / "reports"
    res = CliRunner().invoke(app, ["data", "report", "--raw", str(tmp_path / "none.h5"), "--out", str(out)])
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    assert not out.exists()  # nothing written for a dataset that is not there
