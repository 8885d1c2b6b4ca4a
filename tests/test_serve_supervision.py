"""``leanserve serve`` supervises its model server: a killed one is restarted and the sidecar recovers.

Real processes throughout: the CLI as a subprocess on free ports, its model server killed with SIGKILL
(as the kernel's OOM killer would), and requests through the sidecar's front door.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from leanserve_serving import local
from tests.onnx_models import make_mlp

#: How soon a killed model server must answer again through the sidecar: the first restart's pause
#: (0.5 s) plus a tiny model's start (about a second here), with room for a loaded machine.
RECOVERY_S = 10.0

BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]})


def _infer(url: str) -> int:
    req = urllib.request.Request(url, data=BODY.encode(), method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _model_servers(parent: int) -> list[int]:
    """The pids of ``parent``'s children that are model servers (started by any of its threads)."""
    children = [
        pid for task in Path(f"/proc/{parent}/task").iterdir() for pid in (task / "children").read_text().split()
    ]
    return [
        int(pid) for pid in children if b"leanserve_serving.model_server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def _wait_for(predicate: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``predicate()`` held; fails after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_mlp(tmp_path / "mlp.onnx", sizes=(4, 8, 2))


@pytest.fixture(params=["foreground", "background"])
def serve(model: Path, tmp_path: Path, request: pytest.FixtureRequest):
    """``leanserve serve`` as a subprocess; yields (the process, its infer URL, its stderr file).

    "background" starts it as a shell starts a background job (`leanserve serve &`, nohup, a CI runner):
    with SIGINT ignored, which Python keeps ignored unless the program installs its own handler."""
    exe = shutil.which("leanserve", path=str(Path(sys.executable).parent))
    port = local.free_port()
    stderr = tmp_path / "stderr"
    ignore = request.param == "background"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [exe, "serve", "--model", str(model), "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,  # a process group of its own, as a terminal gives it: Ctrl-C reaches them all
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore else None,
        )
    try:
        local.wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc, timeout=60)
        yield proc, f"http://127.0.0.1:{port}/v2/models/model/infer", stderr
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:  # the whole group: a restarted model server must not outlive the test
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_killed_model_server_is_restarted_and_the_sidecar_recovers(serve):
    proc, url, stderr = serve
    assert _infer(url) == 200
    (first,) = _model_servers(proc.pid)
    os.kill(first, signal.SIGKILL)
    _wait_for(lambda: _infer(url) != 200, timeout=5)  # the sidecar noticed: 503 while it is down
    took = _wait_for(lambda: _infer(url) == 200, timeout=RECOVERY_S)
    (second,) = _model_servers(proc.pid)
    assert second != first
    # The supervisor's own readiness poll may end after the sidecar's health check saw it ready.
    back = f"the model server is back (pid {second})"
    _wait_for(lambda: back in stderr.read_text(), timeout=5)
    log = stderr.read_text()
    assert "the model server was killed by SIGKILL; restarting it in 0.5 s (restart 1)" in log, log
    assert proc.poll() is None
    print(f"answered 200 again {took:.1f} s after the 503s began")


def test_serve_stops_cleanly_on_sigint_without_restarting(serve):
    proc, _, stderr = serve
    (server,) = _model_servers(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the children get it too, and their exit is no failure
    try:
        code = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve did not stop within 20 s of Ctrl-C; its stderr:\n{stderr.read_text()}")
    assert code == 0, stderr.read_text()
    _wait_for(lambda: not Path(f"/proc/{server}").exists() or "Z" in Path(f"/proc/{server}/stat").read_text(), 5)
    assert "restarting" not in stderr.read_text()


def test_supervision_gives_up_after_quick_failures(model, tmp_path):
    """A model server that cannot start again (its file is gone) is retried a bounded number of times."""
    gave_up = threading.Event()
    reasons: list[str] = []
    how = local.Supervision(
        first_backoff_s=0.05,
        max_backoff_s=0.2,
        max_quick_failures=3,
        log=reasons.append,
        on_give_up=lambda reason: gave_up.set(),
    )
    with local.serving_stack(model, "model", max_batch=1, max_wait_ms=0.0, supervision=how) as url:
        assert _infer(url) == 200
        model.unlink()
        (server,) = _model_servers(os.getpid())
        os.kill(server, signal.SIGKILL)
        assert gave_up.wait(60), reasons
        assert _infer(url) == 503
    restarts = [r for r in reasons if "restarting it in" in r]
    assert [r.split("(restart ")[1] for r in restarts] == ["1)", "2)", "3)"]
    assert ["0.1 s" in restarts[1], "0.2 s" in restarts[2]] == [True, True]  # the pause doubles, up to its cap
    assert reasons[-1].startswith("the model server exited with ")
    assert "gave up after 3 restarts in a row failed within 30 s" in reasons[-1]


def test_serve_exits_with_a_clear_error_when_the_model_server_keeps_failing(serve, model):
    proc, _, stderr = serve
    model.unlink()  # no restart can load it again
    (server,) = _model_servers(proc.pid)
    os.kill(server, signal.SIGKILL)
    assert proc.wait(timeout=90) == 1  # five restarts, pauses of 0.5 + 1 + 2 + 4 + 8 s
    last = stderr.read_text().strip().splitlines()[-1]
    assert last.startswith("error: the model server exited with "), last
    assert last.endswith("gave up after 5 restarts in a row failed within 30 s"), last
