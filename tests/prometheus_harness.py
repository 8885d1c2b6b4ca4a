"""A real Prometheus for the tests: Debian's ``prometheus`` on a free loopback port, stopped and cleaned up after.

Two ways to have one, both context managers yielding a :class:`PrometheusServer`:

- :func:`scraping` starts a fresh Prometheus on an empty, temporary TSDB that scrapes the given static
  targets every ``scrape_interval_s`` (1 s by default, so that a test of a few seconds of load has samples);
- :func:`serving_tsdb` starts one on a TSDB directory that already exists, for example blocks that
  :func:`create_blocks` wrote from a synthetic history with ``promtool tsdb create-blocks-from openmetrics``.
  Its retention is long (``10y``) so that backfilled samples older than Prometheus's default 15 days are
  not deleted at start-up, and the directory is left in place afterwards (it belongs to the caller).

Each target carries its labels, as the in-cluster relabelling gives them (``namespace`` and
``inferencedeployment``): a target's labels go on every series scraped from it, ``up`` included.
The binaries come from the Debian ``prometheus`` package, which ``make test`` installs
(scripts/install-system-deps.sh); without them, starting one raises RuntimeError that says so.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from leanserve.local_stack import free_port, wait_ready
from leanserve.observer.local import ScrapeTarget, prometheus_config
from leanserve_serving.local import CPUs, pinned

#: How long a Prometheus may take to replay its WAL or open its blocks and answer /-/ready.
READY_TIMEOUT_S = 60


def binary(name: str) -> str:
    """The path of ``prometheus`` or ``promtool``; RuntimeError, with what to install, when it is missing."""
    exe = shutil.which(name)
    if exe is None:
        raise RuntimeError(f"{name} is not installed: run `make test`, which installs it (Debian package prometheus)")
    return exe


class PrometheusServer:
    """One ``prometheus`` process on ``127.0.0.1:port`` with its configuration, storage and log in files.

    :meth:`stop` then :meth:`start` restarts it on the same port and storage: what it had scraped before
    comes back from its write-ahead log (how a test shows an observer recover after Prometheus was down).
    """

    def __init__(
        self,
        workdir: Path,
        tsdb: Path,
        targets: Sequence[ScrapeTarget] = (),
        *,
        scrape_interval_s: float = 1.0,
        retention: str = "15d",
        cpus: CPUs = None,
    ) -> None:
        self.workdir = workdir
        self.tsdb = tsdb
        self.config = workdir / "prometheus.yml"
        self.log = workdir / "prometheus.log"
        self.port = free_port()
        self.retention = retention
        self.cpus = cpus
        self.proc: subprocess.Popen[bytes] | None = None
        self.config.write_text(yaml.safe_dump(prometheus_config(targets, scrape_interval_s), sort_keys=False))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [
            binary("prometheus"),
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.tsdb}",
            f"--storage.tsdb.retention.time={self.retention}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]

    def start(self) -> PrometheusServer:
        """Start it and wait until /-/ready answers; RuntimeError with the end of its log when it does not."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT, **pinned(self.cpus))
        try:
            wait_ready(self.url + "/-/ready", self.proc, timeout=READY_TIMEOUT_S)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"prometheus did not get ready: {exc}\n{self.log_tail()}") from None
        return self

    def stop(self) -> None:
        """SIGTERM (Prometheus closes its storage cleanly), SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@contextlib.contextmanager
def _workdir(workdir: Path | None) -> Iterator[Path]:
    """``workdir`` as it is, or a temporary folder removed afterwards."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="leanserve-prometheus-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def scraping(
    targets: Sequence[ScrapeTarget],
    *,
    scrape_interval_s: float = 1.0,
    workdir: Path | None = None,
    cpus: CPUs = None,
) -> Iterator[PrometheusServer]:
    """A fresh Prometheus (empty TSDB under ``workdir``, a temporary folder by default) scraping ``targets``.

    Ready when yielded; stopped afterwards, and a temporary folder removed with its storage.
    """
    with _workdir(workdir) as work:
        server = PrometheusServer(work, work / "data", targets, scrape_interval_s=scrape_interval_s, cpus=cpus)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def serving_tsdb(
    tsdb: Path,
    *,
    targets: Sequence[ScrapeTarget] = (),
    scrape_interval_s: float = 1.0,
    retention: str = "10y",
    workdir: Path | None = None,
    cpus: CPUs = None,
) -> Iterator[PrometheusServer]:
    """A Prometheus started on the existing TSDB directory ``tsdb`` (made by :func:`create_blocks`, say).

    It serves the blocks there (and scrapes ``targets``, none by default); ``retention`` is long so that
    nothing backfilled is deleted at start-up. Its configuration and log go to ``workdir`` (a temporary
    folder by default, removed afterwards); ``tsdb`` itself is left in place.
    """
    if not tsdb.is_dir():
        raise FileNotFoundError(f"tsdb: no TSDB directory at {tsdb}")
    with _workdir(workdir) as work:
        server = PrometheusServer(
            work, tsdb, targets, scrape_interval_s=scrape_interval_s, retention=retention, cpus=cpus
        )
        server.start()
        try:
            yield server
        finally:
            server.stop()


def create_blocks(openmetrics: Path, tsdb: Path) -> Path:
    """Backfill: ``promtool tsdb create-blocks-from openmetrics OPENMETRICS TSDB``; returns ``tsdb``.

    ``openmetrics`` is a text file in the OpenMetrics exposition format with a timestamp (seconds) on every
    sample and ``# EOF`` last. RuntimeError with promtool's output when it refuses the file.
    """
    tsdb.mkdir(parents=True, exist_ok=True)
    argv = [binary("promtool"), "tsdb", "create-blocks-from", "openmetrics", str(openmetrics), str(tsdb)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"promtool could not backfill {openmetrics}: {(done.stdout + done.stderr)[-2000:]}")
    return tsdb
