"""The serving pod's init step: fetch over real HTTP, check the digest, build the planned variant."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from leanserve_serving.fetch import FetchError, local_path, main, prepare, sha256_of
from leanserve_serving.local import cli_flags
from leanserve_serving.reference_models import ReferenceModel, make_tabular


@pytest.fixture(scope="module")
def tabular(tmp_path_factory: pytest.TempPathFactory) -> ReferenceModel:
    return make_tabular(tmp_path_factory.mktemp("tabular"))


@pytest.fixture(scope="module")
def server(tabular: ReferenceModel) -> Iterator[str]:
    """A real HTTP server (stdlib) serving the model's folder on a free loopback port."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tabular.model.parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def run(path: Path, rows: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: rows})[0]


def test_http_fetch_with_the_right_digest_builds_a_loadable_int8_variant(tabular, server, tmp_path):
    out = prepare(
        f"{server}/{tabular.model.name}", tmp_path / "model.onnx", "int8-dynamic", sha256=sha256_of(tabular.model)
    )
    assert out.read_bytes() != tabular.model.read_bytes(), "quantized, not copied"
    rows = np.load(tabular.evaluation)["input"][:64]
    agree = (run(out, rows).argmax(1) == run(tabular.model, rows).argmax(1)).mean()
    assert agree > 0.9


def test_static_int8_calibrates_on_the_evaluation_data(tabular, server, tmp_path):
    out = prepare(
        f"file://{tabular.model}",
        tmp_path / "model.onnx",
        "int8-static",
        evaluation=f"{server}/{tabular.evaluation.name}",
    )
    assert out.stat().st_size < tabular.model.stat().st_size


def test_a_wrong_digest_is_refused_before_anything_loads_the_file(tabular, server, tmp_path):
    with pytest.raises(FetchError, match=r"does not match spec\.model\.sha256"):
        prepare(f"{server}/{tabular.model.name}", tmp_path / "model.onnx", sha256="0" * 64)
    assert not (tmp_path / "model.onnx").exists()


def test_errors_are_said_plainly_and_exit_nonzero(tabular, server, tmp_path, capsys):
    assert main(["--uri", f"{server}/missing.onnx", "--out", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert "download failed" in err and "404" in err
    with pytest.raises(FetchError, match="not allowed"):
        prepare("ftp://example.com/m.onnx", tmp_path / "m.onnx")
    with pytest.raises(FetchError, match=r"int8-static needs model\.evaluation"):
        prepare(f"file://{tabular.model}", tmp_path / "m.onnx", "int8-static")


def test_pvc_and_configmap_uris_map_to_their_mounts_and_never_escape_them(tmp_path):
    assert local_path("pvc://models/a/b.onnx") == Path("/mnt/pvc/models/a/b.onnx")
    assert local_path("configmap://small-model/model.onnx") == Path("/mnt/configmap/small-model/model.onnx")
    assert local_path("https://example.com/m.onnx") is None
    with pytest.raises(FetchError, match=r"without '\.\.'"):
        local_path("pvc://models/../../etc/passwd")


def test_the_bench_job_writes_its_profile_or_its_failure_to_the_termination_message(tabular, server, tmp_path):
    from leanserve_serving.bench_job import main as bench_main
    from leanserve_serving.profile import Profile

    log = tmp_path / "termination-log"
    args = cli_flags(
        uri=f"{server}/{tabular.model.name}",
        evaluation=f"{server}/{tabular.evaluation.name}",
        instance_type="m5.2xlarge",
        seconds_per_point=0.01,
        max_batch=8,
        termination_log=log,
    )
    assert bench_main(args) == 0
    profile = Profile.from_compact(log.read_text())
    assert profile.instance_type == "m5.2xlarge" and len(log.read_bytes()) <= 4096
    assert bench_main([*args[:1], f"{server}/missing.onnx", *args[2:]]) == 1
    assert log.read_text().startswith("bench failed: ") and "404" in log.read_text()
