"""The sidecar's pass-through: with batching off and no cache, a request goes upstream as it came.

The upstream here is a small recording v2 server (a real HTTP server in a thread) standing for "any v2
server": it keeps the bytes and headers each infer call brought, and answers bytes of its own choosing, so
the tests can see what the sidecar sent and what it relayed. The answers' correctness against ONNX Runtime,
through the pass-through and a real model server, is in test_binary_protocol.py (its ``pass_through`` target).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest

from leanserve_serving.config import SidecarConfig
from leanserve_serving.sidecar import passes_through
from tests.serving_harness import Process, metric, post_raw, serving_in_thread, sidecar

#: The recording upstream's answer: spacing and a key the sidecar would never write, so a relayed answer is
#: told from one the sidecar encoded again.
ANSWER = (
    b'{ "model_name": "m", "served_by": "recorder",  '
    b'"outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [1.5, 2.5]}] }'
)
METADATA = {
    "name": "m",
    "versions": ["1"],
    "platform": "test",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
}


class Recorder(ThreadingHTTPServer):
    """A v2 server that records each infer call and answers :data:`ANSWER` (or ``error``)."""

    def __init__(self, extensions: list[str]) -> None:
        super().__init__(("127.0.0.1", 0), RecorderHandler)
        self.extensions = extensions
        self.calls: list[tuple[bytes, dict[str, str]]] = []
        self.error: tuple[int, bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class RecorderHandler(BaseHTTPRequestHandler):
    server: Recorder

    def log_message(self, *_: Any) -> None:  # quiet
        pass

    def answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # http.server's names
        if self.path == "/v2":
            self.answer(200, orjson.dumps({"name": "recorder", "extensions": self.server.extensions}))
        elif self.path == "/v2/models/m":
            self.answer(200, orjson.dumps(METADATA))
        elif self.path in ("/v2/health/ready", "/v2/health/live"):
            self.answer(200, b'{"ready": true}')
        else:
            self.answer(404, b'{"error": "unknown model"}')

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path != "/v2/models/m/infer":
            self.answer(404, b'{"error": "unknown model"}')
            return
        self.server.calls.append((body, dict(self.headers)))
        if self.server.error is not None:
            self.answer(*self.server.error)
        else:
            self.answer(200, ANSWER)


@pytest.fixture
def recorder(request: pytest.FixtureRequest) -> Iterator[Recorder]:
    server = Recorder(getattr(request, "param", ["binary_tensor_data"]))
    with serving_in_thread(server):
        yield server


@pytest.fixture
def front(recorder: Recorder, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Process]:
    """A sidecar in front of the recorder: batching off (the pass-through) unless the test asks for batches."""
    settings = getattr(request, "param", {"max_batch_size": 1})
    car = sidecar(recorder.url, tmp_path, **settings).start("/v2/health/ready")
    yield car
    car.stop()


#: A JSON body as a client may write it: its own spacing and key order, an id, a parameter the sidecar ignores.
CLIENT_BODY = (
    b'{"id": "r-1", "parameters": {"custom": 7},\n '
    b'"inputs": [{"shape": [1, 2], "name": "x", "datatype": "FP32", "data": [0.25, 1e-3]}]}'
)
JSON = {"Content-Type": "application/json"}


def infer(front: Process, body: bytes = CLIENT_BODY, headers: dict[str, str] = JSON) -> tuple[int, bytes, dict]:
    return post_raw(front.url + "/v2/models/m/infer", body, headers)


@pytest.mark.parametrize(
    ("settings", "relays"),
    [
        ({"max_batch_size": 1}, True),
        ({"max_batch_size": 16}, False),  # requests are merged: their tensors are needed
        ({"max_batch_size": 1, "redis_url": "redis://127.0.0.1:6379/0"}, False),  # cache keys need the tensors
    ],
)
def test_requests_pass_through_only_with_batching_off_and_no_cache(settings: dict[str, Any], relays: bool) -> None:
    assert passes_through(SidecarConfig(**settings)) is relays


def test_the_upstream_gets_the_clients_bytes_and_the_client_the_upstreams(recorder: Recorder, front: Process):
    status, raw, headers = infer(front)
    assert status == 200, raw
    assert raw == ANSWER  # as the upstream wrote it (the sidecar would neither keep "served_by" nor this spacing)
    assert headers["X-Leanserve-Source"] == "model"
    assert [body for body, _ in recorder.calls] == [CLIENT_BODY]
    assert metric(front.url, "leanserve_requests_total", 'code="200",model="m"') == 1
    assert metric(front.url, "leanserve_batch_size_count", 'model="m"') == 1  # one upstream call of one request


@pytest.mark.parametrize("front", [{"max_batch_size": 4, "max_wait_ms": 1}], indirect=True)
def test_with_batching_on_the_sidecar_decodes_and_writes_requests_and_answers_itself(recorder, front):
    """The contrast that makes the test above mean something: batching on, nothing goes through as it came."""
    status, raw, _ = infer(front)
    assert status == 200, raw
    assert raw != ANSWER and orjson.loads(raw)["outputs"][0]["data"] == [1.5, 2.5]
    assert recorder.calls[0][0] != CLIENT_BODY


def binary_body() -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}}]}
    ).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return header + b"\x00\x00\x80\x3e\x6f\x12\x83\x3a", headers  # 0.25 and 1e-3, little-endian FP32


def test_a_binary_request_passes_through_with_its_header_length(recorder: Recorder, front: Process):
    body, headers = binary_body()
    status, raw, _ = infer(front, body, headers)
    assert status == 200, raw
    sent, seen = recorder.calls[0]
    assert sent == body and seen["Inference-Header-Content-Length"] == headers["Inference-Header-Content-Length"]


@pytest.mark.parametrize("recorder", [[]], indirect=True)
def test_a_binary_request_to_an_upstream_without_the_extension_is_decoded_and_sent_in_json(recorder, front):
    body, headers = binary_body()
    status, raw, _ = infer(front, body, headers)
    assert status == 200, raw
    sent, seen = recorder.calls[0]
    assert "Inference-Header-Content-Length" not in seen
    assert orjson.loads(sent)["inputs"][0]["data"] == pytest.approx([0.25, 1e-3])


def test_a_header_length_past_the_body_is_refused_by_the_sidecar_and_never_sent(recorder: Recorder, front):
    body, headers = binary_body()
    status, raw, _ = infer(front, body, {**headers, "Inference-Header-Content-Length": str(len(body) + 1)})
    assert status == 400 and "past the body" in orjson.loads(raw)["error"]
    assert recorder.calls == []


@pytest.mark.parametrize(
    ("upstream_status", "client_status"),
    [(400, 400), (422, 422), (500, 502)],  # the upstream's client errors are the client's; its faults are 502
)
def test_upstream_errors_reach_the_client_with_their_reason(recorder, front, upstream_status, client_status):
    recorder.error = (upstream_status, b'{"error": "input x: not what the model takes"}')
    status, raw, _ = infer(front)
    assert status == client_status
    assert orjson.loads(raw)["error"] == "input x: not what the model takes"


def test_an_unknown_model_is_a_404_without_an_infer_call(recorder: Recorder, front: Process):
    status, raw, _ = post_raw(front.url + "/v2/models/other/infer", CLIENT_BODY, JSON)
    assert status == 404 and "unknown model" in orjson.loads(raw)["error"]
    assert recorder.calls == []
