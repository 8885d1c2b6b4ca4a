"""The demo's observed load test: a real local Prometheus scrapes the real serving stack while hack/loadgen
loads it, and the observer's figures come back beside the generator's, with the demo's JSON keys.

The stack is the small ``mlp`` model behind the real sidecar (leanserve.local_stack), on the serving CPUs;
the load generator and Prometheus run on the client's CPU (``split_cpus``), as in the demo. The Prometheus
is the product's launcher (leanserve.observer.local), not the tests' harness. Without it, or with one that
fails or dies, the demo must go on and say so: those paths are tested with a missing binary, one that
exits at once, and a Prometheus stopped before the load.

Like tests/test_observer.py, this needs Debian's ``prometheus`` and Go (for hack/loadgen), which
`make test` installs; without them it fails and says so.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from leanserve import demo
from leanserve.loadgen import poisson_loadgen
from leanserve.local_stack import serving_stack
from leanserve.observer.local import (
    LocalPrometheus,
    ScrapeTarget,
    find_prometheus,
    local_prometheus,
    prometheus_config,
)
from leanserve.planner.latency import Policy
from leanserve_serving import local
from tests.onnx_models import make_mlp
from tests.serving_harness import mlp_request

MODEL = "mlp"
NAME = "campaign"
#: The priced instance type of the demo (``local`` in the price table), USD per hour.
USD_PER_HOUR = 0.096
#: The observed load: Poisson arrivals at this rate for this long (the observer's window is the run).
RATE, SECONDS = 60.0, 4.0
#: The demo's JSON keys the observer adds.
OBSERVER_KEYS = {
    "observer",
    "observed_rps",
    "observed_p95_ms",
    "observed_cost_per_million",
    "observed_cache_hit_rate",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, local.CPUs]]:
    """The serving stack's infer URL, a request body for it, and the client's CPUs."""
    if poisson_loadgen() is None:
        pytest.fail("hack/loadgen could not be built: this test needs Go (make test checks for it)", pytrace=False)
    work = tmp_path_factory.mktemp("demo-observer")
    server_cpus, client_cpus = local.split_cpus()
    body = work / "request.json"
    body.write_text(json.dumps(mlp_request([0.1] * 64)))
    with serving_stack(make_mlp(work / "mlp.onnx"), MODEL, Policy(8, 5.0), cpus=server_cpus) as url:
        yield url, body, client_cpus


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[LocalPrometheus]:
    """Every local Prometheus the demo starts, to check afterwards that it was stopped."""
    servers: list[LocalPrometheus] = []

    @contextlib.contextmanager
    def recording(*args, **kwargs) -> Iterator[LocalPrometheus]:
        with local_prometheus(*args, **kwargs) as server:
            servers.append(server)
            yield server

    monkeypatch.setattr(demo, "local_prometheus", recording)
    return servers


def test_the_generated_configuration_scrapes_each_target_every_second_with_its_labels():
    target = ScrapeTarget("127.0.0.1:8080", {"namespace": "demo", "inferencedeployment": NAME})
    config = prometheus_config([target])
    assert config["global"]["scrape_interval"] == "1000ms"
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [
        {"targets": ["127.0.0.1:8080"], "labels": {"namespace": "demo", "inferencedeployment": NAME}}
    ]


def test_the_observed_figures_come_back_beside_the_generators(stack, started):
    """Prometheus's figures, read by the observer over the load's window, agree with the generator's
    (rate within 10 %, p95 within 35 %: a short run, a histogram's buckets), and the JSON keys carry them;
    the Prometheus is stopped when the load test returns."""
    if find_prometheus() is None:
        pytest.fail("prometheus is not installed: run `make test`, which installs it (Debian package)", pytrace=False)
    url, body, client_cpus = stack
    said: list[str] = []
    load = demo.observed_load_test(
        url, body, RATE, SECONDS, NAME, said.append, prometheus=find_prometheus(), client_cpus=client_cpus
    )

    assert load.observer == "prometheus", said
    seen, measured = load.observation, load.measured
    assert seen is not None
    lines = demo.comparison_lines(
        load, rate=RATE, predicted_p95_ms=10.0, usd_per_hour=USD_PER_HOUR, planned_hit_rate=0.18
    )
    print("\n" + "\n".join(said + lines))
    assert measured.errors == 0
    assert seen.rps == pytest.approx(measured.achieved_rps, rel=0.10)
    assert seen.p95_ms == pytest.approx(measured.p95_ms, rel=0.35)
    assert seen.replicas == pytest.approx(1.0)
    assert seen.cache_hit_rate is None  # the sidecar has no cache
    figures = demo.observer_figures(load, USD_PER_HOUR)
    assert figures.keys() >= OBSERVER_KEYS
    assert figures["observed_rps"] == pytest.approx(seen.rps, abs=0.1)
    assert figures["observed_cost_per_million"] == pytest.approx(
        demo.cost_per_million_at(measured.achieved_rps, USD_PER_HOUR), rel=0.10
    )
    assert figures["observed_cache_hit_rate"] is None
    json.dumps(figures)  # one JSON line
    assert [s.proc.poll() is not None for s in started] == [True]


@pytest.mark.parametrize(
    ("binary", "observer"),
    [(None, "not installed"), ("/bin/false", "unavailable: /bin/false exited with 1")],
    ids=["not-installed", "exits-at-once"],
)
def test_without_a_working_prometheus_the_load_is_measured_and_the_observer_says_why(stack, binary, observer):
    url, body, client_cpus = stack
    said: list[str] = []
    load = demo.observed_load_test(url, body, RATE, 1.0, NAME, said.append, prometheus=binary, client_cpus=client_cpus)

    assert load.observer == observer
    assert load.observation is None
    assert load.measured.achieved_rps > 0
    assert any(observer.split(":")[0] in line for line in said), said
    figures = demo.observer_figures(load, USD_PER_HOUR)
    assert figures["observer"] == observer
    assert {k: figures[k] for k in OBSERVER_KEYS - {"observer"}} == dict.fromkeys(OBSERVER_KEYS - {"observer"})
    assert demo.comparison_lines(
        load, rate=RATE, predicted_p95_ms=10.0, usd_per_hour=USD_PER_HOUR, planned_hit_rate=0.18
    )[-1] == (f"    observer: {observer}")


def test_a_prometheus_that_dies_before_the_load_makes_the_observer_unavailable(stack, monkeypatch, started):
    if find_prometheus() is None:
        pytest.fail("prometheus is not installed: run `make test`, which installs it (Debian package)", pytrace=False)
    url, body, client_cpus = stack
    real_warm_up = demo._warm_up

    def warm_up_then_kill(*args) -> None:
        real_warm_up(*args)
        started[-1].proc.kill()
        started[-1].proc.wait()

    monkeypatch.setattr(demo, "_warm_up", warm_up_then_kill)
    began = time.monotonic()
    load = demo.observed_load_test(
        url, body, RATE, 1.0, NAME, lambda _: None, prometheus=find_prometheus(), client_cpus=client_cpus
    )

    assert load.observer.startswith("unavailable: prometheus at http://127.0.0.1:"), load.observer
    assert "unreachable" in load.observer
    assert load.observation is None
    assert load.measured.achieved_rps > 0
    assert time.monotonic() - began < 15  # no wait for scrapes from a dead Prometheus
