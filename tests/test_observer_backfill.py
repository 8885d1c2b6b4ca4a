"""Every figure of the observer, from a real Prometheus serving an hour whose figures are known by construction.

An hour of two pods' sidecar metrics, scraped every 15 s, is written as OpenMetrics, turned into TSDB
blocks by ``promtool tsdb create-blocks-from openmetrics`` (tests/prometheus_harness.create_blocks) and
served by a real ``prometheus`` started on them (``serving_tsdb``). Each pod answers 5 requests/s with 200,
0.25 with 503 and 0.1 with 429; every request takes between 5 and 10 ms (one histogram bucket, so the
quantiles are the bucket's linear interpolation); the exact cache hits 1 in 5; batches hold 4 rows.
The counters grow linearly, so increase() over any window holds exactly what was put in, and the
observation must give each figure to float rounding: the PromQL is checked against the arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from leanserve.observer import Observation, ObserverUnavailable, observe_deployment
from tests.prometheus_harness import create_blocks, serving_tsdb

NAMESPACE, NAME = "shop", "sentiment"
PODS = ("sentiment-7d9f-a", "sentiment-7d9f-b")
SCRAPE_S, HOUR_S = 15, 3600
#: Per pod, per second.
RATES = {"200": 5.0, "503": 0.25, "429": 0.1}
HITS, MISSES = 1.0, 4.0
ROWS, BATCHES = 4.0, 1.0
BUCKETS = ("0.0025", "0.005", "0.01", "0.025", "+Inf")
#: Every request lands in (5 ms, 10 ms]: buckets below 0.01 stay at zero.
FIRST_FULL_BUCKET = "0.01"


def openmetrics_hour(end: datetime) -> str:
    """Two pods' counters, histogram and ``up``, one sample per scrape for the hour up to ``end``."""
    start = int(end.timestamp()) - HOUR_S
    stamps = range(start, int(end.timestamp()) + 1, SCRAPE_S)
    served = sum(RATES.values())

    def family(name: str, kind: str, series: list[tuple[str, str, float]]) -> list[str]:
        """``series``: (sample name, extra labels, value per second since start)."""
        lines = [f"# TYPE {name} {kind}"]
        for t in stamps:
            for pod in PODS:
                base = f'namespace="{NAMESPACE}",inferencedeployment="{NAME}",pod="{pod}"'
                for sample, labels, per_s in series:
                    value = 1.0 if kind == "gauge" else per_s * (t - start)
                    lines.append(f"{sample}{{{base}{labels}}} {value} {t}")
        return lines

    lines = [
        *family("up", "gauge", [("up", "", 1.0)]),
        *family(
            "leanserve_requests",
            "counter",
            [("leanserve_requests_total", f',model="m",code="{code}"', rate) for code, rate in RATES.items()],
        ),
        *family(
            "leanserve_request_duration_seconds",
            "histogram",
            [
                *(
                    ("leanserve_request_duration_seconds_bucket", f',model="m",le="{le}"', served if full else 0.0)
                    for le, full in ((le, BUCKETS.index(le) >= BUCKETS.index(FIRST_FULL_BUCKET)) for le in BUCKETS)
                ),
                ("leanserve_request_duration_seconds_count", ',model="m"', served),
                ("leanserve_request_duration_seconds_sum", ',model="m"', served * 0.0075),
            ],
        ),
        *family("leanserve_cache_hits", "counter", [("leanserve_cache_hits_total", ',kind="exact"', HITS)]),
        *family("leanserve_cache_misses", "counter", [("leanserve_cache_misses_total", ',kind="exact"', MISSES)]),
        *family(
            "leanserve_batch_size",
            "histogram",
            [
                ("leanserve_batch_size_bucket", ',model="m",le="+Inf"', BATCHES),
                ("leanserve_batch_size_count", ',model="m"', BATCHES),
                ("leanserve_batch_size_sum", ',model="m"', ROWS),
            ],
        ),
    ]
    return "\n".join([*lines, "# EOF", ""])


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, datetime]]:
    """(URL, end of the hour) of a Prometheus serving the backfilled hour."""
    root = tmp_path_factory.mktemp("backfill")
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    source = root / "hour.om"
    source.write_text(openmetrics_hour(end))
    with serving_tsdb(create_blocks(source, root / "data"), workdir=root / "prometheus") as prometheus:
        yield prometheus.url, end


def observe(url: str, end: datetime, window_s: float) -> Observation:
    return observe_deployment(url, NAMESPACE, NAME, window_s, now=end)


@pytest.mark.parametrize("window_s", [1800, 600, 3600])
def test_every_figure_is_what_the_hour_holds(backfilled, window_s):
    url, end = backfilled
    seen = observe(url, end, window_s)

    served = sum(RATES.values()) * len(PODS)
    print(f"\n{window_s} s: {seen}")
    assert seen.requests == pytest.approx(served * window_s, rel=1e-9)
    assert seen.rps == pytest.approx(served, rel=1e-9)
    assert seen.error_rate == pytest.approx(RATES["503"] / sum(RATES.values()), rel=1e-9)
    assert seen.throttled_rate == pytest.approx(RATES["429"] / sum(RATES.values()), rel=1e-9)
    assert (seen.p50_ms, seen.p95_ms, seen.p99_ms) == pytest.approx((7.5, 9.75, 9.95), rel=1e-9)
    assert seen.cache_hit_rate == pytest.approx(HITS / (HITS + MISSES), rel=1e-9)
    assert seen.mean_batch == pytest.approx(ROWS / BATCHES, rel=1e-9)
    assert seen.replicas == pytest.approx(len(PODS), rel=1e-9)
    assert seen.cost_per_million(0.384) == pytest.approx(
        len(PODS) * window_s / 3600 * 0.384 / (served * window_s) * 1e6, rel=1e-9
    )


def test_a_window_after_the_hour_finds_the_targets_gone(backfilled):
    """Ten minutes after the last scrape, past Prometheus's 5-minute lookback: no target, not observed."""
    url, end = backfilled
    with pytest.raises(ObserverUnavailable, match=f"no scrape target of {NAMESPACE}/{NAME}"):
        observe(url, end + timedelta(minutes=10), 120)


def test_the_harness_refuses_a_tsdb_that_is_not_there(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no TSDB directory"), serving_tsdb(tmp_path / "missing"):
        pass
