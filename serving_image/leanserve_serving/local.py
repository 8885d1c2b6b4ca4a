"""The serving pod's two containers as local processes (leanserve serve, leanserve demo, the bench's stack run)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each, then wait up to 10 s each before SIGKILL: a process that ignores the signal never hangs us."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _log(message: str) -> None:
    print(f"leanserve: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Supervision:
    """How a supervised model server is restarted when it exits unexpectedly (as a kubelet restarts a container).

    The first restart waits ``first_backoff_s``, each quick failure after it twice as long, up to
    ``max_backoff_s``; a run of ``quick_s`` or more resets both. After ``max_quick_failures`` quick failures
    in a row it gives up: ``on_give_up`` gets the reason, and the sidecar answers 503 until someone acts.
    """

    first_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    quick_s: float = 30.0
    max_quick_failures: int = 5
    log: Callable[[str], None] = _log
    on_give_up: Callable[[str], None] = lambda _reason: None


def _exit_status(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with {returncode}"


class _Supervisor(threading.Thread):
    """Watches a model server process and restarts it, on the same port, when it exits before ``stop``."""

    def __init__(self, server: ModelServerProcess, restart: Callable[[], subprocess.Popen[bytes]], how: Supervision):
        super().__init__(name="model-server-supervisor", daemon=True)
        self.server, self.restart, self.how = server, restart, how
        self.stopping = threading.Event()
        self.lock = threading.Lock()  # held while a process is started, so stop never misses one

    def run(self) -> None:
        how, quick, backoff, started = self.how, 0, self.how.first_backoff_s, time.monotonic()
        while not self.stopping.wait(0.05):
            proc = self.server.proc
            if proc.poll() is None:
                continue
            if time.monotonic() - started >= how.quick_s:
                quick, backoff = 0, how.first_backoff_s
            if proc.returncode in (0, -signal.SIGINT, -signal.SIGTERM) and self.stopping.wait(how.first_backoff_s):
                return  # a stop asked of the whole process group (Ctrl-C) reaches this process a moment later
            quick += 1
            status = _exit_status(proc.returncode)
            if quick > how.max_quick_failures:
                reason = f"the model server {status}; gave up after {how.max_quick_failures} restarts in a row failed"
                reason += f" within {how.quick_s:.0f} s"
                how.log(reason)
                how.on_give_up(reason)
                return
            how.log(f"the model server {status}; restarting it in {backoff:.1f} s (restart {quick})")
            if self.stopping.wait(backoff):
                return
            with self.lock:
                if self.stopping.is_set():
                    return
                self.server.proc, started = self.restart(), time.monotonic()
            backoff = min(backoff * 2, how.max_backoff_s)
            try:
                wait_ready(f"{self.server.url}/v2/health/ready", self.server.proc)
                how.log(f"the model server is back (pid {self.server.proc.pid})")
            except RuntimeError:
                pass  # it exited again: the next turn counts it

    def stop(self) -> None:
        """Restart nothing more; returns once no restart is under way."""
        self.stopping.set()
        with self.lock:
            pass


@dataclass
class ModelServerProcess:
    """A model server running as a local process (a supervised one's ``proc`` changes at each restart)."""

    proc: subprocess.Popen[bytes]
    url: str
    supervisor: _Supervisor | None = field(default=None, repr=False)

    def stop_supervising(self) -> None:
        """Let the process exit for good from now on (before stopping the stack, so Ctrl-C restarts nothing)."""
        if self.supervisor is not None:
            self.supervisor.stop()


@contextlib.contextmanager
def model_server(
    model: Path, name: str, quiet: bool = True, cpus: CPUs = None, supervision: Supervision | None = None
) -> Iterator[ModelServerProcess]:
    """The model server container as a local process on a free loopback port (on ``cpus``); stopped after.

    With ``supervision``, it is restarted on the same port whenever it exits before the block ends."""
    port = free_port()
    flags = cli_flags(model=model, name=name, host="127.0.0.1", port=port)

    def start() -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "leanserve_serving.model_server", *flags]
        return _start(argv, _env(cpus=cpus), quiet, cpus)

    server = ModelServerProcess(start(), f"http://127.0.0.1:{port}")
    try:
        wait_ready(f"{server.url}/v2/health/ready", server.proc)
        if supervision is not None:
            server.supervisor = _Supervisor(server, start, supervision)
            server.supervisor.start()
        yield server
    finally:
        server.stop_supervising()
        stop_processes([server.proc])
        if server.supervisor is not None:
            server.supervisor.join()


@contextlib.contextmanager
def sidecar(
    upstream: str,
    max_batch: int,
    max_wait_ms: float,
    port: int | None = None,
    redis_url: str = "",
    quiet: bool = True,
    cpus: CPUs = None,
    pad_inputs: dict[str, float] | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The sidecar container as a local process in front of ``upstream``; yields it and its port.
    ``pad_inputs``: ragged batching (the sidecar's setting of that name)."""
    port = port or free_port()
    flags = cli_flags(upstream=upstream, host="127.0.0.1", port=port, max_batch_size=max_batch, max_wait_ms=max_wait_ms)
    if pad_inputs:
        flags += cli_flags(pad_inputs=",".join(f"{name}={value:g}" for name, value in pad_inputs.items()))
    proc = _start([sys.executable, "-m", "leanserve_serving.sidecar", *flags], _env(redis_url, cpus), quiet, cpus)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc)
        yield proc, port
    finally:
        stop_processes([proc])


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
    supervision: Supervision | None = None,
    pad_inputs: dict[str, float] | None = None,
) -> Iterator[str]:
    """A pod's two containers as local processes: the model server and, in front, the sidecar with this
    batching (and a cache when ``redis_url`` is set), both on ``cpus``. Yields the infer URL; stops both after.
    With ``supervision``, the model server is restarted when it exits (see :class:`Supervision`)."""
    with (
        model_server(model, name, quiet, cpus, supervision) as server,
        sidecar(server.url, max_batch, max_wait_ms, port, redis_url, quiet, cpus, pad_inputs) as (_, front),
    ):
        try:
            yield f"http://127.0.0.1:{front}/v2/models/{name}/infer"
        finally:
            server.stop_supervising()  # first: Ctrl-C reaches the children too, and their exit is no failure
