"""The serving pod's two containers as local processes (leanserve serve, leanserve demo, the bench's stack run)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leanserve_serving.cpus import cpu_limit

#: Batches in flight between the sidecar and the model server. One: the model server runs one batch at a
#: time on every core, so a second one in flight only waits there; the planner models this as one server.
UPSTREAM_CONCURRENCY = 1


def free_port() -> int:
    """A port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60) -> None:
    """Poll ``url`` until it answers; fail early, with the exit code, if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


CPUs = frozenset[int] | None


def split_cpus() -> tuple[CPUs, CPUs]:
    """(the serving processes' CPUs, the load generator's CPU) on a machine of two or more CPUs, else (None, None).

    A load generator on the cores it loads takes their CPU and depresses what it measures; in a cluster the
    clients are elsewhere. So local measurements give the client one CPU of its own and the pod the rest.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return frozenset(cpus[:-1]), frozenset(cpus[-1:])


def pinned(cpus: CPUs) -> dict[str, Any]:
    """Popen arguments that run a child on ``cpus`` only (nothing when None)."""
    if cpus is None:
        return {}
    return {"preexec_fn": lambda: os.sched_setaffinity(0, cpus)}


@contextlib.contextmanager
def running_on(cpus: CPUs) -> Iterator[None]:
    """Run this thread (and threads it starts) on ``cpus`` for the block; nothing when None."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _env(redis_url: str = "", cpus: CPUs = None) -> dict[str, str]:
    threads = len(cpus) if cpus else cpu_limit()
    return {
        **os.environ,
        "LEANSERVE_THREADS": str(threads),
        "LEANSERVE_UPSTREAM_CONCURRENCY": str(UPSTREAM_CONCURRENCY),
        "LEANSERVE_REDIS_URL": redis_url,
    }


def cli_flags(**flags: object) -> list[str]:
    """``--name value`` arguments of a command line, each keyword's underscores turned into dashes."""
    return [arg for name, value in flags.items() for arg in (f"--{name.replace('_', '-')}", str(value))]


def _start(argv: list[str], env: dict[str, str], quiet: bool, cpus: CPUs) -> subprocess.Popen[bytes]:
    output = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} if quiet else {}
    return subprocess.Popen(argv, env=env, **output, **pinned(cpus))  # type: ignore[call-overload]


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@dataclass
class ModelServerProcess:
    """A model server running as a local process."""

    proc: subprocess.Popen[bytes]
    url: str


@contextlib.contextmanager
def model_server(model: Path, name: str, quiet: bool = True, cpus: CPUs = None) -> Iterator[ModelServerProcess]:
    """The model server container as a local process on a free loopback port (on ``cpus``); stopped after."""
    port = free_port()
    flags = cli_flags(model=model, name=name, host="127.0.0.1", port=port)
    proc = _start([sys.executable, "-m", "leanserve_serving.model_server", *flags], _env(cpus=cpus), quiet, cpus)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc)
        yield ModelServerProcess(proc, f"http://127.0.0.1:{port}")
    finally:
        _stop([proc])


@contextlib.contextmanager
def sidecar(
    upstream: str,
    max_batch: int,
    max_wait_ms: float,
    port: int | None = None,
    redis_url: str = "",
    quiet: bool = True,
    cpus: CPUs = None,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The sidecar container as a local process in front of ``upstream``; yields it and its port."""
    port = port or free_port()
    flags = cli_flags(upstream=upstream, host="127.0.0.1", port=port, max_batch_size=max_batch, max_wait_ms=max_wait_ms)
    proc = _start([sys.executable, "-m", "leanserve_serving.sidecar", *flags], _env(redis_url, cpus), quiet, cpus)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc)
        yield proc, port
    finally:
        _stop([proc])


@contextlib.contextmanager
def serving_stack(
    model: Path,
    name: str,
    max_batch: int,
    max_wait_ms: float,
    port: int | None = None,
    redis_url: str = "",
    quiet: bool = True,
    cpus: CPUs = None,
) -> Iterator[str]:
    """A pod's two containers as local processes: the model server and, in front, the sidecar with this
    batching (and a cache when ``redis_url`` is set), both on ``cpus``. Yields the infer URL; stops both after."""
    with (
        model_server(model, name, quiet, cpus) as server,
        sidecar(server.url, max_batch, max_wait_ms, port, redis_url, quiet, cpus) as (_, front),
    ):
        yield f"http://127.0.0.1:{front}/v2/models/{name}/infer"
