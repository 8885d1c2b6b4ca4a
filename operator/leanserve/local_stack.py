"""The serving stack as local processes, for people without a cluster (leanserve serve, leanserve demo)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from leanserve.planner.latency import Policy


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
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def serving_stack(
    model: Path, name: str, policy: Policy, port: int | None = None, redis_url: str = "", quiet: bool = True
) -> Iterator[str]:
    """A pod's two containers as local processes: the model server and, in front, the sidecar with
    ``policy``'s batching (and a cache when ``redis_url`` is set). Yields the infer URL; stops both after."""
    from leanserve_serving.model_server import cpu_limit

    model_port, front_port = free_port(), port or free_port()
    env = {**os.environ, "LEANSERVE_THREADS": str(cpu_limit()), "LEANSERVE_UPSTREAM_CONCURRENCY": "1",
           "LEANSERVE_REDIS_URL": redis_url}  # fmt: skip
    output = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} if quiet else {}
    procs = [subprocess.Popen([sys.executable, "-m", "leanserve_serving.model_server", "--model", str(model),
                               "--name", name, "--host", "127.0.0.1", "--port", str(model_port)], env=env, **output)]  # type: ignore[call-overload]  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{model_port}/v2/health/ready", procs[0])
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "leanserve_serving.sidecar", "--upstream", f"http://127.0.0.1:{model_port}",
             "--host", "127.0.0.1", "--port", str(front_port), "--max-batch-size", str(policy.max_batch),
             "--max-wait-ms", str(policy.max_wait_ms)], env=env, **output))  # type: ignore[call-overload]  # fmt: skip
        wait_ready(f"http://127.0.0.1:{front_port}/v2/health/ready", procs[1])
        yield f"http://127.0.0.1:{front_port}/v2/models/{name}/infer"
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
