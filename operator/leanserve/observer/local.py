"""A Prometheus of its own for local runs (``leanserve demo``): Debian's ``prometheus`` scraping static targets.

In a cluster the operator reads the Prometheus that is there; on a machine without one, the demo starts
this: a ``prometheus`` process on a free loopback port with a generated configuration (one static group
per target, each with its own labels: ``namespace`` and ``inferencedeployment``, the labels the observer
selects by, as the in-cluster relabelling gives them), a short scrape interval (1 s: a load test of a few
seconds then has samples) and its storage in a temporary folder. It is a context manager: stopped, and
its storage removed, when the block ends, however it ends; it is never left running.

The binary comes from the Debian package ``prometheus`` (scripts/install-system-deps.sh installs it).
:func:`find_prometheus` says whether it is here; :func:`local_prometheus` raises
:class:`PrometheusNotStarted` with the end of its log when it does not start. This is an adapter (it
runs a process); the figures are read through :func:`leanserve.observer.observe_deployment` as in a
cluster, so what the demo prints is what the operator would write into status.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from leanserve.observer.queries import selector
from leanserve_serving.local import CPUs, free_port, pinned, wait_ready

#: How long a fresh Prometheus (empty storage) may take to answer /-/ready.
READY_TIMEOUT_S = 30.0
#: How long :meth:`LocalPrometheus.stop` waits after SIGTERM (Prometheus closes its storage) before SIGKILL.
STOP_TIMEOUT_S = 10.0


class PrometheusNotStarted(RuntimeError):  # noqa: N818  (what happened, as the demo reports it)
    """The local Prometheus did not start or did not get ready: ``reason`` says why in a line, ``log`` is the
    end of its log (empty when it never ran)."""

    def __init__(self, reason: str, log: str = "") -> None:
        super().__init__(f"{reason}\n{log}" if log else reason)
        self.reason = reason
        self.log = log


@dataclass(frozen=True)
class ScrapeTarget:
    """One static target: ``host:port``, the labels every series scraped from it carries, and its path."""

    address: str
    labels: Mapping[str, str] = field(default_factory=dict)
    metrics_path: str = "/metrics"


def find_prometheus() -> str | None:
    """The path of the ``prometheus`` binary, None when it is not installed."""
    return shutil.which("prometheus")


def prometheus_config(targets: Sequence[ScrapeTarget], scrape_interval_s: float = 1.0) -> dict[str, Any]:
    """The configuration (pure): one job per metrics path, one static group per target with its labels."""
    if not scrape_interval_s > 0:
        raise ValueError(f"scrape_interval_s: a positive number of seconds, got {scrape_interval_s}")
    interval = f"{max(1, round(scrape_interval_s * 1000))}ms"
    jobs: dict[str, list[dict[str, Any]]] = {}
    for target in targets:
        jobs.setdefault(target.metrics_path, []).append({"targets": [target.address], "labels": dict(target.labels)})
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {"job_name": f"leanserve-{i}", "metrics_path": path, "static_configs": groups}
            for i, (path, groups) in enumerate(sorted(jobs.items()))
        ],
    }


@dataclass
class LocalPrometheus:
    """A running local Prometheus: its URL, its process and its log file."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def last_scrape(self, namespace: str, name: str) -> float | None:
        """Epoch seconds of the last successful scrape of a target of ``namespace/name``; None when there is
        none yet or Prometheus does not answer (a wait, not an observation: the observer reads the figures)."""
        query = urllib.parse.urlencode({"query": f"max(timestamp(up{selector(namespace, name)} == 1))"})
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/query?{query}", timeout=2) as response:
                result = json.loads(response.read())["data"]["result"]
            return float(result[0]["value"][1]) if result else None
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return None

    def wait_for_scrape(self, namespace: str, name: str, after: float, timeout_s: float) -> bool:
        """Wait until a target of ``namespace/name`` was scraped, successfully, after ``after`` (epoch
        seconds); False when that did not happen within ``timeout_s`` or the process died."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            last = self.last_scrape(namespace, name)
            if last is not None and last > after:
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT_S`; nothing when it has already exited."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def local_prometheus(
    targets: Sequence[ScrapeTarget],
    *,
    scrape_interval_s: float = 1.0,
    binary: str | None = None,
    cpus: CPUs = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Iterator[LocalPrometheus]:
    """A fresh Prometheus scraping ``targets`` every ``scrape_interval_s``, ready when yielded.

    ``binary`` defaults to the installed ``prometheus``; ``cpus`` pins it (the demo puts it beside the load
    generator, off the serving processes' cores). Its configuration, log and storage live in a temporary
    folder, removed with it when the block ends. PrometheusNotStarted when the binary is missing, exits or
    does not answer /-/ready within ``ready_timeout_s``.
    """
    exe = binary or find_prometheus()
    if exe is None:
        raise PrometheusNotStarted("prometheus is not installed (Debian package prometheus)")
    with tempfile.TemporaryDirectory(prefix="leanserve-prometheus-") as tmp:
        work = Path(tmp)
        config = work / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(targets, scrape_interval_s), sort_keys=False))
        port = free_port()
        argv = [
            exe,
            f"--config.file={config}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        log = work / "prometheus.log"
        with log.open("wb") as out:
            try:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, **pinned(cpus))
            except OSError as exc:
                raise PrometheusNotStarted(f"{exe} could not be run: {exc}") from None
        server = LocalPrometheus(f"http://127.0.0.1:{port}", proc, log)
        try:
            try:
                wait_ready(f"{server.url}/-/ready", proc, timeout=ready_timeout_s)
            except RuntimeError:
                code = proc.poll()
                why = f"exited with {code}" if code is not None else f"not ready within {ready_timeout_s:g} s"
                raise PrometheusNotStarted(f"{exe} {why}", server.log_tail()) from None
            yield server
        finally:
            server.stop()
