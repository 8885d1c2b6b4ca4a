"""Shedding before decoding, a queue bounded by time, and no upstream work for callers that are gone.

A real model server (ONNX Runtime) frozen with SIGSTOP plays a stuck upstream: it keeps its sockets, so the
sidecar's calls connect and wait, as they would on a model server in a long pause.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.onnx_models import make_mlp
from tests.serving_harness import Process, frozen, get, metric, mlp_request, model_server, post, sidecar, until

BODY = mlp_request([0.5] * 64)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("admission")


@pytest.fixture
def upstream(workdir: Path) -> Iterator[Process]:
    """A model server of its own per test (each test freezes it)."""
    proc = model_server(make_mlp(workdir / "mlp.onnx"), "mlp", workdir).start()
    yield proc
    proc.stop(kill=True)


def run_sidecar(started: list[Process], upstream: Process, workdir: Path, **settings: object) -> Process:
    """A sidecar sending one request at a time upstream (batches of one, one in flight)."""
    settings = {"max_batch_size": 1, "upstream_concurrency": 1, **settings}
    car = sidecar(upstream.url, workdir, **settings).start()
    started.append(car)
    assert post(car.url + "/v2/models/mlp/infer", BODY)[0] == 200  # the model's inputs are read, a batch timed
    return car


def queue_depth(car: Process) -> float:
    return metric(car.url, "leanserve_queue_depth", 'model="mlp"')


def sent_upstream(car: Process) -> float:
    """Upstream calls the sidecar made (each call is one observation of the batch size)."""
    return metric(car.url, "leanserve_batch_size_count", 'model="mlp"')


def test_a_full_queue_refuses_before_the_body_is_read(upstream, workdir, started):
    """With the queue full, a body that is not even JSON is answered 429, not 400: it was never decoded."""
    car = run_sidecar(started, upstream, workdir, max_queue=2, request_timeout_s=30)
    infer = car.url + "/v2/models/mlp/infer"
    with ThreadPoolExecutor(max_workers=3) as pool, frozen(upstream):
        waiting = [pool.submit(post, infer, BODY, 40) for _ in range(3)]  # one in flight, two queued
        try:
            until(lambda: queue_depth(car) == 2, timeout=30, what="two requests queued")
        except AssertionError as exc:  # what the sidecar saw, for a failure on a loaded machine
            seen = [line for line in get(car.url + "/metrics")[1].decode().splitlines() if "leanserve_" in line]
            done = [f.result()[0] if f.done() else "pending" for f in waiting]
            raise AssertionError(f"{exc}; answers {done}; sidecar metrics:\n" + "\n".join(seen)) from None
        for _ in range(20):
            status, err, headers = post(infer, b'{"inputs": [ not json')
            assert status == 429, err
            assert err["error"] == "queue full (2 requests waiting); retry shortly"
            assert headers["Retry-After"] == "1"
    assert [f.result()[0] for f in waiting] == [200, 200, 200]
    assert metric(car.url, "leanserve_requests_total", 'code="400",model="_unknown"') == 0
    assert metric(car.url, "leanserve_requests_total", 'code="400",model="mlp"') == 0
    assert post(infer, b'{"inputs": [ not json')[0] == 400  # decoded again once there is room


def test_a_queue_that_cannot_answer_in_time_refuses_at_once(upstream, workdir, started):
    """The queue is nearly empty but its upstream has not answered for longer than the allowed wait."""
    car = run_sidecar(started, upstream, workdir, max_queue_wait_s=1.0, request_timeout_s=30)
    infer = car.url + "/v2/models/mlp/infer"
    with ThreadPoolExecutor(max_workers=1) as pool, frozen(upstream):
        stuck: Future = pool.submit(post, infer, BODY, 40)
        until(lambda: sent_upstream(car) == 2, what="the second request in flight")
        threading.Event().wait(1.5)  # the call in flight has now taken longer than max_queue_wait_s
        status, err, headers = post(infer, BODY)
        assert status == 429, err
        assert err["error"].startswith("queue too slow (expected wait ")
        assert headers["Retry-After"] == "1"
    assert stuck.result()[0] == 200
    assert sent_upstream(car) == 2  # the refused one never went upstream


def test_requests_past_their_deadline_are_not_sent_upstream(upstream, workdir, started):
    """The model server freezes with one call in flight; four requests queue 0.5 s later. The call in flight
    times out at 1 s and the first queued request, 0.5 s from its deadline, goes next; when that call times out
    too, the other three are past their deadlines and are not sent (before, each freed slot sent one more)."""
    # Admission by expected wait would refuse the four at once: allowed here, the deadlines are under test.
    car = run_sidecar(started, upstream, workdir, request_timeout_s=1.0, max_queue_wait_s=60)
    infer = car.url + "/v2/models/mlp/infer"
    with ThreadPoolExecutor(max_workers=5) as pool, frozen(upstream):
        first = pool.submit(post, infer, BODY, 30)
        until(lambda: sent_upstream(car) == 2, what="the first request in flight")
        threading.Event().wait(0.5)
        queued = [pool.submit(post, infer, BODY, 30) for _ in range(4)]
        assert [f.result()[0] for f in [first, *queued]] == [504] * 5
        threading.Event().wait(2.0)  # before, a stale request was sent each time a call timed out
    assert post(infer, BODY)[0] == 200
    assert sent_upstream(car) == 1 + 2 + 1  # the first request, the two in time, the last


def test_requests_whose_caller_has_gone_are_not_sent_upstream(upstream, workdir, started):
    """Five callers give up after 0.3 s (their own timeout, shorter than the sidecar's): the sidecar drops the
    four still queued; when the model server resumes, only the call already in flight was made."""
    car = run_sidecar(started, upstream, workdir, request_timeout_s=30)
    infer = car.url + "/v2/models/mlp/infer"

    def impatient(_: int) -> str:
        try:
            return str(post(infer, BODY, 0.3)[0])
        except OSError as exc:  # the client's timeout
            return type(exc).__name__

    with ThreadPoolExecutor(max_workers=5) as pool, frozen(upstream):
        gave_up = list(pool.map(impatient, range(5)))
        assert gave_up == ["TimeoutError"] * 5
        until(lambda: metric(car.url, "leanserve_requests_total", 'code="499",model="mlp"') == 5, what="5 gone")
    assert post(infer, BODY)[0] == 200
    assert sent_upstream(car) == 1 + 1 + 1  # the first request, the one in flight when frozen, the last
