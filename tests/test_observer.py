"""The observer against a real Prometheus scraping the real serving stack, while hack/loadgen drives it.

Two InferenceDeployments in namespace ``shop`` share one model server (the ``mlp`` model): ``plain``, a
sidecar without a cache, and ``cached``, a sidecar with the exact cache on a real redis-server. A real
``prometheus`` (Debian's, started by tests/prometheus_harness.py) scrapes both sidecars every second as
static targets labelled ``namespace``/``inferencedeployment``, as the in-cluster relabelling labels pods.
The serving processes run on one set of CPUs, the load generator and Prometheus on another
(``split_cpus``, as the demo and the planner benchmark pin them), so the client does not take the CPU
of the server it measures.

Like redis-server for the serving tests, ``prometheus`` comes from `make test`'s system packages
(scripts/install-system-deps.sh); without it these tests fail and say so. The load needs hack/loadgen,
which needs Go to build.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import orjson
import pytest

from leanserve.loadgen import load_test, poisson_loadgen
from leanserve.observer import Observation, ObserverUnavailable, observe_deployment
from leanserve_serving import local
from tests.onnx_models import make_mlp
from tests.prometheus_harness import PrometheusServer, ScrapeTarget, scraping
from tests.serving_harness import metric, mlp_request, post, start_redis

NAMESPACE = "shop"
PLAIN, CACHED = "plain", "cached"
MODEL = "mlp"
#: The load of the rate and latency test: Poisson arrivals at this rate, for this long.
RATE, SECONDS = 100.0, 8.0
#: The cache test's requests per second: its 240 requests take 4 s, several scrapes.
CACHE_RATE = 60.0
#: How long a test waits for Prometheus to scrape what it needs (a scrape a second; the first after ~5 s).
SCRAPE_WAIT_S = 30


@dataclass(frozen=True)
class Stack:
    """The running stack: Prometheus, each deployment's sidecar URL, and who runs on which CPUs."""

    prometheus: PrometheusServer
    sidecars: dict[str, str]
    client_cpus: local.CPUs

    def infer_url(self, deployment: str) -> str:
        return f"{self.sidecars[deployment]}/v2/models/{MODEL}/infer"


def query(prometheus: PrometheusServer, promql: str) -> list[dict]:
    """The test's own look at Prometheus (plain HTTP, not the observer under test)."""
    url = f"{prometheus.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())["data"]["result"]


def wait_for_scrape(prometheus: PrometheusServer, deployment: str, after: float) -> float:
    """Until Prometheus holds a scrape of ``deployment``'s sidecar that started after ``after``; its time (epoch s)."""
    promql = f'timestamp(up{{namespace="{NAMESPACE}",inferencedeployment="{deployment}"}})'
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while time.monotonic() < deadline:
        result = query(prometheus, promql)
        if result and float(result[0]["value"][1]) > after:
            return float(result[0]["value"][1])
        time.sleep(0.1)
    pytest.fail(f"no scrape of {deployment} after {after} within {SCRAPE_WAIT_S} s:\n{prometheus.log_tail()}")


def observe(stack: Stack, deployment: str, start: float, end: float) -> Observation:
    """The observer's figures of ``deployment`` over the window [start, end] (epoch seconds)."""
    at = datetime.fromtimestamp(end, UTC)
    return observe_deployment(stack.prometheus.url, NAMESPACE, deployment, end - start, now=at)


def rows(n: int, seed: int) -> list[list[float]]:
    return np.random.default_rng(seed).normal(size=(n, 64)).astype(np.float32).tolist()


def paced(clients: ThreadPoolExecutor, url: str, requests: list[list[float]], rate: float) -> list[Future[int]]:
    """POST each row to ``url`` on ``clients``, the i-th at i / ``rate`` seconds (load shaping, not timing)."""
    start = time.monotonic()
    answers = []
    for i, row in enumerate(requests):
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
        answers.append(clients.submit(lambda r: post(url, mlp_request(r))[0], row))
    return answers


def exact_cache_counters(sidecar: str) -> tuple[float, float]:
    """(hits, misses) of the exact cache, read from the sidecar's own /metrics."""
    return (
        metric(sidecar, "leanserve_cache_hits_total", 'kind="exact"'),
        metric(sidecar, "leanserve_cache_misses_total", 'kind="exact"'),
    )


def latency_buckets(sidecar: str) -> dict[float, float]:
    """The sidecar's request-latency histogram for ``mlp`` from its own /metrics: upper edge (s) -> cumulative count."""
    with urllib.request.urlopen(sidecar + "/metrics", timeout=5) as response:
        text = response.read().decode()
    prefix = "leanserve_request_duration_seconds_bucket{"
    buckets = {}
    for line in text.splitlines():
        if line.startswith(prefix) and f'model="{MODEL}"' in line:
            labels, value = line[len(prefix) :].rsplit("} ", 1)
            le = next(part for part in labels.split(",") if part.startswith("le="))[4:-1]
            buckets[float(le)] = float(value)
    return buckets


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus's histogram_quantile on cumulative bucket counts: linear inside the bucket the rank falls in."""
    edges = sorted(buckets)
    rank = q * buckets[math.inf]
    lower, below = 0.0, 0.0
    for edge in edges:
        if buckets[edge] >= rank:
            if edge == math.inf:
                return lower
            return lower + (edge - lower) * (rank - below) / (buckets[edge] - below)
        lower, below = edge, buckets[edge]
    raise AssertionError(f"no bucket holds rank {rank}: {buckets}")


def bucket_lower_edge_ms(value_ms: float, buckets: dict[float, float]) -> float:
    """The lower edge (ms) of the histogram bucket ``value_ms`` lies in (0 below the first)."""
    return 1000 * max((edge for edge in buckets if 1000 * edge < value_ms), default=0.0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if poisson_loadgen() is None:
        pytest.fail("hack/loadgen could not be built: these tests need Go (make test checks for it)", pytrace=False)
    work = tmp_path_factory.mktemp("observer")
    server_cpus, client_cpus = local.split_cpus()
    model = make_mlp(work / "mlp.onnx")
    redis = start_redis(work)
    if server_cpus is not None and redis.proc is not None:
        os.sched_setaffinity(redis.proc.pid, server_cpus)
    with contextlib.ExitStack() as running:
        running.callback(redis.stop)
        server = running.enter_context(local.model_server(model, MODEL, cpus=server_cpus))
        _, plain = running.enter_context(local.sidecar(server.url, 16, 5.0, cpus=server_cpus))
        _, cached = running.enter_context(
            local.sidecar(server.url, 16, 5.0, redis_url=f"redis://127.0.0.1:{redis.port}/0", cpus=server_cpus)
        )
        ports = {PLAIN: plain, CACHED: cached}
        targets = [
            ScrapeTarget(f"127.0.0.1:{port}", {"namespace": NAMESPACE, "inferencedeployment": name})
            for name, port in ports.items()
        ]
        prometheus = running.enter_context(scraping(targets, workdir=work / "prometheus", cpus=client_cpus))
        sidecars = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        # Warm-up, and the plain sidecar's request counter and histogram born before any test's window.
        body = work / "warm.json"
        body.write_text(json.dumps(mlp_request(rows(1, seed=0)[0])))
        load_test(f"{sidecars[PLAIN]}/v2/models/{MODEL}/infer", body, 30, 1, cpus=client_cpus)
        wait_for_scrape(prometheus, PLAIN, after=time.time())
        yield Stack(prometheus, sidecars, client_cpus)


def test_observed_request_rate_and_percentiles_agree_with_the_load_generator_and_the_sidecars_histogram(
    stack, tmp_path
):
    """The request rate within 5 % of hack/loadgen's; the percentiles exactly the sidecar's own histogram's.

    Two windows of one load run. Over the load itself (from before the generator starts to after it
    ends), the observed rate is over the same seconds as the generator's achieved rate; Prometheus
    extrapolates its increase from the first and last scrapes inside the window to the window's edges.

    The percentiles cannot be compared with the generator's beyond a bound: it times each request end to
    end, from its scheduled arrival to the end of its response (time in the client and on loopback counts,
    1-2 ms of a 9 ms p95 on this machine under load), while the sidecar times from reading the request to
    writing the response, and Prometheus only has the sidecar's histogram, which ``histogram_quantile``
    interpolates linearly inside the bucket the quantile falls in. So, over a second window whose edges are
    scrapes (one just before the load, one just after), the observed p50/p95/p99 must be what Prometheus's
    interpolation gives on the sidecar's own bucket counts read from its /metrics at those scrapes, and
    the observed request count the sidecar's. Against the generator, what holds is a bound: each request's
    sidecar time lies inside its generator time, so the sidecar's p95 is at most the generator's, and the
    sidecar's p95 is at least the lower edge of the bucket the observed p95 falls in.
    """
    body = tmp_path / "request.json"
    body.write_text(json.dumps(mlp_request(rows(1, seed=1)[0])))
    sidecar = stack.sidecars[PLAIN]

    first_scrape = wait_for_scrape(stack.prometheus, PLAIN, after=time.time())
    before = latency_buckets(sidecar)
    start = time.time()
    load = load_test(stack.infer_url(PLAIN), body, RATE, SECONDS, cpus=stack.client_cpus)
    end = time.time()
    last_scrape = wait_for_scrape(stack.prometheus, PLAIN, after=end)
    after = latency_buckets(sidecar)
    seen = observe(stack, PLAIN, start, end)
    # Each edge a millisecond outside its scrape: Prometheus 3 leaves a sample at a range's left edge out.
    scraped = observe(stack, PLAIN, first_scrape - 0.001, last_scrape + 0.001)

    counted = {le: after[le] - before.get(le, 0.0) for le in after}
    local_ms = {q: 1000 * histogram_quantile(q, counted) for q in (0.5, 0.95, 0.99)}
    print(
        f"\ngenerator: {load.achieved_rps:.2f} rps, p50 {load.p50_ms:.2f} ms, p95 {load.p95_ms:.2f} ms, "
        f"p99 {load.p99_ms:.2f} ms, errors {load.errors:.3f}"
        f"\nobserved:  {seen.rps:.2f} rps ({seen.requests:.1f} requests in {seen.window_s:.2f} s), "
        f"p50 {seen.p50_ms:.2f} ms, p95 {seen.p95_ms:.2f} ms, p99 {seen.p99_ms:.2f} ms, "
        f"mean batch {seen.mean_batch:.2f}, replicas {seen.replicas:.2f}"
        f"\nbetween scrapes: observed {scraped.requests:.1f} requests, p50 {scraped.p50_ms:.3f} ms, "
        f"p95 {scraped.p95_ms:.3f} ms, p99 {scraped.p99_ms:.3f} ms; the sidecar's histogram "
        f"{counted[math.inf]:.0f} requests, p50 {local_ms[0.5]:.3f} ms, p95 {local_ms[0.95]:.3f} ms, "
        f"p99 {local_ms[0.99]:.3f} ms"
        f"\nrps {seen.rps / load.achieved_rps - 1:+.1%}, p95 {seen.p95_ms / load.p95_ms - 1:+.1%}"
    )
    assert load.errors == 0
    assert seen.rps == pytest.approx(load.achieved_rps, rel=0.05)
    assert seen.p50_ms <= seen.p95_ms <= seen.p99_ms
    assert seen.replicas == 1.0
    assert (seen.error_rate, seen.throttled_rate) == (0.0, 0.0)
    assert seen.cache_hit_rate is None  # the plain sidecar has no cache
    assert seen.mean_batch >= 1.0

    assert counted[math.inf] == pytest.approx(load.achieved_rps * SECONDS, rel=0.05)
    assert scraped.requests == pytest.approx(counted[math.inf], rel=1e-3)
    assert (scraped.p50_ms, scraped.p95_ms, scraped.p99_ms) == pytest.approx(
        (local_ms[0.5], local_ms[0.95], local_ms[0.99]), rel=1e-3
    )
    assert bucket_lower_edge_ms(seen.p95_ms, counted) <= load.p95_ms


def test_cache_hit_rate_is_the_sidecars_own_counters(stack):
    """Over a window, the observed hit rate is the exact cache's hits over its lookups as the sidecar counts them.

    A load that repeats requests: 100 rows each sent twice first (a miss, then a hit), then 240 requests
    drawn from those rows and 60 new ones, over 4 s. The window's first scrape is taken before the load
    and its last after it, so the counts inside it are the sidecar's own deltas. The warm-up is outside
    the window and there for Prometheus's sake: both counters' series exist before the window opens, and
    their values at its start are not small beside what the window adds in its seconds, so increase()
    stretches hits and misses by the same extrapolation factor, which cancels in the ratio. (Prometheus
    extrapolates less, by each series' own amount, a counter that looks newly born: one whose first value
    in the window, spread over the window's increase, would reach zero before the window's start.)
    ``plain`` saw none of this traffic: it is selected by its labels.
    """
    sidecar = stack.sidecars[CACHED]
    url = stack.infer_url(CACHED)
    warm, new = rows(100, seed=2), rows(60, seed=3)
    with local.running_on(stack.client_cpus):
        for row in warm:
            assert [post(url, mlp_request(row))[0] for _ in range(2)] == [200, 200]
        start = time.time()
        wait_for_scrape(stack.prometheus, CACHED, after=start)  # the window's first scrape: before the load
        before = exact_cache_counters(sidecar)
        pool = warm + new
        picks = np.random.default_rng(4).integers(0, len(pool), size=240)
        with ThreadPoolExecutor(4) as clients:
            codes = [answer.result() for answer in paced(clients, url, [pool[i] for i in picks], CACHE_RATE)]
        wait_for_scrape(stack.prometheus, CACHED, after=time.time())  # its last scrape: after the load
        end = time.time()
        after = exact_cache_counters(sidecar)

    seen = observe(stack, CACHED, start, end)
    elsewhere = observe(stack, PLAIN, start, end)

    hits, misses = after[0] - before[0], after[1] - before[1]
    print(
        f"\nsidecar counters in the window: {hits:.0f} hits, {misses:.0f} misses, hit rate {hits / (hits + misses):.6f}"
        f"\nobserved: hit rate {seen.cache_hit_rate:.6f}, {seen.requests:.1f} requests, mean batch {seen.mean_batch}"
    )
    assert codes == [200] * len(picks)
    assert hits + misses == len(picks)
    assert 0 < hits < len(picks)
    assert math.isclose(seen.cache_hit_rate, hits / (hits + misses), rel_tol=1e-12)
    assert elsewhere.requests == 0.0
    assert elsewhere.cache_hit_rate is None


def test_prometheus_down_is_unavailable_and_the_same_figures_return_after_a_restart(stack, tmp_path):
    """Stopped mid-run: ObserverUnavailable with the reason; the serving goes on. Restarted on its storage:
    the same window gives the same figures (what it scraped comes back from its write-ahead log)."""
    body = tmp_path / "request.json"
    body.write_text(json.dumps(mlp_request(rows(1, seed=5)[0])))
    start = time.time()
    load_test(stack.infer_url(PLAIN), body, 50, 2, cpus=stack.client_cpus)
    wait_for_scrape(stack.prometheus, PLAIN, after=time.time())
    end = time.time()
    before = observe(stack, PLAIN, start, end)

    stack.prometheus.stop()
    try:
        with pytest.raises(ObserverUnavailable) as down:
            observe(stack, PLAIN, start, end)
        assert post(stack.infer_url(PLAIN), mlp_request(rows(1, seed=6)[0]))[0] == 200
    finally:
        stack.prometheus.start()
    again = observe(stack, PLAIN, start, end)

    print(f"\ndown: {down.value.reason}\nbefore: {before}\nagain:  {again}")
    assert f"prometheus at {stack.prometheus.url} unreachable" in down.value.reason
    assert "Connection refused" in down.value.reason
    assert before.requests > 0
    assert again == before


def test_a_deployment_prometheus_never_scraped_is_unavailable(stack):
    with pytest.raises(ObserverUnavailable, match=f"no scrape target of {NAMESPACE}/absent"):
        observe_deployment(stack.prometheus.url, NAMESPACE, "absent", 60)


def test_a_server_that_is_not_prometheus_is_unavailable(stack):
    """The sidecar's own port (a real HTTP server, not a Prometheus) answers 404: not observed."""
    with pytest.raises(ObserverUnavailable, match="answered an error: HTTP Status Code 404"):
        observe_deployment(stack.sidecars[PLAIN], NAMESPACE, PLAIN, 60)


# ---- what answers at the URL is not trusted ---------------------------------------------------------


def vector(*samples: tuple[dict[str, str], str]) -> bytes:
    result = [{"metric": labels, "value": [1700000000.0, value]} for labels, value in samples]
    return orjson.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})


@pytest.fixture
def impostor() -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    """A real HTTP server on loopback that answers every query with the (status, body) a test puts first in
    its list: what a misconfigured URL, a proxy, or a tampered Prometheus could send."""
    answers: list[tuple[int, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = answers[0] if answers else (500, b"")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", answers
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (200, b"<html>login</html>", "not a Prometheus answer"),
        (200, b'{"status": "success"}', "not a Prometheus answer"),
        (200, b'{"data": {"result": {"metric": {}}}}', "an instant vector is a list"),
        (200, vector(({}, "+Inf")), "a finite, non-negative number"),
        (200, vector(({}, "-1")), "a finite, non-negative number"),
        (200, vector(({}, "1"), ({"x": "y"}, "1")), "one series expected"),
        (200, vector(({}, "one")), "must be a number"),
        (200, b'{"data": {"result": [{"metric": {}, "value": [1, 2, 3]}]}}', "is \\[timestamp, value\\]"),
        (503, b'{"status": "error", "error": "overloaded"}', "HTTP Status Code 503"),
    ],
)
def test_an_answer_that_is_not_one_is_unavailable_never_another_error(impostor, status, body, reason):
    url, answers = impostor
    answers.append((status, body))
    with pytest.raises(ObserverUnavailable, match=reason):
        observe_deployment(url, NAMESPACE, PLAIN, 60)


def test_a_count_that_is_not_one_fails_the_observation(impostor):
    """The replicas answer passes; the requests answer has a series without its ``code`` label."""
    url, answers = impostor
    answers.append((200, vector(({}, "1"))))
    with pytest.raises(ObserverUnavailable, match="every series has a 'code' label"):
        observe_deployment(url, NAMESPACE, PLAIN, 60)


def test_a_prometheus_that_never_answers_is_unavailable_within_the_timeout():
    """A socket that accepts connections and never answers: the observation gives up at ``timeout_s``."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(ObserverUnavailable, match="no answer within the observation's timeout"):
            observe_deployment(url, NAMESPACE, PLAIN, 60, timeout_s=0.3)


def test_a_url_that_is_not_http_is_refused_before_any_query():
    with pytest.raises(ValueError, match="url"):
        observe_deployment("127.0.0.1:9090", NAMESPACE, PLAIN, 60)
    with pytest.raises(ValueError, match="now"):
        observe_deployment("http://127.0.0.1:9", NAMESPACE, PLAIN, 60, now=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="namespace"):
        observe_deployment("http://127.0.0.1:9", 'shop"} or vector(1e9) #', PLAIN, 60)
