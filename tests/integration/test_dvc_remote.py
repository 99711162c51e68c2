"""A DVC remote: push from one repository, `git clone` + `dvc pull` elsewhere, identical data, no rework.

The remote is a local folder (`dvc remote add -d local /tmp/...`); an S3/GCS/SSH remote behaves the
same way through `dvc remote add -d NAME s3://bucket/path` (see README).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .conftest import RAW, copy_project, project_env, run, tiny_params

GIT = ["git", "-c", "user.email=test@chromoseg", "-c", "user.name=chromoseg-test"]


def md5_tree(root: Path, rel_dirs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for d in rel_dirs:
        for p in sorted((root / d).rglob("*")):
            if p.is_file():
                out[p.relative_to(root).as_posix()] = hashlib.md5(p.read_bytes()).hexdigest()
    return out


def test_push_clone_pull_repro(tmp_path: Path):
    env = project_env()
    proj = copy_project(tmp_path / "origin")
    tiny_params(proj, epochs=1, samples_per_epoch=16)
    remote = tmp_path / "dvc-remote"
    run(["git", "init", "-q"], proj, env)
    if (proj / "data.dvc").exists():
        (proj / "data.dvc").unlink()  # the project's own pointer is for the full-size dataset
    run(["chromoseg", "synth", "--n", "80", "--out", RAW], proj, env)
    if not (proj / ".dvc").is_dir():
        run(["dvc", "init", "-q"], proj, env)
    run(["dvc", "add", "-q", "data/raw"], proj, env)
    run(["dvc", "remote", "add", "-d", "local", str(remote)], proj, env)
    run(["dvc", "repro"], proj, env)
    run(["dvc", "push"], proj, env)
    run(["git", "add", "-A"], proj, env)
    # Uncached (cache: false) plots belong in git, but the project's .gitignore lists /plots.
    run(["git", "add", "-f", "plots"], proj, env)
    run([*GIT, "commit", "-qm", "tiny pipeline"], proj, env)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(proj), str(clone)], tmp_path, env)
    assert not (clone / "data/raw").exists() and not (clone / "models").exists()
    run(["dvc", "pull"], clone, env)
    tracked = ("data/raw", "data/prepared", "models")
    assert md5_tree(clone, tracked) == md5_tree(proj, tracked)
    assert md5_tree(clone, tracked), "nothing was pulled"

    status = run(["dvc", "status"], clone, env)
    assert "up to date" in status, status
    out = run(["dvc", "repro"], clone, env)
    for stage in ("prepare", "train", "evaluate", "register"):
        assert f"Stage '{stage}' didn't change, skipping" in out, out
    assert "Running stage" not in out, out
