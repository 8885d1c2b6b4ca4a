"""hack/benchload, the serving benchmark's closed-loop load generator, against real servers started here.

The binary is built as benchmarks/serving.py builds it (``benchload_binary``, into .cache/ on first use); an
HTTP server in a thread stands in for the sidecar's REST front door and a generic grpcio server (raw bytes, no
stubs) for its gRPC one, each recording what it received.
"""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from tests.serving_harness import serving_in_thread

REPO = Path(__file__).resolve().parent.parent
SHORT = ["-c", "4", "-warmup", "100ms", "-duration", "300ms"]
BODY = b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [0.5, 1.5]}]}\n\x00\xff'
#: Not text nor a valid request of anything: it must arrive byte for byte.
MESSAGE = bytes(range(256)) * 3 + b"\x00\xff end"


def serving_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serving_benchmark", REPO / "benchmarks" / "serving.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def benchload() -> Path:
    if shutil.which("go") is None:
        pytest.skip("go is not on PATH (scripts/install-system-deps.sh --with-go): hack/benchload cannot be built")
    return serving_benchmark().benchload_binary()


def run_benchload(binary: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60, check=False)


def report_of(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout  # exactly one JSON object
    return json.loads(lines[0])


class Recorder:
    """What a test server received, from its handler threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[Any] = []

    def add(self, item: object) -> None:
        with self.lock:
            self.seen.append(item)


@contextlib.contextmanager
def http_server(status: int) -> Iterator[tuple[str, Recorder]]:
    """An HTTP/1.1 keep-alive server on a free loopback port answering every POST with ``status``; yields its
    URL and what it saw: (method, path, X-Bench header, body) per request."""
    seen = Recorder()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.add(("POST", self.path, self.headers.get("X-Bench"), body))
            answer = b'{"ok": true}' if status == 200 else b"boom: the test server fails on purpose"
            self.send_response(status)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None:
            pass

    with serving_in_thread(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as url:
        yield url + "/v2/models/m/infer", seen


def test_http_mode_sends_the_body_and_headers_as_they_are_and_counts_answers(benchload, tmp_path) -> None:
    body = tmp_path / "body.bin"
    body.write_bytes(BODY)
    with http_server(200) as (url, seen):
        done = run_benchload(benchload, *SHORT, "-url", url, "-body", str(body), "-header", "X-Bench: yes, as is")
    r = report_of(done)
    assert r["completed"] > 0 and r["errors"] == 0 and r["first_error"] == ""
    assert r["workers"] == 4 and r["seconds"] == pytest.approx(0.3)
    assert r["rps"] == pytest.approx(r["completed"] / 0.3)
    assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
    assert r["cpu_seconds"] > 0
    assert seen.seen, "the server saw no request"
    assert set(seen.seen) == {("POST", "/v2/models/m/infer", "yes, as is", BODY)}
    assert len(seen.seen) >= r["completed"]  # warm-up and cut-off calls reached it too, uncounted


def test_http_mode_counts_non_200_answers_as_errors(benchload, tmp_path) -> None:
    body = tmp_path / "body.bin"
    body.write_bytes(BODY)
    with http_server(500) as (url, seen):
        done = run_benchload(benchload, *SHORT, "-url", url, "-body", str(body))
    r = report_of(done)
    assert r["completed"] == 0 and r["errors"] > 0 and r["rps"] == 0
    assert "500" in r["first_error"] and "fails on purpose" in r["first_error"]
    assert r["p50_ms"] is None and r["p99_ms"] is None
    assert seen.seen


def test_a_host_off_loopback_is_refused_before_any_connection(benchload, tmp_path) -> None:
    body = tmp_path / "body.bin"
    body.write_bytes(BODY)
    done = run_benchload(benchload, *SHORT, "-url", "http://10.1.2.3:80/", "-body", str(body), "-timeout", "30s")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "10.1.2.3" in done.stderr and "loopback" in done.stderr
    done = run_benchload(benchload, *SHORT, "-grpc", "10.1.2.3:8001", "-message", str(body))
    assert done.returncode == 2 and "loopback" in done.stderr


def test_usage_errors_exit_2_with_a_message(benchload) -> None:
    done = run_benchload(benchload, *SHORT)
    assert done.returncode == 2 and "-url" in done.stderr and done.stdout == ""
    done = run_benchload(benchload, "-url", "http://127.0.0.1:1/")
    assert done.returncode == 2 and "-body" in done.stderr


def test_grpc_mode_sends_the_message_bytes_and_counts_completions(benchload, tmp_path) -> None:
    message = tmp_path / "request.bin"
    message.write_bytes(MESSAGE)
    seen = Recorder()

    def model_infer(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.add(request)
        return b"\x0a\x01m"  # any bytes: benchload does not parse the answer

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        done = run_benchload(benchload, *SHORT, "-conns", "2", "-grpc", f"127.0.0.1:{port}", "-message", str(message))
    finally:
        server.stop(grace=None)
    r = report_of(done)
    assert r["completed"] > 0 and r["errors"] == 0 and r["first_error"] == ""
    assert 0 < r["p50_ms"] <= r["p99_ms"]
    assert seen.seen and set(seen.seen) == {MESSAGE}


def test_grpc_mode_reports_a_failing_method(benchload, tmp_path) -> None:
    message = tmp_path / "request.bin"
    message.write_bytes(MESSAGE)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))  # no handlers: every method is UNIMPLEMENTED
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        done = run_benchload(benchload, *SHORT, "-grpc", f"127.0.0.1:{port}", "-message", str(message))
    finally:
        server.stop(grace=None)
    r = report_of(done)
    assert r["completed"] == 0 and r["errors"] > 0
    assert "Unimplemented" in r["first_error"]


def test_the_benchmark_reads_the_report_into_its_figures() -> None:
    serving = serving_benchmark()
    report = {"workers": 32, "seconds": 2.0, "completed": 300, "errors": 100, "rps": 150.0}
    report.update(p50_ms=1.5, p95_ms=3.0, p99_ms=4.0, first_error="x", cpu_seconds=0.5)
    assert serving.figures(report) == {
        "rps": 150.0,
        "errors": 0.25,
        "p50_ms": 1.5,
        "p95_ms": 3.0,
        "p99_ms": 4.0,
        "client_cpu": 0.25,
    }
    empty = serving.figures({**report, "completed": 0, "rps": 0.0, "p50_ms": None, "p95_ms": None, "p99_ms": None})
    assert empty["errors"] == 1.0 and empty["p50_ms"] != empty["p50_ms"]  # NaN
