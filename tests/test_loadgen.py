"""The load generator adapter: hey's text report and hack/loadgen's JSON line read into a LoadResult.

The hey reports under tests/fixtures/hey/ are real captures (see its README); where hey is installed, one
test also runs it, through :func:`load_test`, against a local HTTP server that counts what it answered.
"""

from __future__ import annotations

import http.server
import itertools
import json
import math
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from leanserve import loadgen
from leanserve.loadgen import LoadResult, hey_argv, load_test, parse_hey, parse_loadgen
from tests.serving_harness import serving_in_thread

HEY_REPORTS = Path(__file__).parent / "fixtures" / "hey"


def test_parse_hey_reads_rate_percentiles_and_status_codes() -> None:
    r = parse_hey((HEY_REPORTS / "status-and-transport-errors.txt").read_text(), offered_rps=100)
    assert r.offered_rps == 100
    assert r.achieved_rps == pytest.approx(53.8273)
    assert (r.p50_ms, r.p95_ms, r.p99_ms) == pytest.approx((44.0, 48.0, 56.3))
    assert r.errors == pytest.approx(40 / 200)  # 20 answered 503, 20 not answered (EOF)


def test_parse_hey_gives_nan_for_a_percentile_hey_left_out() -> None:
    r = parse_hey((HEY_REPORTS / "short-run-no-p99.txt").read_text(), offered_rps=40)
    assert (r.p50_ms, r.p95_ms) == pytest.approx((1.5, 29.0))
    assert math.isnan(r.p99_ms)
    assert r.errors == pytest.approx(11 / 80)


def test_parse_hey_counts_a_run_without_responses_as_all_errors() -> None:
    report = (HEY_REPORTS / "connection-refused.txt").read_text()
    r = parse_hey(report, offered_rps=40)
    assert r.errors == 1.0
    assert parse_hey(report.replace("[10]", "[0]"), offered_rps=40).errors == 1.0  # nothing counted at all
    assert math.isnan(r.p50_ms) and math.isnan(r.p95_ms)


def test_parse_hey_rejects_what_is_not_a_hey_report() -> None:
    with pytest.raises(ValueError, match="not a hey report"):
        parse_hey("Usage: hey [options...] <url>\n", offered_rps=1)


def test_parse_loadgen_reads_its_json_line_with_errors_over_sent() -> None:
    line = json.dumps(
        {
            "offered_rps": 50,
            "sent": 58,
            "completed": 50,
            "errors": 8,
            "achieved_rps": 50.76063192755343,
            "p50_ms": 1.764,
            "p95_ms": 3.035,
            "p99_ms": 3.792,
            "quantiles_ms": [0.893] * 101,
        }
    )
    r = parse_loadgen(line, offered_rps=50)
    assert r == LoadResult(
        offered_rps=50, achieved_rps=50.76063192755343, p50_ms=1.764, p95_ms=3.035, p99_ms=3.792, errors=8 / 58
    )


def test_hey_argv_gives_a_worker_per_ten_requests_per_second_each_at_its_share() -> None:
    argv = hey_argv("hey", url="http://127.0.0.1:1/", body=Path("b.json"), rate=347.0, seconds=15)
    assert argv[:7] == ["hey", "-z", "15s", "-c", "34", "-q", f"{347 / 34:.3f}"]
    assert argv[-1] == "http://127.0.0.1:1/"
    assert hey_argv("hey", url="u", body=Path("b"), rate=3.0, seconds=1)[4] == "1"
    assert hey_argv("hey", url="u", body=Path("b"), rate=5000.0, seconds=1)[4] == "64"


@pytest.fixture
def counting_server() -> Iterator[tuple[str, Counter[int]]]:
    """A loopback HTTP server answering every fourth POST with 503, the rest with 200; yields (url, codes sent)."""
    sent: Counter[int] = Counter()
    numbers = itertools.count()
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with lock:
                code = 503 if next(numbers) % 4 == 3 else 200
                sent[code] += 1
            body = b'{"outputs": []}'
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with serving_in_thread(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as url:
        yield url + "/v2/models/m/infer", sent


@pytest.mark.skipif(shutil.which("hey") is None, reason="hey is not installed (apt-get install hey)")
def test_load_test_with_real_hey_reports_what_the_server_answered(
    counting_server: tuple[str, Counter[int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, sent = counting_server
    monkeypatch.setattr(loadgen, "poisson_loadgen", lambda: None)  # hey even where Go could build hack/loadgen
    body = tmp_path / "request.json"
    body.write_text('{"inputs": []}')
    r = load_test(url, body, rate=40, seconds=1)
    total = sum(sent.values())
    assert total > 0
    assert r.offered_rps == 40
    assert r.errors == pytest.approx(sent[503] / total)
    assert 0 < r.achieved_rps <= 60
    assert 0 < r.p50_ms <= r.p95_ms < 1000


@pytest.fixture
def recording_server() -> Iterator[tuple[str, list[bytes]]]:
    """A loopback HTTP server answering every POST with 200; yields (url, the bodies received, in order)."""
    received: list[bytes] = []
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with lock:
                received.append(body)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v2/models/m/infer", received
    finally:
        server.shutdown()
        server.server_close()


def built_loadgen() -> Path:
    binary = loadgen.poisson_loadgen()
    if binary is None:
        pytest.fail("hack/loadgen could not be built: this test needs Go (make test checks for it)", pytrace=False)
    return binary


def run_loadgen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(built_loadgen()), *args], capture_output=True, text=True, timeout=60, check=False)


def test_loadgen_sends_line_i_mod_n_of_a_bodies_file_to_request_i(
    recording_server: tuple[str, list[bytes]], tmp_path: Path
) -> None:
    """Distinct lines, more than requests: each request sent its own line, in order (requests in flight at the
    same moment may reach the server a place or two apart); then three lines, sent over and over."""
    url, received = recording_server
    many = tmp_path / "many.jsonl"
    many.write_text("".join(f'{{"i": {i}}}\n' for i in range(1000)) + "\n")  # a blank line is skipped
    proc = run_loadgen("-url", url, "-bodies", str(many), "-rate", "40", "-duration", "1s")
    assert proc.returncode == 0, proc.stderr
    sent = json.loads(proc.stdout)["sent"]
    order = [json.loads(b)["i"] for b in received]
    assert sent > 10 and sorted(order) == list(range(sent))
    assert all(abs(position - i) <= 3 for position, i in enumerate(order)), order

    received.clear()
    three = tmp_path / "three.jsonl"
    three.write_text('{"i": 0}\n{"i": 1}\n{"i": 2}')  # no newline after the last line
    proc = run_loadgen("-url", url, "-bodies", str(three), "-rate", "60", "-duration", "0.5s")
    assert proc.returncode == 0, proc.stderr
    sent = json.loads(proc.stdout)["sent"]
    counts = Counter(json.loads(b)["i"] for b in received)
    assert counts == Counter(i % 3 for i in range(sent))


def test_loadgen_refuses_a_bodies_file_with_a_line_that_is_not_json(tmp_path: Path) -> None:
    bodies = tmp_path / "bodies.jsonl"
    bodies.write_text('{"i": 0}\n{"i": \n')
    proc = run_loadgen("-url", "http://127.0.0.1:9/", "-bodies", str(bodies), "-duration", "1ms")
    assert proc.returncode == 2
    assert f"{bodies}:2: not a JSON document" in proc.stderr
    body = tmp_path / "body.json"
    body.write_text("{}")
    proc = run_loadgen("-url", "http://127.0.0.1:9/", "-body", str(body), "-bodies", str(bodies))
    assert proc.returncode == 2 and "not both" in proc.stderr


def test_load_test_offers_a_bodies_file_through_hack_loadgen(
    recording_server: tuple[str, list[bytes]], tmp_path: Path
) -> None:
    url, received = recording_server
    built_loadgen()
    bodies = tmp_path / "bodies.jsonl"
    bodies.write_text('{"n": "a"}\n{"n": "b"}\n')
    r = load_test(url, None, rate=40, seconds=0.5, bodies=bodies)
    assert r.errors == 0 and r.achieved_rps > 0
    assert Counter(json.loads(b)["n"] for b in received) == Counter("ab"[i % 2] for i in range(len(received)))
    with pytest.raises(ValueError, match="not both"):
        load_test(url, bodies, rate=1, seconds=1, bodies=bodies)
    with pytest.raises(ValueError, match="nor neither"):
        load_test(url, None, rate=1, seconds=1)


def test_a_loadgen_binary_built_from_older_sources_is_never_reused(tmp_path: Path) -> None:
    """The cached binary is named after its Go sources: one built before ``-bodies`` existed has another name."""
    source = tmp_path / "loadgen"
    shutil.copytree(loadgen.LOADGEN_SOURCE, source)
    before = loadgen.loadgen_binary(source)
    assert before == loadgen.loadgen_binary(source)
    assert before.parent == loadgen.LOADGEN_DIR and before.name.startswith("loadgen-")
    (source / "main_test.go").write_text("package main\n")  # tests are not part of the binary
    assert loadgen.loadgen_binary(source) == before
    main = source / "main.go"
    main.write_text(main.read_text().replace("-bodies", "-requests"))
    assert loadgen.loadgen_binary(source) != before
