"""The serving data plane: real model-server and sidecar processes, real Redis, real HTTP, real ORT sessions."""

from __future__ import annotations

import asyncio
import http.client
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson
import pytest

from leanserve_serving.batcher import AnswerTimeoutError, DynamicBatcher, QueueFullError, UpstreamShapeError
from leanserve_serving.cache import RedisHealth
from leanserve_serving.config import SidecarConfig
from leanserve_serving.sidecar import create_app
from leanserve_serving.tensors import InferRequest, Tensor
from tests.onnx_models import make_mlp, make_seq, make_text
from tests.serving_harness import (
    Process,
    get,
    metric,
    mlp_request,
    model_server,
    post,
    sidecar,
    start_redis,
    text_request,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serving")


@pytest.fixture(scope="module")
def models(workdir: Path) -> dict[str, Path]:
    return {
        "mlp": make_mlp(workdir / "mlp.onnx"),
        "seq": make_seq(workdir / "seq.onnx"),
        "text": make_text(workdir / "text.onnx"),
    }


@pytest.fixture
def started(workdir: Path) -> Iterator[list[Process]]:
    """Processes a test starts; all stopped afterwards."""
    procs: list[Process] = []
    yield procs
    for p in procs:
        p.stop(kill=True)


def run_sidecar(started: list[Process], upstream: str, workdir: Path, **settings: object) -> Process:
    proc = sidecar(upstream, workdir, **settings).start()
    started.append(proc)
    return proc


def one_input(**tensor: object) -> dict[str, object]:
    """A request body with one tensor: an FP32 ``input`` unless ``tensor`` says otherwise."""
    return {"inputs": [{"name": "input", "datatype": "FP32", **tensor}]}


def rows(n: int, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).normal(size=(n, 64)).astype(np.float32).tolist()


# ---- model server ---------------------------------------------------------------------------


def test_model_server_metadata_comes_from_the_graph(servers):
    status, meta = get(servers["mlp"].url + "/v2/models/mlp")
    assert status == 200
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}]
    assert meta["parameters"]["providers"] == ["CPUExecutionProvider"]
    assert get(servers["mlp"].url + "/v2/models/mlp/ready")[0] == 200
    assert get(servers["mlp"].url + "/v2/health/ready") == (200, {"ready": True})
    assert metric(servers["mlp"].url, "leanserve_model_load_seconds") > 0


def test_model_server_runs_a_whole_batch(servers):
    batch = rows(8)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [8, 64], "data": batch}]}
    status, out, _ = post(servers["mlp"].url + "/v2/models/mlp/infer", body)
    assert status == 200
    assert out["outputs"][0]["shape"] == [8, 2]
    singles = [post(servers["mlp"].url + "/v2/models/mlp/infer", mlp_request(r))[1] for r in batch]
    together = np.array(out["outputs"][0]["data"]).reshape(8, 2)
    apart = np.array([s["outputs"][0]["data"] for s in singles])
    np.testing.assert_allclose(together, apart, rtol=1e-5, atol=1e-6)


# ---- batching ---------------------------------------------------------------------------------


def test_batched_answers_equal_unbatched_under_concurrency(servers, workdir, started):
    car = run_sidecar(started, servers["mlp"].url, workdir, max_batch_size=16, max_wait_ms=5)
    inputs = rows(240, seed=1)
    direct = [post(servers["mlp"].url + "/v2/models/mlp/infer", mlp_request(r))[1] for r in inputs]
    with ThreadPoolExecutor(max_workers=32) as pool:
        via = list(pool.map(lambda r: post(car.url + "/v2/models/mlp/infer", mlp_request(r, id=str(r[0]))), inputs))
    for row, (status, body, _), expected in zip(inputs, via, direct, strict=True):
        assert status == 200
        assert body["id"] == str(row[0])  # each caller gets its own answer back
        np.testing.assert_allclose(body["outputs"][0]["data"], expected["outputs"][0]["data"], rtol=1e-5, atol=1e-6)
    batches = metric(car.url, "leanserve_batch_size_count", 'model="mlp"')
    rows_sent = metric(car.url, "leanserve_batch_size_sum", 'model="mlp"')
    assert rows_sent == len(inputs)
    assert batches < len(inputs) / 2, f"no real batching: {batches} batches for {len(inputs)} requests"


def test_requests_of_different_shapes_batch_separately(servers, workdir, started):
    car = run_sidecar(started, servers["seq"].url, workdir, max_batch_size=8, max_wait_ms=10)
    rng = np.random.default_rng(2)
    bodies = [
        one_input(shape=[1, n, 8], data=rng.normal(size=(1, n, 8)).astype(np.float32).tolist()) for n in [3, 5, 7] * 20
    ]
    with ThreadPoolExecutor(max_workers=24) as pool:
        via = list(pool.map(lambda b: post(car.url + "/v2/models/seq/infer", b), bodies))
    for body, (status, got, _) in zip(bodies, via, strict=True):
        assert status == 200, got
        expected = post(servers["seq"].url + "/v2/models/seq/infer", body)[1]
        np.testing.assert_allclose(got["outputs"][0]["data"], expected["outputs"][0]["data"], rtol=1e-5, atol=1e-6)
    assert metric(car.url, "leanserve_batch_size_count", 'model="seq"') < len(bodies)


# ---- caches -----------------------------------------------------------------------------------


def test_exact_cache_hit_is_identical_and_skips_the_model(servers, redis, workdir, started):
    car = run_sidecar(started, servers["mlp"].url, workdir, redis_url=f"redis://127.0.0.1:{redis.port}/1")
    body = mlp_request(rows(1, seed=3)[0])
    status, first, headers = post(car.url + "/v2/models/mlp/infer", body)
    assert (status, headers["X-Leanserve-Source"]) == (200, "model")
    calls = metric(servers["mlp"].url, "leanserve_model_requests_total", 'code="200",model="mlp"')
    status, second, headers = post(car.url + "/v2/models/mlp/infer", body)
    assert (status, headers["X-Leanserve-Source"]) == (200, "exact")
    assert second == first
    assert metric(servers["mlp"].url, "leanserve_model_requests_total", 'code="200",model="mlp"') == calls
    assert metric(car.url, "leanserve_cache_hits_total", 'kind="exact"') == 1
    assert metric(car.url, "leanserve_redis_up") == 1


def test_exact_cache_entries_expire_after_the_ttl(servers, redis, workdir, started):
    car = run_sidecar(
        started, servers["mlp"].url, workdir, redis_url=f"redis://127.0.0.1:{redis.port}/2", cache_ttl_seconds=1
    )
    body = mlp_request(rows(1, seed=4)[0])
    assert post(car.url + "/v2/models/mlp/infer", body)[2]["X-Leanserve-Source"] == "model"
    assert post(car.url + "/v2/models/mlp/infer", body)[2]["X-Leanserve-Source"] == "exact"
    time.sleep(1.6)
    assert post(car.url + "/v2/models/mlp/infer", body)[2]["X-Leanserve-Source"] == "model"


def test_excluded_fields_are_left_out_of_the_key(servers, redis, workdir, started):
    redis_url = f"redis://127.0.0.1:{redis.port}/3"
    car = run_sidecar(started, servers["mlp"].url, workdir, redis_url=redis_url, cache_exclude_fields=["request_id"])
    values = rows(1, seed=5)[0]
    first = post(car.url + "/v2/models/mlp/infer", mlp_request(values, parameters={"request_id": "a"}))
    second = post(car.url + "/v2/models/mlp/infer", mlp_request(values, parameters={"request_id": "b"}))
    other = post(car.url + "/v2/models/mlp/infer", mlp_request(values, parameters={"tenant": "x"}))
    assert first[2]["X-Leanserve-Source"] == "model"
    assert second[2]["X-Leanserve-Source"] == "exact"  # only the excluded field differs
    assert other[2]["X-Leanserve-Source"] == "model"  # a field that is part of the key


def test_semantic_cache_hits_above_the_threshold_and_misses_below(servers, redis, workdir, started):
    url = f"redis://127.0.0.1:{redis.port}/4"
    semantic = {"redis_url": url, "semantic_enabled": True, "semantic_threshold": 0.9, "semantic_embedder": "hashing"}
    car = run_sidecar(started, servers["text"].url, workdir, **semantic)
    infer = car.url + "/v2/models/text/infer"
    status, first, headers = post(infer, text_request("The battery life is great"))
    assert (status, headers["X-Leanserve-Source"]) == (200, "model")
    assert first["outputs"][0]["data"] == ["THE BATTERY LIFE IS GREAT"]
    # Same words, other case and punctuation: similarity above 0.9, the cached answer comes back.
    status, near, headers = post(infer, text_request("the battery life is great!!"))
    assert (status, headers["X-Leanserve-Source"]) == (200, "semantic")
    assert near["outputs"][0]["data"] == ["THE BATTERY LIFE IS GREAT"]
    # A different statement: below the threshold, the model answers.
    status, far, headers = post(infer, text_request("the battery life is terrible"))
    assert (status, headers["X-Leanserve-Source"]) == (200, "model")
    assert far["outputs"][0]["data"] == ["THE BATTERY LIFE IS TERRIBLE"]
    # A second replica sharing the Redis finds the entry through the shared index.
    peer = run_sidecar(started, servers["text"].url, workdir, **semantic)
    time.sleep(0.6)  # one sync of the shared index
    status, shared, headers = post(peer.url + "/v2/models/text/infer", text_request("THE BATTERY LIFE IS GREAT."))
    assert (status, headers["X-Leanserve-Source"]) == (200, "semantic")
    assert shared["outputs"][0]["data"] == ["THE BATTERY LIFE IS GREAT"]


def test_semantic_cache_with_minilm_catches_a_paraphrase(servers, redis, workdir, started):
    """The default embedder (all-MiniLM-L6-v2) at the default threshold 0.97."""
    car = run_sidecar(
        started, servers["text"].url, workdir, redis_url=f"redis://127.0.0.1:{redis.port}/5", semantic_enabled=True
    )
    infer = car.url + "/v2/models/text/infer"
    assert post(infer, text_request("How do I reset my password?"))[2]["X-Leanserve-Source"] == "model"
    status, hit, headers = post(infer, text_request("How can I reset my password?"))  # cosine 0.99
    assert (status, headers["X-Leanserve-Source"]) == (200, "semantic")
    assert hit["outputs"][0]["data"] == ["HOW DO I RESET MY PASSWORD?"]
    status, miss, headers = post(infer, text_request("What is the weather in Paris?"))  # cosine 0.06
    assert (status, headers["X-Leanserve-Source"]) == (200, "model")
    assert miss["outputs"][0]["data"] == ["WHAT IS THE WEATHER IN PARIS?"]


# ---- faults -----------------------------------------------------------------------------------


def test_redis_killed_during_a_load_run_fails_no_request(servers, workdir, started):
    own_redis = start_redis(workdir)
    started.append(own_redis)
    car = run_sidecar(started, servers["mlp"].url, workdir, redis_url=f"redis://127.0.0.1:{own_redis.port}/0")
    inputs = rows(20, seed=6) * 20  # repeats, so the cache is in use when Redis dies
    killed = threading.Event()

    def call(i_row: tuple[int, list[float]]) -> int:
        i, row = i_row
        if i == len(inputs) // 2 and not killed.is_set():
            killed.set()
            own_redis.stop(kill=True)
        return post(car.url + "/v2/models/mlp/infer", mlp_request(row))[0]

    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(call, enumerate(inputs)))
    assert killed.is_set()
    assert codes.count(200) == len(inputs), {c: codes.count(c) for c in set(codes)}
    assert metric(car.url, "leanserve_redis_up") == 0
    assert metric(car.url, "leanserve_cache_hits_total", 'kind="exact"') > 0


def test_upstream_killed_gives_503_and_not_ready_then_recovers(models, workdir, started):
    upstream = model_server(models["mlp"], "mlp", workdir).start()
    started.append(upstream)
    car = run_sidecar(started, upstream.url, workdir)
    body = mlp_request(rows(1, seed=7)[0])
    assert post(car.url + "/v2/models/mlp/infer", body)[0] == 200
    upstream.stop(kill=True)
    status, err, headers = post(car.url + "/v2/models/mlp/infer", body)
    assert status == 503 and "unavailable" in err["error"] and headers["Retry-After"] == "1"
    deadline = time.monotonic() + 5
    while get(car.url + "/v2/health/ready")[0] != 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert get(car.url + "/v2/health/ready")[0] == 503
    assert metric(car.url, "leanserve_upstream_up") == 0
    revived = model_server(models["mlp"], "mlp", workdir, port=upstream.port).start()
    started.append(revived)
    deadline = time.monotonic() + 5
    while get(car.url + "/v2/health/ready")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert get(car.url + "/v2/health/ready")[0] == 200
    assert post(car.url + "/v2/models/mlp/infer", body)[0] == 200


@pytest.fixture
def slow_upstream(servers) -> Iterator[str]:
    """A real v2 HTTP server that answers like the mlp model server, but 0.3 s late on every infer call."""
    from aiohttp import ClientSession, web

    real = servers["mlp"].url
    ready = threading.Event()
    box: dict[str, object] = {}

    async def relay(request: web.Request) -> web.Response:
        if request.method == "POST":
            await asyncio.sleep(0.3)
        async with (
            ClientSession() as session,
            session.request(request.method, real + request.path, data=await request.read()) as resp,
        ):
            return web.Response(body=await resp.read(), status=resp.status, content_type="application/json")

    def serve() -> None:
        loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", relay)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        box.update(loop=loop, runner=runner, port=site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(10)
    yield f"http://127.0.0.1:{box['port']}"
    loop = box["loop"]
    asyncio.run_coroutine_threadsafe(box["runner"].cleanup(), loop).result(10)  # type: ignore[arg-type, union-attr]
    loop.call_soon_threadsafe(loop.stop)  # type: ignore[union-attr]


def test_full_queue_answers_429_with_retry_after(slow_upstream, workdir, started):
    car = run_sidecar(
        started, slow_upstream, workdir, max_batch_size=1, max_queue=4, upstream_concurrency=1, request_timeout_s=20
    )
    body = mlp_request(rows(1, seed=8)[0])
    assert post(car.url + "/v2/models/mlp/infer", body)[0] == 200  # metadata is looked up once, then cached
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(lambda _: post(car.url + "/v2/models/mlp/infer", body, timeout=30), range(12)))
    codes = [status for status, _, _ in results]
    rejected = [r for r in results if r[0] == 429]
    assert set(codes) == {200, 429}, codes
    assert 5 <= codes.count(200) <= 6, codes  # one in flight (two at a boundary), four queued
    for _, err, headers in rejected:
        assert "queue full" in err["error"]
        assert headers["Retry-After"] == "1"
    assert post(car.url + "/v2/models/mlp/infer", body)[0] == 200  # and it serves again once drained


# ---- errors: the batcher's own, HTTP chosen at the edge; Redis failing open -----------------------


def _one_row(rows_: int = 1) -> InferRequest:
    data = np.zeros((rows_, 64), np.float32)
    return InferRequest(inputs=[Tensor("input", "FP32", data.shape, data)])


def test_the_batcher_imports_nothing_http():
    """Transport stays out of batching: a fresh interpreter importing the batcher loads no HTTP module."""
    code = "import sys, leanserve_serving.batcher; print(*sorted(sys.modules), sep='\\n')"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "leanserve_serving.batcher" in loaded
    http = [m for m in loaded if m.split(".")[0] in ("aiohttp", "http") or m == "leanserve_serving.http"]
    assert http == []


def test_the_batcher_raises_its_own_errors():
    async def hang(model: str, request: InferRequest) -> list[Tensor]:
        await asyncio.Event().wait()  # never set
        return []

    async def unbatched(model: str, request: InferRequest) -> list[Tensor]:
        data = np.zeros(2, np.float32)  # no batch dimension
        return [Tensor("logits", "FP32", data.shape, data)]

    async def run() -> None:
        full = DynamicBatcher(hang, max_batch_size=4, max_wait_s=0.0, max_queue=0, concurrency=1)
        with pytest.raises(QueueFullError, match=r"^queue full \(0 requests waiting\); retry shortly$"):
            await full.submit("mlp", _one_row(), timeout_s=10)
        stuck = DynamicBatcher(hang, max_batch_size=4, max_wait_s=0.0, max_queue=8, concurrency=1)
        with pytest.raises(AnswerTimeoutError, match=r"^no answer from the model within 0.01 s$"):
            await stuck.submit("mlp", _one_row(), timeout_s=0.01)
        bad = DynamicBatcher(unbatched, max_batch_size=4, max_wait_s=0.0, max_queue=8, concurrency=1)
        with pytest.raises(UpstreamShapeError) as caught:
            await bad.submit("mlp", _one_row(), timeout_s=10)
        assert str(caught.value) == "upstream output 'logits' has shape [2], not batched along 1 rows"
        assert (caught.value.output, caught.value.shape, caught.value.rows) == ("logits", (2,), 1)

    asyncio.run(run())


def _through_an_in_process_sidecar(logits_shape: list[int] | None, **settings: object) -> tuple[int, dict, dict]:
    """One request through the sidecar's real application (in this process) to a stand-in v2 upstream that
    answers ``logits`` of ``logits_shape``, or not at all when it is None (until the request is answered)."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    async def run() -> tuple[int, dict, dict]:
        answered = asyncio.Event()

        async def ready(_: web.Request) -> web.Response:
            return web.json_response({"ready": True})

        async def metadata(_: web.Request) -> web.Response:
            return web.json_response(
                {"name": "mlp", "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]}
            )

        async def infer(_: web.Request) -> web.Response:
            if logits_shape is None:
                await answered.wait()
            size = int(np.prod(logits_shape or [0]))
            output = {"name": "logits", "datatype": "FP32", "shape": logits_shape, "data": [0.0] * size}
            return web.json_response({"outputs": [output]})

        upstream = web.Application()
        upstream.router.add_get("/v2/health/ready", ready)
        upstream.router.add_get("/v2/models/mlp", metadata)
        upstream.router.add_post("/v2/models/mlp/infer", infer)
        async with TestServer(upstream) as up:
            config = SidecarConfig(upstream=str(up.make_url("")), **settings)  # type: ignore[arg-type]
            async with TestClient(TestServer(create_app(config))) as client:
                resp = await client.post("/v2/models/mlp/infer", json=mlp_request([0.5] * 64))
                answered.set()
                return resp.status, await resp.json(), dict(resp.headers)

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("logits_shape", "settings", "status", "reason"),
    [
        ([1, 2], {"max_queue": 0}, 429, "queue full (0 requests waiting); retry shortly"),
        # The batch leaves after max_wait: the upstream call's own timeout ends 50 ms after the caller's.
        (None, {"request_timeout_s": 0.2, "max_wait_ms": 50}, 504, "no answer from the model within 0.2 s"),
        ([2], {}, 502, "upstream output 'logits' has shape [2], not batched along 1 rows"),
    ],
    ids=["queue-full", "timed-out", "unbatched-output"],
)
def test_the_sidecar_answers_the_batchers_errors_in_http(logits_shape, settings, status, reason):
    code, body, headers = _through_an_in_process_sidecar(logits_shape, **settings)
    assert (code, body) == (status, {"error": reason})
    assert headers.get("Retry-After") == ("1" if status == 429 else None)


def test_a_failing_redis_call_fails_open_and_is_not_retried_during_the_back_off(caplog):
    states: list[bool] = []
    health = RedisHealth(states.append, backoff_s=60)
    calls: list[str] = []

    async def answers() -> bytes:
        calls.append("answers")
        return b"cached"

    async def refuses() -> bytes:
        calls.append("refuses")
        raise ConnectionRefusedError("connection refused")

    async def run() -> list[tuple[bool, bytes | None]]:
        return [await health.attempt(answers), await health.attempt(refuses), await health.attempt(answers)]

    with caplog.at_level(logging.WARNING, logger="leanserve.cache"):
        assert asyncio.run(run()) == [(True, b"cached"), (False, None), (False, None)]
    assert calls == ["answers", "refuses"]  # the third was not even started: Redis is backing off
    assert states == [True, True, False]
    assert "redis unavailable, serving uncached: connection refused" in caplog.text


# ---- bad input --------------------------------------------------------------------------------

GOOD = mlp_request([0.5] * 64)
BAD_INPUTS = {
    "invalid-json": (b'{"inputs": [', 400, "invalid JSON"),
    "no-inputs": ({"inputs": []}, 400, "'inputs' must be a non-empty list"),
    "missing-input": (one_input(name="other", shape=[1], data=[1]), 400, "missing input 'input'"),
    "wrong-datatype": (
        one_input(datatype="FP64", shape=[1, 64], data=[0.5] * 64),
        400,
        "has datatype FP64, the model expects FP32",
    ),
    "wrong-shape": (one_input(shape=[1, 63], data=[0.5] * 63), 400, "has shape [1, 63], the model expects [-1, 64]"),
    "data-count-mismatch": (one_input(shape=[1, 64], data=[0.5]), 400, "needs 64 elements, got 1"),
    "strings-for-numbers": (one_input(shape=[1, 64], data=["x"] * 64), 400, "does not match datatype FP32"),
    "oversized-body": (one_input(shape=[1, 4096], data=[0.123456] * 4096), 413, "request body too large"),
}


@pytest.fixture(scope="module")
def strict_servers(models, workdir) -> Iterator[tuple[Process, Process]]:
    """A model server and a sidecar with a 20 kB body limit."""
    upstream = model_server(models["mlp"], "mlp", workdir, LEANSERVE_MAX_BODY_BYTES="20000").start()
    car = sidecar(upstream.url, workdir, max_body_bytes=20000).start()
    yield upstream, car
    car.stop()
    upstream.stop()


@pytest.mark.parametrize("which", ["sidecar", "model-server"])
@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error_and_the_next_request_is_served(strict_servers, which, case):
    server = strict_servers[1] if which == "sidecar" else strict_servers[0]
    body, want_status, reason = BAD_INPUTS[case]
    status, err, _ = post(server.url + "/v2/models/mlp/infer", body)
    assert status == want_status, err
    assert reason in err["error"], err
    assert post(server.url + "/v2/models/mlp/infer", GOOD)[0] == 200


@pytest.mark.parametrize("which", ["sidecar", "model-server"])
def test_unknown_model_is_404(strict_servers, which):
    server = strict_servers[1] if which == "sidecar" else strict_servers[0]
    status, err, _ = post(server.url + "/v2/models/nope/infer", GOOD)
    assert status == 404
    assert "unknown model 'nope'" in err["error"]
    assert post(server.url + "/v2/models/mlp/infer", GOOD)[0] == 200


def test_sidecar_metrics_are_exposed_with_the_leanserve_prefix(strict_servers):
    car = strict_servers[1]
    post(car.url + "/v2/models/mlp/infer", GOOD)
    _, text = get(car.url + "/metrics")
    for name in (
        "leanserve_requests_total",
        "leanserve_request_duration_seconds_bucket",
        "leanserve_upstream_duration_seconds_bucket",
        "leanserve_batch_size_bucket",
        "leanserve_queue_depth",
        "leanserve_redis_up",
        "leanserve_upstream_up",
    ):
        assert name.encode() in text, name


# ---- stopping without losing a request ------------------------------------------------------


def test_sigterm_drains_the_pod_with_no_failed_request_then_both_exit_in_time(models, workdir, started):
    """A rollout's old pod, after its preStop sleep: SIGTERM reaches both containers at once.

    The sidecar answers readiness 503 at once and keeps serving every request that still arrives (new
    connections and kept-alive ones, which it closes after each answer) for its drain period; then it stops
    listening, lets the requests in flight finish and exits. The model server behind it outlives it, so
    no request meets a missing upstream. Clients keep sending until just before the drain ends (by then
    the endpoints have moved in a cluster); one request is timed to still be in flight when it ends.
    """
    # Every request waits wait_s for its batch. The clients stop early enough for their last batch to be gone
    # before the timed request is sent, so that one waits in a batch of its own, past the end of the drain.
    drain, timeout, wait_s = 4.0, 3.0, 0.8
    stop_at, last_at = drain - wait_s - 0.7, drain - 0.3
    model_drain = drain + timeout + 1  # what the operator derives: the sidecar's drain and shutdown, and a margin
    upstream = model_server(models["mlp"], "mlp", workdir, LEANSERVE_DRAIN_SECONDS=str(model_drain)).start()
    started.append(upstream)
    car = run_sidecar(
        started,
        upstream.url,
        workdir,
        drain_seconds=drain,
        request_timeout_s=timeout,
        max_batch_size=64,
        max_wait_ms=wait_s * 1000,
    )
    path = "/v2/models/mlp/infer"
    body = orjson.dumps(mlp_request(rows(1, seed=9)[0]))
    assert post(car.url + path, body)[0] == 200
    results: list[tuple[str, float, float, object, str]] = []  # (client, start, end, status or error, Connection)
    lock = threading.Lock()
    term: dict[str, float] = {}
    stop_sending = threading.Event()

    def record(client: str, start: float, outcome: object, connection: str = "") -> None:
        with lock:
            results.append((client, start, time.monotonic(), outcome, connection))

    def new_connections(client: str) -> None:
        while not stop_sending.is_set():
            start = time.monotonic()
            try:
                record(client, start, post(car.url + path, body, timeout=15)[0])
            except Exception as exc:  # every failure is a result: the test asserts there are none
                record(client, start, f"{type(exc).__name__}: {exc}")
                time.sleep(0.05)

    def kept_alive() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", car.port, timeout=15)
        while not stop_sending.is_set():
            start = time.monotonic()
            try:
                conn.request("POST", path, body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                record("keep-alive", start, resp.status, resp.getheader("Connection") or "")
            except Exception as exc:
                record("keep-alive", start, f"{type(exc).__name__}: {exc}")
                conn.close()
                time.sleep(0.05)
        conn.close()

    def in_flight_at_the_end() -> None:
        while "at" not in term:
            time.sleep(0.01)
        time.sleep(max(0.0, term["at"] + last_at - time.monotonic()))
        start = time.monotonic()  # its batch waits wait_s: it is still running when the drain ends
        try:
            record("last", start, post(car.url + path, body, timeout=15)[0])
        except Exception as exc:
            record("last", start, f"{type(exc).__name__}: {exc}")

    def probe(url: str) -> int | str:
        try:
            return get(url, timeout=5)[0]
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"

    clients = [threading.Thread(target=new_connections, args=(f"new-{i}",), daemon=True) for i in range(5)]
    clients += [
        threading.Thread(target=kept_alive, daemon=True),
        threading.Thread(target=in_flight_at_the_end, daemon=True),
    ]
    for t in clients:
        t.start()
    readiness: list[tuple[float, int | str]] = []
    try:
        time.sleep(1.0)  # traffic before the signal
        term["at"] = time.monotonic()
        car.proc.send_signal(signal.SIGTERM)
        upstream.proc.send_signal(signal.SIGTERM)
        while time.monotonic() < term["at"] + 1.0:
            readiness.append((time.monotonic() - term["at"], probe(car.url + "/v2/health/ready")))
            time.sleep(0.05)
        live, model_ready = probe(car.url + "/v2/health/live"), probe(upstream.url + "/v2/health/ready")
        time.sleep(max(0.0, term["at"] + stop_at - time.monotonic()))
    finally:
        stop_sending.set()
    car_exit, model_exit = _exit_times([car.proc, upstream.proc], term["at"], model_drain + 5)
    for t in clients:
        t.join(20)

    first_503 = next((t for t, code in readiness if code == 503), None)
    # At once: well within one readiness probe period (5 s), with room for a loaded machine.
    assert first_503 is not None and first_503 < 1.0, f"readiness did not turn 503 at once: {readiness}"
    assert all(code == 503 for t, code in readiness if t >= first_503), readiness
    failed = [r for r in results if r[3] != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
    assert live == 200, "alive while draining"
    assert model_ready == 503, "the model server drains too"
    during = [r for r in results if r[1] > term["at"] + 0.5]
    assert len(during) >= 8, f"too little traffic during the drain: {len(during)} requests"
    (last,) = [r for r in results if r[0] == "last"]
    assert last[2] > term["at"] + drain, "the timed request finished after the drain ended (it was in flight)"
    kept = [r for r in results if r[0] == "keep-alive"]
    assert all(r[4] != "close" for r in kept if r[2] < term["at"]), "connections are kept alive before the drain"
    assert any(r[4] == "close" for r in kept if r[1] > term["at"] + 0.2), "the drain closes kept-alive connections"
    assert car.proc.returncode == 0 and upstream.proc.returncode == 0
    assert drain <= car_exit <= drain + timeout + 2, car_exit
    assert car_exit < model_exit <= model_drain + 3, (car_exit, model_exit)


def _exit_times(procs: list[subprocess.Popen[bytes]], since: float, limit: float) -> list[float]:
    """Seconds from ``since`` until each of ``procs`` exited (polled together; fails past ``limit``)."""
    exits: dict[int, float] = {}
    while len(exits) < len(procs):
        for i, proc in enumerate(procs):
            if i not in exits and proc.poll() is not None:
                exits[i] = time.monotonic() - since
        if time.monotonic() > since + limit:
            for proc in procs:
                proc.kill()
            running = [p.args for p in procs if p.poll() is None]
            raise AssertionError(f"still running {limit:g} s after SIGTERM: {running}")
        time.sleep(0.02)
    return [exits[i] for i in range(len(procs))]


# ---- hostile input ----------------------------------------------------------------------------


def raw_request(url: str, method: str, path: str, body: bytes | None = None, **headers: str) -> tuple[int, str, bytes]:
    """One request sent as given (no client-side normalising of the path): status, content type, body."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


def samples(text: str, name: str, **labels: str) -> list[float]:
    """The values of ``name``'s series that carry ``labels`` (whatever order the exposition writes them in)."""
    found = []
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.startswith(name + "{") and all(f'{k}="{v}"' in series for k, v in labels.items()):
            found.append(float(value))
    return found


def test_unknown_model_names_share_one_metric_label(strict_servers):
    car = strict_servers[1]
    before = sum(
        samples(get(car.url + "/metrics")[1].decode(), "leanserve_requests_total", model="_unknown", code="404")
    )
    for i in range(300):
        assert post(car.url + f"/v2/models/nope-{i}/infer", GOOD)[0] == 404
    _, text = get(car.url + "/metrics")
    lines = text.decode().splitlines()
    assert not [line for line in lines if "nope-" in line]
    series = [line for line in lines if line.startswith("leanserve_requests_total{")]
    assert len(series) <= 10, series
    assert samples(text.decode(), "leanserve_requests_total", model="_unknown", code="404") == [before + 300]


@pytest.mark.parametrize("which", ["sidecar", "model-server"])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/models/..%2F..%2Fmetrics"),
        ("GET", "/v2/models/mlp%2F..%2Fmlp"),
        ("GET", "/v2/models/mlp%2F..%2Fmlp/ready"),
        ("POST", "/v2/models/mlp%2F..%2Fmlp/infer"),
        ("GET", "/v2/models/.."),
        ("GET", "/v2/models/" + "m" * 300),
    ],
    ids=["up-to-metrics", "down-and-up", "ready", "infer", "dot-dot", "too-long"],
)
def test_a_model_name_that_is_not_a_name_is_refused(strict_servers, which, method, path):
    server = strict_servers[1] if which == "sidecar" else strict_servers[0]
    body = orjson.dumps(GOOD) if method == "POST" else None
    status, content_type, raw = raw_request(server.url, method, path, body)
    assert status == 400, raw[:200]
    assert content_type.startswith("application/json")
    assert "invalid model name" in orjson.loads(raw)["error"]


GZIP = {"Content-Encoding": "gzip"}
HOSTILE = {
    "data-nested-1000-deep": (
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": '
        + b"[" * 1000
        + b"1"
        + b"]" * 1000
        + b"}]}",
        {},
        "nested deeper than",
    ),
    "parameters-nested-300-deep": (
        orjson.dumps({**GOOD, "parameters": {"p": 1}}).replace(b'{"p":1}', b'{"p":' * 300 + b"1" + b"}" * 300),
        {},
        "'parameters' nested deeper than",
    ),
    "gzip-header-plain-body": (orjson.dumps(GOOD), GZIP, "gzip"),
}


@pytest.mark.parametrize("which", ["sidecar", "model-server"])
@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_bodies_get_a_400_with_the_v2_error_body(strict_servers, which, case):
    server = strict_servers[1] if which == "sidecar" else strict_servers[0]
    body, headers, reason = HOSTILE[case]
    status, content_type, raw = raw_request(server.url, "POST", "/v2/models/mlp/infer", body, **headers)
    assert status == 400, raw[:300]
    assert content_type.startswith("application/json"), raw[:300]
    assert reason in orjson.loads(raw)["error"]
    assert post(server.url + "/v2/models/mlp/infer", GOOD)[0] == 200


@pytest.mark.parametrize("which", ["sidecar", "model-server"])
def test_a_request_the_http_parser_refuses_gets_the_v2_error_body(strict_servers, which):
    import socket

    server = strict_servers[1] if which == "sidecar" else strict_servers[0]
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nnot a header\r\n\r\n")
        raw = b""
        while chunk := conn.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"400", raw[:300]
    assert b"content-type: application/json" in head.lower(), raw[:300]
    assert orjson.loads(body)["error"]


def test_a_failure_that_is_no_protocol_error_is_counted_with_its_status():
    """An upstream answering outputs without a datatype: the sidecar fails with a 500 and counts a 500."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    async def run() -> tuple[int, dict, str]:
        async def ready(_: web.Request) -> web.Response:
            return web.json_response({"ready": True})

        async def metadata(_: web.Request) -> web.Response:
            return web.json_response(
                {"name": "mlp", "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]}
            )

        async def infer(_: web.Request) -> web.Response:
            return web.json_response({"outputs": [{"name": "logits"}]})

        upstream = web.Application()
        upstream.router.add_get("/v2/health/ready", ready)
        upstream.router.add_get("/v2/models/mlp", metadata)
        upstream.router.add_post("/v2/models/mlp/infer", infer)
        async with TestServer(upstream) as up:
            config = SidecarConfig(upstream=str(up.make_url("")))
            async with TestClient(TestServer(create_app(config))) as client:
                resp = await client.post("/v2/models/mlp/infer", json=mlp_request([0.5] * 64))
                metrics = await (await client.get("/metrics")).text()
                return resp.status, await resp.json(), metrics

    status, body, metrics = asyncio.run(run())
    assert status == 500
    assert body["error"]
    assert samples(metrics, "leanserve_requests_total", model="mlp", code="500") == [1.0]
    assert samples(metrics, "leanserve_requests_total", code="200") == []
