"""scripts/get_data.sh (`make data`): tracked data is used, restored or regenerated, never re-pointed.

Each case runs the real script in a temporary git + DVC project whose data.dvc records a 6-image
synthetic set (params.yaml `synth.n_images: 6`), and compares data.dvc and data/raw byte for byte.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from _project import RAW, ROOT, project_env, run

SCRIPT = "scripts/get_data.sh"


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Path:
    """A project whose data.dvc records data/raw as `chromoseg synth` makes it (6 images)."""
    root = tmp_path_factory.mktemp("tracked")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["synth"]["n_images"] = 6
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "scripts").mkdir()
    shutil.copy2(ROOT / SCRIPT, root / SCRIPT)
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    run(["chromoseg", "synth"], root)
    (root / "data.dvc").write_text("outs:\n- path: data/raw\n")
    run(["dvc", "commit", "-q", "-f", "data.dvc"], root)
    assert "md5:" in (root / "data.dvc").read_text()
    return root


@pytest.fixture
def project(tracked, tmp_path) -> Path:
    return Path(shutil.copytree(tracked, tmp_path / "proj", symlinks=True))


def _fresh_clone(root: Path) -> None:
    """No DVC cache, as after `git clone`: `dvc status` then says "not in cache" for any data/raw."""
    shutil.rmtree(root / ".dvc" / "cache", ignore_errors=True)


def get_data(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", SCRIPT], cwd=root, env=project_env(), capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("cache", ["fresh clone", "cached"])
@pytest.mark.parametrize("change", ["file added", "file changed"])
def test_changed_raw_data_is_reported_and_left_alone(project, cache, change):
    if cache == "fresh clone":
        _fresh_clone(project)
    if change == "file added":
        shutil.copy2(project / RAW, project / "data/raw/labelme_lab.h5")
    else:
        with open(project / RAW, "ab") as f:
            f.write(b"\0")
    dvc_file = (project / "data.dvc").read_bytes()
    before = _tree(project / "data")
    res = get_data(project)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "matches" not in res.stdout + res.stderr
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "data/raw differs from data.dvc" in lines[0]
    assert "dvc add data/raw" in lines[0]
    restore = "dvc checkout data/raw" if cache == "cached" else "make data"
    assert restore in lines[0]
    assert (project / "data.dvc").read_bytes() == dvc_file
    assert _tree(project / "data") == before


@pytest.mark.parametrize("cache", ["fresh clone", "cached"])
def test_matching_raw_data_is_used_as_it_is(project, cache):
    if cache == "fresh clone":
        _fresh_clone(project)
    dvc_file = (project / "data.dvc").read_bytes()
    before = _tree(project / "data")
    res = get_data(project)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "data/raw matches data.dvc" in res.stdout
    assert (project / "data.dvc").read_bytes() == dvc_file
    assert _tree(project / "data") == before
    # Stored in the cache, so `dvc checkout` can restore it from now on.
    status = subprocess.run(
        ["dvc", "status", "data.dvc"], cwd=project, env=project_env(), capture_output=True, text=True
    )
    assert "not in cache" not in status.stdout, status.stdout


def test_missing_raw_data_is_regenerated_to_the_recorded_hash(project):
    _fresh_clone(project)
    dvc_file = (project / "data.dvc").read_bytes()
    before = _tree(project / "data")
    shutil.rmtree(project / "data" / "raw")
    res = get_data(project)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "regenerated data matches data.dvc" in res.stdout
    assert (project / "data.dvc").read_bytes() == dvc_file
    assert _tree(project / "data") == before
