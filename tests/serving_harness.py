"""Real processes for the serving tests: redis-server, the model server and the sidecar, on loopback."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson

from leanserve.local_stack import free_port, wait_ready
from leanserve_serving.local import cli_flags


@dataclass
class Process:
    """A server process with its port; stopped by :meth:`stop` (SIGKILL with ``kill=True``)."""

    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    log: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_path: str | None = "/v2/health/live") -> Process:
        out = self.log.open("ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT)
        if ready_path is not None:
            wait_ready(self.url + ready_path, self.proc, timeout=30)
        return self

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            self.proc.wait(timeout=10)


def redis_process(log_dir: Path) -> Process:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed: run `make test`, which installs it (Debian redis-server)")
    port = free_port()
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    return Process(argv, port, log=log_dir / f"redis-{port}.log")


def start_redis(log_dir: Path) -> Process:
    redis = redis_process(log_dir).start(ready_path=None)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", redis.port)) == 0:
                return redis
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def model_server(model: Path, name: str, log_dir: Path, port: int | None = None, **env: str) -> Process:
    port = port or free_port()
    flags = cli_flags(model=model, name=name, host="127.0.0.1", port=port)
    argv = [sys.executable, "-m", "leanserve_serving.model_server", *flags]
    return Process(argv, port, env={"LEANSERVE_THREADS": "1", **env}, log=log_dir / f"model-{name}-{port}.log")


def sidecar(upstream: str, log_dir: Path, **settings: Any) -> Process:
    """A sidecar configured through LEANSERVE_* environment variables (as in a pod)."""
    port = free_port()
    env = {f"LEANSERVE_{k.upper()}": (",".join(v) if isinstance(v, list) else str(v)) for k, v in settings.items()}
    env.update(LEANSERVE_UPSTREAM=upstream, LEANSERVE_HOST="127.0.0.1", LEANSERVE_PORT=str(port))
    env.setdefault("LEANSERVE_HEALTH_INTERVAL_S", "0.2")
    argv = [sys.executable, "-m", "leanserve_serving.sidecar"]
    return Process(argv, port, env=env, log=log_dir / f"sidecar-{port}.log")


def post(url: str, body: Any, timeout: float = 10) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POST JSON (or raw bytes); returns status, decoded body and headers."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, orjson.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, orjson.loads(raw) if raw else {}, dict(exc.headers)


def get(url: str, timeout: float = 10) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, orjson.loads(raw) if resp.headers.get_content_type() == "application/json" else raw
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read() or b"{}")


def metric(url: str, name: str, labels: str = "") -> float:
    """The value of one Prometheus sample (``name{labels}``) from a /metrics endpoint; 0 when absent."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def mlp_request(values: list[float], **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": values}], **extra}


def text_request(text: str) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}


@contextlib.contextmanager
def frozen(process: Process) -> Iterator[None]:
    """``process`` stopped (SIGSTOP) for the block, as a model server stuck (a long pause, a throttled CPU):
    it keeps its sockets, so calls connect and then wait; resumed (SIGCONT) afterwards, whatever happened."""
    assert process.proc is not None
    process.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.proc.send_signal(signal.SIGCONT)


def until(check: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    """Poll ``check`` until it holds; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout:g} s")
        time.sleep(0.05)


def post_raw(url: str, body: bytes, headers: dict[str, str], timeout: float = 10) -> tuple[int, bytes, dict[str, str]]:
    """POST ``body`` as it is with ``headers`` (binary tensor data); returns status, raw body and headers."""
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


@contextlib.contextmanager
def serving_in_thread(server: ThreadingHTTPServer) -> Iterator[str]:
    """``server`` (a real HTTP server on a loopback port) serving from a daemon thread for the block; yields its
    base URL, then shuts it down and closes its socket."""
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
