"""Offered load for local measurements: run a load generator against a URL, return a typed :class:`LoadResult`.

An adapter (it runs processes), used by ``leanserve demo`` and ``benchmarks/planner_accuracy.py``; they
decide what to load and at what rate, this module only offers it and reads the answer. Two generators:

- hack/loadgen (Go standard library only), built into ``.cache/loadgen-<hash of its sources>`` on first use
  when Go is here: Poisson arrivals, what the planner models, with latency from each scheduled arrival (no
  coordinated omission). It sends one body, or a sequence of bodies (``bodies``, one JSON document per line,
  request i sending line i mod N, as :mod:`leanserve.campaign` writes them). It prints one JSON object
  (:func:`parse_loadgen`).
- hey (``apt-get install hey``) where Go is missing: rate-limited workers, which send in bursts (their
  tickers run in step), so its percentiles run high; one body only. It prints a text report
  (:func:`parse_hey`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from leanserve_serving.local import CPUs, pinned

#: Where hack/loadgen is built (relative to the working directory, like the demo's other outputs).
LOADGEN_DIR = Path(".cache")
#: hack/loadgen's sources.
LOADGEN_SOURCE = Path(__file__).resolve().parents[2] / "hack" / "loadgen"


@dataclass(frozen=True)
class LoadResult:
    """What came back from offering ``offered_rps`` requests per second for a while."""

    offered_rps: float
    achieved_rps: float
    """hack/loadgen: successful responses per second; hey: its Requests/sec line."""
    p50_ms: float
    p95_ms: float
    p99_ms: float
    """Percentiles are NaN where the generator did not report them (hey skips a level on short runs)."""
    errors: float
    """The fraction of requests not answered with 200 (a transport error, such as a refused connection, counts)."""


class GoBuildError(RuntimeError):
    """A Go program could not be built here: Go is missing, or ``go build`` failed (its output is the message)."""


def go_binary_path(source: Path, name: str, cache: Path) -> Path:
    """Where the Go program in ``source`` is built: ``cache/<name>-<hash of its sources>`` (its .go files but the
    tests, go.mod, and go.sum where it has one), so a binary built from older sources is never taken for the
    current one."""
    digest = hashlib.sha256()
    for path in sorted([*source.glob("*.go"), source / "go.mod", source / "go.sum"]):
        if path.is_file() and not path.name.endswith("_test.go"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return cache / f"{name}-{digest.hexdigest()[:16]}"


def build_go_binary(source: Path, binary: Path) -> None:
    """``go build`` the program in ``source`` into ``binary``, through a partial file renamed at the end (two
    concurrent builds never meet, and a failed one leaves nothing); :class:`GoBuildError` saying why."""
    go = shutil.which("go")
    if go is None:
        raise GoBuildError("`go` is not on PATH")
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f"{binary.name}.{os.getpid()}.partial").resolve()  # go build runs in ``source``
    try:
        built = subprocess.run([go, "build", "-o", str(partial), "."], cwd=source, capture_output=True, text=True)
        if built.returncode != 0:
            raise GoBuildError(built.stderr.strip() or f"go build exited with {built.returncode}")
        partial.replace(binary)
    finally:
        partial.unlink(missing_ok=True)


def loadgen_binary(source: Path = LOADGEN_SOURCE) -> Path:
    """Where hack/loadgen built from ``source`` lives (:func:`go_binary_path`): a binary built from older
    sources (one without ``-bodies``, say) is never taken for the current one."""
    return go_binary_path(source, "loadgen", LOADGEN_DIR)


def poisson_loadgen() -> Path | None:
    """hack/loadgen (open-loop Poisson arrivals, Go standard library only), built on first use when Go is here."""
    if not LOADGEN_SOURCE.is_dir():
        return None
    binary = loadgen_binary()
    if not binary.exists():
        with contextlib.suppress(GoBuildError):  # no Go, or no build: hey instead
            build_go_binary(LOADGEN_SOURCE, binary)
    return binary if binary.exists() else None


def load_test(
    url: str, body: Path | None, rate: float, seconds: float, cpus: CPUs = None, *, bodies: Path | None = None
) -> LoadResult:
    """Offer ``rate`` req/s to ``url`` for ``seconds`` (the generator on ``cpus``); report what came back.

    Every request sends ``body``; or, with ``bodies`` (``body`` None), request i sends line i mod N of that
    file (one JSON document per line: :func:`leanserve.campaign.write_bodies`), so a campaign's lengths and
    repeats reach the server as they would. hack/loadgen where it can be had, else hey (``body`` only);
    RuntimeError when neither is here, ValueError unless exactly one of ``body`` and ``bodies`` is given.
    """
    if (body is None) == (bodies is None):
        raise ValueError(f"give body or bodies, not both nor neither (body={body}, bodies={bodies})")
    loadgen = poisson_loadgen()
    if loadgen is not None:
        payload = ["-body", str(body)] if bodies is None else ["-bodies", str(bodies)]
        argv = [str(loadgen), "-url", url, *payload, "-rate", f"{rate:.3f}", "-duration", f"{seconds:g}s"]
        out = subprocess.run(argv, capture_output=True, text=True, check=True, **pinned(cpus)).stdout
        return parse_loadgen(out, offered_rps=rate)
    if body is None:
        raise RuntimeError(f"a sequence of bodies ({bodies}) needs hack/loadgen, so Go; hey sends one body only")
    exe = shutil.which("hey")
    if exe is None:
        raise RuntimeError("neither Go (for hack/loadgen) nor hey is installed (apt-get install hey)")
    argv = hey_argv(exe, url=url, body=body, rate=rate, seconds=seconds)
    out = subprocess.run(argv, capture_output=True, text=True, check=True, **pinned(cpus)).stdout
    return parse_hey(out, offered_rps=rate)


def hey_argv(exe: str, *, url: str, body: Path, rate: float, seconds: float) -> list[str]:
    """hey POSTing ``body`` at about ``rate`` req/s for ``seconds``: a worker per 10 req/s (1 to 64), each
    rate-limited to its share."""
    workers = max(1, min(64, int(rate // 10) or 1))
    return [
        exe,
        *("-z", f"{seconds:g}s", "-c", str(workers), "-q", f"{rate / workers:.3f}"),
        *("-m", "POST", "-T", "application/json", "-D", str(body)),
        url,
    ]


def parse_loadgen(out: str, *, offered_rps: float) -> LoadResult:
    """hack/loadgen's JSON line as a LoadResult."""
    r = json.loads(out)
    sent = r["sent"] or 1
    return LoadResult(
        offered_rps=offered_rps,
        achieved_rps=r["achieved_rps"],
        p50_ms=r["p50_ms"],
        p95_ms=r["p95_ms"],
        p99_ms=r["p99_ms"],
        errors=r["errors"] / sent,
    )


_REQUESTS_PER_SECOND = re.compile(r"Requests/sec:\s+([\d.]+)")
_STATUS_CODE = re.compile(r"\[(\d+)\]\s+(\d+) responses")
_ERROR_COUNT = re.compile(r"^\s*\[(\d+)\]", re.MULTILINE)


def parse_hey(out: str, *, offered_rps: float) -> LoadResult:
    """hey's text report (``Requests/sec``, ``Latency distribution``, ``Status code distribution``, ``Error
    distribution``) as a LoadResult. Requests that got no response (hey lists them under ``Error distribution``,
    by message) count as errors, as hack/loadgen counts them.

    ValueError when ``out`` has no ``Requests/sec`` line (not a hey report).
    """
    rps = _REQUESTS_PER_SECOND.search(out)
    if rps is None:
        raise ValueError(f"not a hey report (no Requests/sec line): {out[:200]!r}")

    def percentile_ms(p: int) -> float:
        m = re.search(rf"\s{p}% in ([\d.]+) secs", out)
        return float(m.group(1)) * 1000 if m else float("nan")

    responses, _, failures = out.partition("Error distribution:")
    codes = {int(code): int(n) for code, n in _STATUS_CODE.findall(responses)}
    unanswered = sum(int(n) for n in _ERROR_COUNT.findall(failures))
    total = sum(codes.values()) + unanswered or 1
    return LoadResult(
        offered_rps=offered_rps,
        achieved_rps=float(rps.group(1)),
        p50_ms=percentile_ms(50),
        p95_ms=percentile_ms(95),
        p99_ms=percentile_ms(99),
        errors=(total - codes.get(200, 0)) / total,
    )
