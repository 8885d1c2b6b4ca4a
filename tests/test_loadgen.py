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
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from leanserve import loadgen
from leanserve.loadgen import LoadResult, hey_argv, load_test, parse_hey, parse_loadgen

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

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v2/models/m/infer", sent
    finally:
        server.shutdown()
        server.server_close()


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
