"""`chromoseg bench-serve`: latency and throughput of the real scoring server.

Starts ``mlflow models serve -m URI --env-manager local`` on a free loopback port (127.0.0.1 only)
in its own process group, waits for ``/ping``, then times sequential requests: one 88 x 88 image and
a batch of 32 (p50 / p95 latency, requests/s and images/s). The server and its uvicorn workers are
always stopped (SIGTERM to the process group, then SIGKILL) and checked to be gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The scoring server did not start or did not answer."""


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running `mlflow models serve` process group."""

    proc: subprocess.Popen
    url: str
    log_path: Path

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def start_server(model_uri: str, port: int | None = None, env: dict[str, str] | None = None) -> Server:
    """Start the scoring server for `model_uri` on 127.0.0.1 in a new session (own process group)."""
    port = port or free_port()
    fd, log_name = tempfile.mkstemp(prefix="chromoseg-serve-", suffix=".log")
    cmd = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    full_env = {**os.environ, **(env or {})}
    # mlflow execs `uvicorn` through the shell: find it next to this interpreter even if the venv's
    # bin/ is not on PATH.
    bindir = str(Path(sys.executable).parent)
    full_env["PATH"] = bindir + os.pathsep + full_env.get("PATH", "")
    log.info("starting: %s", " ".join(cmd))
    try:
        proc = subprocess.Popen(
            cmd, stdout=fd, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
    finally:
        os.close(fd)
    return Server(proc, f"http://127.0.0.1:{port}", Path(log_name))


def wait_ready(server: Server, timeout: float = 120.0) -> float:
    """Poll /ping until it answers 200; return the seconds it took. Raise ServerError on exit/timeout."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if server.proc.poll() is not None:
            raise ServerError(
                f"mlflow models serve exited with code {server.proc.returncode}:\n{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(server.url + "/ping", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.25)
    raise ServerError(f"server at {server.url} not ready after {timeout:.0f} s:\n{server.log_tail()}")


def _group_pids(pgid: int) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(p.pid) == pgid:
                out.append(p.pid)
    return out


def stop_server(server: Server, grace: float = 10.0) -> list[int]:
    """SIGTERM the server's process group (mlflow, uvicorn and its workers), SIGKILL what remains.

    Returns the PIDs still alive afterwards (empty when all are gone)."""
    import psutil

    pgid = server.proc.pid  # start_new_session: the leader's PID is the group id
    try:
        tracked = {p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)}
    except psutil.Error:
        tracked = set()
    tracked |= set(_group_pids(pgid)) | {server.proc.pid}
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.proc.wait(timeout=grace)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(psutil.pid_exists(p) and _alive(p) for p in tracked):
        time.sleep(0.1)
    for pid in tracked:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.proc.wait(timeout=5)
    time.sleep(0.2)
    return sorted(p for p in tracked if _alive(p))


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@contextlib.contextmanager
def serving(model_uri: str, env: dict[str, str] | None = None, timeout: float = 120.0) -> Iterator[Server]:
    """Context manager: a ready server for `model_uri`, always stopped on exit."""
    server = start_server(model_uri, env=env)
    try:
        startup = wait_ready(server, timeout)
        log.info("server ready at %s after %.1f s", server.url, startup)
        yield server
    finally:
        left = stop_server(server)
        if left:
            log.warning("processes still alive after stopping the server: %s", left)
        server.log_path.unlink(missing_ok=True)


def post(url: str, payload: dict | bytes, timeout: float = 120.0) -> tuple[int, dict]:
    """POST JSON to `url`; (HTTP status, decoded JSON body) for success and error replies alike."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except json.JSONDecodeError:
            return exc.code, {"message": raw.decode(errors="replace")}


def _time_requests(url: str, body: bytes, n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        status, reply = post(url, body)
        if status != 200:
            raise ServerError(f"warm-up request failed with HTTP {status}: {str(reply)[-400:]}")
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        status, _ = post(url, body)
        times.append(time.perf_counter() - t0)
        if status != 200:
            raise ServerError(f"request failed with HTTP {status}")
    return times


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000.0, q))


def bench_serve(
    model_uri: str, n_single: int = 50, n_batch: int = 10, batch: int = 32, payload: str = "json"
) -> dict:
    """Start the server, time single-image and batch requests, stop it; return the figures."""
    from chromoseg.config import SynthConfig
    from chromoseg.data.synth import generate
    from chromoseg.predict import encode_png

    if payload not in ("json", "png"):
        raise ValueError(f"payload {payload!r} is not one of ['json', 'png']")
    images, _, _ = generate(SynthConfig(), n=batch)

    def body(x: np.ndarray) -> bytes:
        inputs = x.tolist() if payload == "json" else [encode_png(im) for im in x]
        return json.dumps({"inputs": inputs}).encode()

    one, many = body(images[:1]), body(images)
    t_start = time.perf_counter()
    with serving(model_uri) as server:
        startup = time.perf_counter() - t_start
        url = server.url + "/invocations"
        single = _time_requests(url, one, n_single, warmup=3)
        batched = _time_requests(url, many, n_batch, warmup=1)
    return {
        "model": model_uri,
        "payload": payload,
        "startup_s": round(startup, 1),
        "request_bytes_single": len(one),
        "request_bytes_batch": len(many),
        "single": {"n": n_single, "p50_ms": _pct(single, 50), "p95_ms": _pct(single, 95),
                   "requests_per_s": n_single / sum(single)},
        "batch": {"n": n_batch, "size": batch, "p50_ms": _pct(batched, 50), "p95_ms": _pct(batched, 95),
                  "requests_per_s": n_batch / sum(batched),
                  "images_per_s": n_batch * batch / sum(batched)},
        "cpu_count": os.cpu_count(),
        # Latency on a shared machine depends on the other jobs: record how busy it was.
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "threads": os.environ.get("OMP_NUM_THREADS", "all"),
    }  # fmt: skip


def format_table(res: dict) -> str:
    s, b = res["single"], res["batch"]
    batch_name = f"{b['size']} x 88x88"
    rows = [
        f"model {res['model']}  payload {res['payload']}  server start {res['startup_s']} s  "
        f"load average {res['load_average_1min_after']} on {res['cpu_count']} CPUs",
        f"{'request':<22}{'p50 ms':>10}{'p95 ms':>10}{'req/s':>9}{'img/s':>9}",
        f"{'1 x 88x88':<22}{s['p50_ms']:>10.1f}{s['p95_ms']:>10.1f}{s['requests_per_s']:>9.1f}"
        f"{s['requests_per_s']:>9.1f}",
        f"{batch_name:<22}{b['p50_ms']:>10.1f}{b['p95_ms']:>10.1f}{b['requests_per_s']:>9.2f}"
        f"{b['images_per_s']:>9.1f}",
    ]
    return "\n".join(rows)
