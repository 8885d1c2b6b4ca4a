"""The sidecar's v2 gRPC service, through tritonclient.grpc with its defaults: real model-server, sidecar and
Redis processes on loopback, answers checked against ONNX Runtime run here on the same inputs.

This process never imports leanserve_serving.grpc_service: its generated modules and tritonclient's register
the same ``inference`` package in protobuf's default pool, which refuses a second definition.
"""

from __future__ import annotations

import asyncio
import filecmp
import os
import queue
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from leanserve.local_stack import free_port
from leanserve_serving.sidecar import GRPC_EXPERIMENTS
from tests.onnx_models import make_mlp, make_text
from tests.serving_harness import Process, get, metric, mlp_request, post, sidecar

REPO = Path(__file__).resolve().parent.parent
PROTO = REPO / "serving_image" / "leanserve_serving" / "proto"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("grpc")


@pytest.fixture(scope="module")
def models(workdir: Path) -> dict[str, Path]:
    return {"mlp": make_mlp(workdir / "mlp.onnx"), "text": make_text(workdir / "text.onnx")}


def grpc_sidecar(upstream: Process, workdir: Path, **settings: Any) -> Process:
    """A sidecar serving gRPC on a free port (``grpc_port`` of its settings) besides REST."""
    return sidecar(upstream.url, workdir, grpc_port=free_port(), **settings).start()


def grpc_url(proc: Process) -> str:
    return f"127.0.0.1:{proc.env['LEANSERVE_GRPC_PORT']}"


@pytest.fixture(scope="module")
def mlp_sidecar(servers: dict[str, Process], workdir: Path) -> Iterator[Process]:
    proc = grpc_sidecar(servers["mlp"], workdir)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def text_sidecar(servers: dict[str, Process], workdir: Path) -> Iterator[Process]:
    proc = grpc_sidecar(servers["text"], workdir)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def mlp_session(models: dict[str, Path]) -> ort.InferenceSession:
    return ort.InferenceSession(str(models["mlp"]), providers=["CPUExecutionProvider"])


def rows(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, 64)).astype(np.float32)


def mlp_input(x: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # raw_input_contents: tritonclient's default
    return tensor


def expected(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return session.run(None, {"input": x})[0]


def assert_answer(session: ort.InferenceSession, x: np.ndarray, got: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == (x.shape[0], 2)
    np.testing.assert_allclose(got, expected(session, x), rtol=1e-5, atol=1e-6)


def requests_counted(proc: Process, model: str, code: int) -> float:
    """``leanserve_requests_total`` of one model and status code (the series REST requests are counted in)."""
    text = get(proc.url + "/metrics")[1].decode()
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if (
            series.startswith("leanserve_requests_total{")
            and f'model="{model}"' in series
            and f'code="{code}"' in series
        ):
            return float(value)
    return 0.0


def test_the_committed_modules_are_what_the_proto_generates(tmp_path: Path):
    """hack/gen-proto.sh over the committed .proto writes exactly the committed modules: nobody edited them,
    and nobody changed the .proto without regenerating."""
    subprocess.run(
        ["bash", str(REPO / "hack" / "gen-proto.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    fresh = tmp_path / "leanserve_serving" / "proto"
    generated = sorted(p.name for p in fresh.iterdir())
    assert generated == ["grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py"]
    _, mismatch, errors = filecmp.cmpfiles(fresh, PROTO, generated, shallow=False)
    assert mismatch == [] and errors == [], f"stale generated modules: {mismatch + errors}; run hack/gen-proto.sh"


def test_the_proto_declares_the_messages_tritonclient_sends_with_the_same_fields():
    """tritonclient speaks Triton's service: every message of ours must have Triton's field names, numbers and
    types (Triton's may have more messages; ours need no more fields than it sends). Read in a subprocess:
    the two definitions of package ``inference`` cannot share this process's protobuf pool."""
    script = (
        "import json\n"
        "from leanserve_serving.proto import grpc_predict_v2_pb2 as ours\n"
        "def fields(d): return {f.name: [f.number, f.type, f.is_repeated] for f in d.fields}\n"
        "def walk(d, out):\n"
        "    out[d.full_name] = fields(d)\n"
        "    for n in d.nested_types: walk(n, out)\n"
        "out = {}\n"
        "for m in ours.DESCRIPTOR.message_types_by_name.values(): walk(m, out)\n"
        "methods = {m.name: [m.input_type.full_name, m.output_type.full_name]\n"
        "           for m in ours.DESCRIPTOR.services_by_name['GRPCInferenceService'].methods}\n"
        "print(json.dumps({'messages': out, 'methods': methods}))\n"
    )
    ours = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    import json

    from tritonclient.grpc import service_pb2 as triton

    declared = json.loads(ours)
    pool = triton.DESCRIPTOR.pool
    for full_name, fields in declared["messages"].items():
        theirs = pool.FindMessageTypeByName(full_name)
        assert {f.name: [f.number, f.type, f.is_repeated] for f in theirs.fields} == fields, full_name
    service = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for name, (request, response) in declared["methods"].items():
        method = service.methods_by_name[name]
        assert [method.input_type.full_name, method.output_type.full_name] == [request, response]
    assert set(declared["methods"]) == {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
    }


def test_health_and_metadata_answer_as_rest_does(mlp_sidecar: Process):
    client = grpcclient.InferenceServerClient(grpc_url(mlp_sidecar))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp") and not client.is_model_ready("nope")
    server = client.get_server_metadata(as_json=True)
    status, rest = get(mlp_sidecar.url + "/v2")  # the upstream's server metadata, as gRPC's must be
    assert status == 200 and server["name"] == rest["name"] and server["version"] == rest["version"]
    assert server.get("extensions", []) == rest.get("extensions", [])
    model = client.get_model_metadata("mlp", as_json=True)
    assert model["name"] == "mlp" and model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert model["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "2"]}]
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("nope")
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as invalid:
        client.get_model_metadata("../metrics")
    assert invalid.value.status() == "StatusCode.INVALID_ARGUMENT" and "invalid model name" in invalid.value.message()


def test_fp32_answers_equal_onnxruntimes_and_are_counted_with_rest(mlp_sidecar: Process, mlp_session):
    client = grpcclient.InferenceServerClient(grpc_url(mlp_sidecar))
    before = requests_counted(mlp_sidecar, "mlp", 200)
    for count in (1, 3):
        x = rows(count, seed=count)
        result = client.infer("mlp", [mlp_input(x)], request_id=f"r{count}")
        assert_answer(mlp_session, x, result.as_numpy("logits"))
        response = result.get_response()
        assert response.id == f"r{count}" and response.model_name == "mlp" and response.model_version == "1"
        assert len(response.raw_output_contents) == 1  # outputs travel raw, as Triton sends them
    assert requests_counted(mlp_sidecar, "mlp", 200) == before + 2


def stub(proc: Process) -> service_pb2_grpc.GRPCInferenceServiceStub:
    """tritonclient's generated stub: requests as a client that builds its own messages sends them."""
    return service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(grpc_url(proc)))


def test_bytes_inputs_raw_and_typed_answer_as_the_model(text_sidecar: Process):
    client = grpcclient.InferenceServerClient(grpc_url(text_sidecar))
    tensor = grpcclient.InferInput("text", [3], "BYTES")
    tensor.set_data_from_numpy(np.array(["hello", "World 42", ""], dtype=object))
    result = client.infer("text", [tensor])
    assert result.as_numpy("normalized").tolist() == [b"HELLO", b"WORLD 42", b""]
    # typed contents (bytes_contents), as a client that does not use raw contents sends them
    typed = service_pb2.ModelInferRequest(model_name="text")
    typed.inputs.add(name="text", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"typed", b"too"])
    response = stub(text_sidecar).ModelInfer(typed, timeout=10)
    (output,) = response.outputs
    assert output.name == "normalized" and output.datatype == "BYTES" and list(output.shape) == [2]
    assert response.raw_output_contents[0] == b"\x05\x00\x00\x00TYPED\x03\x00\x00\x00TOO"


def test_typed_fp32_contents_answer_as_raw_ones(mlp_sidecar: Process, mlp_session):
    x = rows(2, seed=7)
    typed = service_pb2.ModelInferRequest(model_name="mlp")
    typed.inputs.add(name="input", datatype="FP32", shape=[2, 64]).contents.fp32_contents.extend(x.ravel().tolist())
    response = stub(mlp_sidecar).ModelInfer(typed, timeout=10)
    got = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))
    assert_answer(mlp_session, x, got)
    # an INT8 typed value out of its range is refused, never wrapped (int_contents are 32-bit)
    wrapped = service_pb2.ModelInferRequest(model_name="mlp")
    wrapped.inputs.add(name="input", datatype="INT8", shape=[1]).contents.int_contents.append(300)
    with pytest.raises(grpc.RpcError) as refused:
        stub(mlp_sidecar).ModelInfer(wrapped, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "300" in refused.value.details()


def test_async_infer_and_concurrent_calls_all_answer_right(mlp_sidecar: Process, mlp_session):
    client = grpcclient.InferenceServerClient(grpc_url(mlp_sidecar))
    answers: queue.Queue[tuple[int, Any, Any]] = queue.Queue()
    inputs = {i: rows(1, seed=100 + i) for i in range(8)}
    for i, x in inputs.items():
        client.async_infer("mlp", [mlp_input(x)], lambda result, error, i=i: answers.put((i, result, error)))
    for _ in inputs:
        i, result, error = answers.get(timeout=10)
        assert error is None
        assert_answer(mlp_session, inputs[i], result.as_numpy("logits"))

    async def many() -> list[Any]:
        async with grpcclient_aio.InferenceServerClient(grpc_url(mlp_sidecar)) as aio:
            xs = [rows(1, seed=200 + i) for i in range(32)]
            results = await asyncio.gather(*(aio.infer("mlp", [mlp_input(x)]) for x in xs))
            return list(zip(xs, results, strict=True))

    for x, result in asyncio.run(many()):
        assert_answer(mlp_session, x, result.as_numpy("logits"))


def test_grpc_and_rest_requests_share_one_batch(servers: dict[str, Process], workdir: Path, mlp_session):
    """A batch of 8 leaves when full, or after 5 s: 4 gRPC and 4 REST requests sent together are answered
    well before that, in one batch of 8, each with its own rows."""
    proc = grpc_sidecar(servers["mlp"], workdir, max_batch_size=8, max_wait_ms=5000)
    try:
        client = grpcclient.InferenceServerClient(grpc_url(proc))
        grpc_rows = [rows(1, seed=300 + i) for i in range(4)]
        rest_rows = [rows(1, seed=400 + i) for i in range(4)]
        start = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            grpc_futures = [pool.submit(client.infer, "mlp", [mlp_input(x)]) for x in grpc_rows]
            rest_futures = [
                pool.submit(post, proc.url + "/v2/models/mlp/infer", mlp_request(x[0].tolist())) for x in rest_rows
            ]
            grpc_answers = [f.result(timeout=10).as_numpy("logits") for f in grpc_futures]
            rest_answers = [f.result(timeout=10) for f in rest_futures]
        assert time.monotonic() - start < 4
        for x, got in zip(grpc_rows, grpc_answers, strict=True):
            assert_answer(mlp_session, x, got)
        for x, (status, body, _) in zip(rest_rows, rest_answers, strict=True):
            assert status == 200
            assert_answer(mlp_session, x, np.asarray(body["outputs"][0]["data"], np.float32).reshape(1, 2))
        assert metric(proc.url, "leanserve_batch_size_count", 'model="mlp"') == 1
        assert metric(proc.url, "leanserve_batch_size_sum", 'model="mlp"') == 8
    finally:
        proc.stop()


def test_errors_have_their_grpc_codes_and_fail_nothing_else_in_the_batch(
    servers: dict[str, Process], workdir: Path, mlp_session
):
    proc = grpc_sidecar(servers["mlp"], workdir, max_batch_size=4, max_wait_ms=300)
    try:
        client = grpcclient.InferenceServerClient(grpc_url(proc))
        with pytest.raises(InferenceServerException) as unknown:
            client.infer("nope", [mlp_input(rows(1))])
        assert unknown.value.status() == "StatusCode.NOT_FOUND" and "nope" in unknown.value.message()
        assert requests_counted(proc, "_unknown", 404) == 1

        def bad() -> Any:
            return client.infer("mlp", [mlp_input(np.zeros((1, 63), np.float32))])

        good_rows = [rows(1, seed=500 + i) for i in range(3)]
        with ThreadPoolExecutor(4) as pool:
            bad_future = pool.submit(bad)
            good_futures = [pool.submit(client.infer, "mlp", [mlp_input(x)]) for x in good_rows]
            with pytest.raises(InferenceServerException) as shape:
                bad_future.result(timeout=10)
            good = [f.result(timeout=10).as_numpy("logits") for f in good_futures]
        assert shape.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "input 'input' has shape [1, 63], the model expects [-1, 64]" in shape.value.message()
        for x, got in zip(good_rows, good, strict=True):
            assert_answer(mlp_session, x, got)
        assert requests_counted(proc, "mlp", 400) == 1

        # raw contents of the wrong size name the sizes
        short = service_pb2.ModelInferRequest(model_name="mlp", raw_input_contents=[bytes(252)])
        short.inputs.add(name="input", datatype="FP32", shape=[1, 64])
        with pytest.raises(grpc.RpcError) as size:
            stub(proc).ModelInfer(short, timeout=10)
        assert size.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "252" in size.value.details() and "256" in size.value.details()
        # an extension the sidecar does not implement is named, not ignored
        with pytest.raises(InferenceServerException) as classification:
            client.infer(
                "mlp", [mlp_input(rows(1))], outputs=[grpcclient.InferRequestedOutput("logits", class_count=1)]
            )
        assert classification.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "classification" in classification.value.message()
    finally:
        proc.stop()


def test_a_grpc_request_is_answered_from_the_exact_cache_a_rest_request_filled(
    servers: dict[str, Process], redis: Process, workdir: Path, mlp_session
):
    proc = grpc_sidecar(servers["mlp"], workdir, redis_url=f"redis://127.0.0.1:{redis.port}/0")
    try:
        x = rows(1, seed=600)
        status, body, headers = post(proc.url + "/v2/models/mlp/infer", mlp_request(x[0].tolist()))
        assert status == 200 and headers["X-Leanserve-Source"] == "model"
        hits = metric(proc.url, "leanserve_cache_hits_total", 'kind="exact"')
        client = grpcclient.InferenceServerClient(grpc_url(proc))
        got = client.infer("mlp", [mlp_input(x)]).as_numpy("logits")
        assert metric(proc.url, "leanserve_cache_hits_total", 'kind="exact"') == hits + 1
        assert_answer(mlp_session, x, got)
        np.testing.assert_array_equal(got, np.asarray(body["outputs"][0]["data"], np.float32).reshape(1, 2))
        # and another input is no hit
        client.infer("mlp", [mlp_input(rows(1, seed=601))])
        assert metric(proc.url, "leanserve_cache_hits_total", 'kind="exact"') == hits + 1
    finally:
        proc.stop()


def test_grpc_is_off_unless_a_port_is_set(servers: dict[str, Process], workdir: Path):
    """Off by default (several sidecars on one host must not share a port): the REST sidecar starts alone."""
    proc = sidecar(servers["mlp"].url, workdir).start()
    try:
        assert "LEANSERVE_GRPC_PORT" not in proc.env
        log = (workdir / f"sidecar-{proc.port}.log").read_text()
        assert "protocol=grpc" not in log and "event=serving" in log
    finally:
        proc.stop()


def test_a_grpc_port_in_use_fails_the_start(servers: dict[str, Process], workdir: Path):
    """Two sidecars on one gRPC port would split its connections silently (SO_REUSEPORT): the second fails."""
    first = grpc_sidecar(servers["mlp"], workdir)
    try:
        second = sidecar(servers["mlp"].url, workdir, grpc_port=first.env["LEANSERVE_GRPC_PORT"])
        with pytest.raises(RuntimeError, match="exited with"):
            second.start()
        assert first.proc is not None and first.proc.poll() is None  # the first serves on
    finally:
        first.stop()


def test_the_grpc_experiment_the_sidecar_turns_off_is_one_grpcio_knows(mlp_sidecar: Process):
    """The sidecar turns gRPC core's EventEngine listener off (GRPC_EXPERIMENTS, 20-25 % more unary calls
    measured): an experiment a later grpcio dropped would be logged as unknown and silently do nothing."""
    code = (
        "import asyncio, grpc\n"
        "async def main():\n"
        "    server = grpc.aio.server()\n"
        "    server.add_insecure_port('127.0.0.1:0')\n"
        "    await server.start()\n"
        "    await server.stop(0)\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "GRPC_EXPERIMENTS": GRPC_EXPERIMENTS}
    known = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert known.returncode == 0, known.stderr
    assert "Unknown experiment" not in known.stderr
    unknown = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "GRPC_EXPERIMENTS": "-no_such_experiment"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Unknown experiment" in unknown.stderr  # the check above can fail
    assert mlp_sidecar.log is not None and "Unknown experiment" not in mlp_sidecar.log.read_text()
