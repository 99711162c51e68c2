"""The real `mlflow models serve` under load, on loopback only.

A tiny model is trained (1 epoch) and served on a free 127.0.0.1 port; 8 client threads send 2000+
requests, a mix of valid images (nested lists, batches, base64 PNG, DataFrame split) and invalid
ones (malformed JSON, wrong dims, strings, NaN, empty, too small, unknown keys). Every request must
get an answer (none lost), valid ones 200, invalid ones 4xx, zero 5xx, and the RSS of the server and
its uvicorn children must stay steady. Throughput and counts are printed and recorded as properties.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
N_REQUESTS = 2000
N_CLIENTS = 8
WARMUP = 200
# RSS may grow a little (allocator arenas, caches for a few input sizes), not with the request count.
MAX_RSS_GROWTH = 100 * 2**20


def _env(proj: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{proj / 'mlruns.db'}"
    env.pop("MLFLOW_RUN_ID", None)
    return env


def _run(args: list[str], proj: Path) -> None:
    res = subprocess.run(args, cwd=proj, env=_env(proj), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{args} failed:\n{res.stderr[-3000:]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> int:
    import psutil

    p = psutil.Process(pid)
    procs = [p, *p.children(recursive=True)]
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory) -> tuple[Path, str]:
    proj = tmp_path_factory.mktemp("serve")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"]["val_size"] = 8
    params["train"].update(
        epochs=1, samples_per_epoch=16, batch_size=8, encoder_depth=3, decoder_channels=[32, 16, 8]
    )
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["chromoseg", "synth", "--n", "60", "--out", "data/raw/LowRes_13434_overlapping_pairs.h5"], proj)
    _run(["chromoseg", "prepare"], proj)
    for stage in ("train", "evaluate", "register"):  # register builds the served model
        _run(["chromoseg", stage], proj)
    return proj, "models:/chromoseg-unet@champion"


@pytest.fixture(scope="module")
def server(model_uri):
    import requests

    proj, uri = model_uri
    port = free_port()
    log = open(proj / "serve.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "--host", "127.0.0.1",
         "--port", str(port)],
        cwd=proj, env=_env(proj), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, (proj / "serve.log").read_text()[-3000:]
        try:
            if requests.get(url + "/ping", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "server did not start in 180 s"
        time.sleep(0.5)
    yield url, proc.pid
    # Stop the server and its uvicorn workers: the whole process group, TERM, then KILL after 30 s.
    pgid = os.getpgid(proc.pid)
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _group_alive(pgid) and time.monotonic() < deadline:
        proc.poll()  # reap the leader so that it does not linger as a zombie
        time.sleep(0.2)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
        time.sleep(1)
    proc.wait(timeout=30)
    log.close()
    assert not _group_alive(pgid), "server processes left behind"


def _group_alive(pgid: int) -> bool:
    import psutil

    alive = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return bool(alive)


def _png_b64(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def request_mix(rng: np.random.Generator) -> list[tuple[str, str | bytes, bool]]:
    """(name, body, valid) payloads; one of each kind, drawn from in a fixed rotation."""
    from chromoseg.config import SynthConfig
    from chromoseg.data.synth import generate

    images = generate(SynthConfig(), n=2)[0]
    nan_img = images[0].astype(float)
    nan_img[10, 10] = float("nan")
    return [
        ("one image", json.dumps({"inputs": images[0].tolist()}), True),
        ("batch of 2", json.dumps({"inputs": images.tolist()}), True),
        ("float image", json.dumps({"inputs": (images[0] / 255.0).round(3).tolist()}), True),
        ("png", json.dumps({"inputs": [_png_b64(images[0])]}), True),
        ("dataframe png", json.dumps({"dataframe_split": {"columns": ["images"], "data": [[_png_b64(images[1])]]}}), True),
        ("malformed json", b'{"inputs": [[1, 2', False),
        ("1-D", json.dumps({"inputs": [1, 2, 3]}), False),
        ("strings", json.dumps({"inputs": ["hello", "world"]}), False),
        ("nan", json.dumps({"inputs": nan_img.tolist()}), False),
        ("empty", json.dumps({"inputs": []}), False),
        ("too small", json.dumps({"inputs": np.zeros((4, 4), np.uint8).tolist()}), False),
        ("unknown key", json.dumps({"foo": 1}), False),
        ("base64 garbage", json.dumps({"inputs": [base64.b64encode(rng.bytes(64)).decode()]}), False),
    ]  # fmt: skip


def test_served_model_under_load(server, record_property):
    import requests

    url, pid = server
    mix = request_mix(np.random.default_rng(0))
    headers = {"Content-Type": "application/json"}

    def hammer(n: int, offset: int, results: list) -> None:
        with requests.Session() as s:
            for i in range(n):
                name, body, valid = mix[(offset + i) % len(mix)]
                try:
                    r = s.post(url + "/invocations", data=body, headers=headers, timeout=120)
                    results.append((name, valid, r.status_code, r.text[:200]))
                except requests.RequestException as exc:
                    results.append((name, valid, None, repr(exc)[:200]))

    def load(total: int) -> tuple[list, float]:
        per = [[] for _ in range(N_CLIENTS)]
        threads = [
            threading.Thread(target=hammer, args=(total // N_CLIENTS, k * 7, per[k]))
            for k in range(N_CLIENTS)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [r for p in per for r in p], time.perf_counter() - t0

    load(WARMUP)
    rss_before = tree_rss(pid)
    results, seconds = load(N_REQUESTS)
    rss_after = tree_rss(pid)

    codes = Counter(code for _, _, code, _ in results)
    lost = [r for r in results if r[2] is None]
    server_errors = [r for r in results if r[2] is not None and r[2] >= 500]
    wrong_valid = [r for r in results if r[1] and r[2] != 200]
    wrong_invalid = [r for r in results if not r[1] and not (r[2] is not None and 400 <= r[2] < 500)]
    report = {
        "requests": len(results),
        "clients": N_CLIENTS,
        "seconds": round(seconds, 1),
        "req_per_s": round(len(results) / seconds, 1),
        "status_codes": {str(k): v for k, v in sorted(codes.items(), key=str)},
        "lost": len(lost),
        "5xx": len(server_errors),
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1),
    }
    print("load test:", json.dumps(report))
    for k, v in report.items():
        record_property(k, v)
    assert len(results) == N_REQUESTS
    assert not lost, lost[:5]
    assert not server_errors, server_errors[:5]
    assert not wrong_valid, wrong_valid[:5]
    assert not wrong_invalid, wrong_invalid[:5]
    assert rss_after - rss_before < MAX_RSS_GROWTH, report
