"""The predictive warm pool on a history read back from a real Prometheus.

A week of the sidecar's ``leanserve_requests_total`` counter (a daily peak) is
written as OpenMetrics, turned into TSDB blocks by ``promtool tsdb
create-blocks-from openmetrics`` and served by a real ``prometheus`` started on
those blocks; ``request_rate_history`` reads the hourly rate back with a range
query and the schedule is made from it. The week ends an hour before now: a
Prometheus answers nothing older than its retention (15 days by default).
Needs the Debian ``prometheus`` package (``prometheus`` and ``promtool``), as
the serving tests need ``redis-server``: without it the test fails and says so.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from leanserve.observer.history import ObserverUnavailable, request_rate_history
from leanserve.planner.warm_pool import HOUR_S, WarmPoolStep, cold_start_seconds, min_replicas_at, schedule

NAMESPACE, NAME = "ns", "x"
SCRAPE_S = 60
#: rps of the synthetic deployment: 180 from 09:00 to 11:00 UTC every day, 20 otherwise.
BASE_RPS, PEAK_RPS = 20.0, 180.0


def rate_at(when: datetime) -> float:
    return PEAK_RPS if 9 <= when.hour < 11 else BASE_RPS


def openmetrics_week(end: datetime) -> str:
    """The counter, scraped every minute for a week (and an hour, the first window's start) up to ``end``."""
    labels = f'namespace="{NAMESPACE}",inferencedeployment="{NAME}",model="m",code="200"'
    lines = ["# HELP leanserve_requests Requests by model and status code", "# TYPE leanserve_requests counter"]
    start = end - timedelta(days=7, hours=1)
    total = 0.0
    for i in range(int((end - start).total_seconds()) // SCRAPE_S + 1):
        now = start + timedelta(seconds=i * SCRAPE_S)
        if i:
            total += rate_at(now - timedelta(seconds=SCRAPE_S)) * SCRAPE_S
        lines.append(f"leanserve_requests_total{{{labels}}} {total:.1f} {now.timestamp():.0f}")
    return "\n".join([*lines, "# EOF", ""])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} is not installed: apt-get install prometheus (Debian), which provides it", pytrace=False)
    return exe


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, datetime]]:
    """(URL, end of the week) of a Prometheus serving the backfilled week on a free loopback port."""
    root = tmp_path_factory.mktemp("prometheus")
    end = datetime.fromtimestamp(time.time() // HOUR_S * HOUR_S, UTC) - timedelta(hours=1)
    source, data = root / "week.om", root / "data"
    source.write_text(openmetrics_week(end))
    subprocess.run(
        [binary("promtool"), "tsdb", "create-blocks-from", "openmetrics", str(source), str(data)],
        check=True,
        capture_output=True,
    )
    config = root / "prometheus.yml"
    config.write_text("global: {}\n")  # nothing to scrape: the backfilled blocks are all it serves
    port = free_port()
    log = (root / "prometheus.log").open("wb")
    server = subprocess.Popen(
        [
            binary("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server, root / "prometheus.log")
        yield url, end
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def wait_ready(url: str, server: subprocess.Popen, log: Path) -> None:
    """Until /-/ready answers 200; a Prometheus that exits or never gets ready fails the test with its log."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"prometheus exited {server.returncode}:\n{log.read_text()[-3000:]}", pytrace=False)
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"prometheus not ready after 60 s:\n{log.read_text()[-3000:]}", pytrace=False)


def pods_with_cold_starts(seconds: list[int]) -> list[dict]:
    created = datetime(2024, 5, 6, tzinfo=UTC)
    return [
        {
            "metadata": {"creationTimestamp": (created + timedelta(hours=i)).isoformat()},
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "lastTransitionTime": (created + timedelta(hours=i, seconds=s)).isoformat(),
                    }
                ]
            },
        }
        for i, s in enumerate(seconds)
    ]


def test_the_backfilled_week_raises_min_replicas_a_cold_start_before_the_daily_peak(backfilled):
    url, end = backfilled

    history = request_rate_history(url, NAMESPACE, NAME, days=7, step_s=HOUR_S, now=end)
    cold_start = cold_start_seconds(pods_with_cold_starts([240, 250, 260, 270, 280, 290, 300]))
    plan = schedule(history, 25.0, warm_pool=2, max_replicas=12, cold_start_s=cold_start)

    print(f"\n{len(history)} hourly points, {history[0][0]:%a %H:%M} to {history[-1][0]:%a %H:%M} UTC")
    print(f"cold start {cold_start:.0f} s; {plan.reason}")
    print("hour (UTC) -> rps (95th pct) -> replicas needed -> minReplicas at hh:00")
    for hour, (rps, needed, floor) in enumerate(zip(plan.hourly_rps, plan.hourly_replicas, plan.hourly(), strict=True)):
        print(f"  {hour:02d}:00  {rps:7.1f}  {needed:3d}  {floor:3d}")
    print(
        "steps:",
        ", ".join(f"{timedelta(seconds=s.start_s)} -> {s.min_replicas}" for s in plan.steps),
    )

    assert len(history) == 7 * 24
    assert history[-1][0] == end - timedelta(hours=1)  # the last point is the hour that ended at `end`
    assert {round(rps, 6) for _, rps in history} == {BASE_RPS, PEAK_RPS}
    assert cold_start == pytest.approx(294.0)
    assert plan.basis == "hour-of-day"
    lead = 294  # the cold start, whole seconds
    assert plan.steps == (WarmPoolStep(0, 2), WarmPoolStep(9 * HOUR_S - lead, 9), WarmPoolStep(11 * HOUR_S, 2))
    day = end + timedelta(days=3)
    before = day.replace(hour=8, minute=55, second=5)
    assert min_replicas_at(plan, before - timedelta(seconds=1)) == 2
    assert min_replicas_at(plan, before + timedelta(seconds=1)) == 9
    assert min_replicas_at(plan, day.replace(hour=10, minute=59)) == 9
    assert min_replicas_at(plan, day.replace(hour=11, minute=0)) == 2


def test_a_deployment_without_samples_has_an_empty_history(backfilled):
    url, end = backfilled

    assert request_rate_history(url, NAMESPACE, "other", days=7, step_s=HOUR_S, now=end) == []


def test_prometheus_down_is_unavailable_not_an_empty_history():
    with pytest.raises(ObserverUnavailable, match="prometheus at"):
        request_rate_history(f"http://127.0.0.1:{free_port()}", NAMESPACE, NAME, days=1, step_s=HOUR_S, timeout_s=2)


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"url": "127.0.0.1:9090"}, "url"),
        ({"namespace": 'ns"} or vector(1e9) #'}, "namespace"),
        ({"name": "X"}, "name"),
        ({"days": 0}, "days"),
        ({"step_s": 15}, "step_s"),
        ({"days": 30, "step_s": 60}, "points"),
        ({"now": datetime(2024, 5, 6)}, "now"),
    ],
)
def test_history_arguments_are_checked_before_any_query(arguments, field):
    call = {"url": "http://127.0.0.1:9", "namespace": NAMESPACE, "name": NAME, "days": 1, "step_s": HOUR_S}

    with pytest.raises(ValueError, match=field):
        request_rate_history(**(call | arguments))
