"""The serving stack as local processes, batching by a planner :class:`Policy`, for people without a cluster.

Used by ``leanserve serve``, ``leanserve demo`` and ``benchmarks/planner_accuracy.py``. Why a module of
its own rather than calls to ``leanserve_serving.local``: the processes belong to the serving image, which
never imports the operator, while the operator's callers hold the batching the planner chose as one value,
a :class:`Policy` (the plan's ``policy``); this is the one place where it becomes the sidecar's two
settings, so no caller unpacks it by hand. ``free_port`` and ``wait_ready`` are re-exported for the
serving tests' harness (tests/serving_harness.py).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from leanserve.planner.latency import Policy
from leanserve_serving import local
from leanserve_serving.local import Supervision, free_port, wait_ready

__all__ = ["Supervision", "free_port", "serving_stack", "wait_ready"]


@contextlib.contextmanager
def serving_stack(
    model: Path,
    name: str,
    policy: Policy,
    *,
    port: int | None = None,
    redis_url: str = "",
    quiet: bool = True,
    cpus: local.CPUs = None,
    supervision: Supervision | None = None,
    pad_inputs: dict[str, float] | None = None,
) -> Iterator[str]:
    """The model server and the sidecar with ``policy``'s batching (on ``cpus``); yields the infer URL.

    With ``supervision``, the model server is restarted when it exits, as a kubelet would."""
    with local.serving_stack(
        model,
        name,
        max_batch=policy.max_batch,
        max_wait_ms=policy.max_wait_ms,
        port=port,
        redis_url=redis_url,
        quiet=quiet,
        cpus=cpus,
        supervision=supervision,
        pad_inputs=pad_inputs,
    ) as url:
        yield url


@contextlib.contextmanager
def local_redis(cpus: local.CPUs = None, start_timeout_s: float = 10.0) -> Iterator[str | None]:
    """A redis-server of its own on a free loopback port, memory only; yields its URL, or None when Debian's
    ``redis-server`` is not installed or does not start (the caller goes on without a cache and says so)."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **local.pinned(cpus))  # type: ignore[call-overload]
    try:
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        else:
            yield None
            return
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        local.stop_processes([proc])
