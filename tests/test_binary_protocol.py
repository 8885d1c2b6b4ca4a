"""The binary tensor data extension and non-finite outputs, through real model-server and sidecar processes.

The client is tritonclient (written by nobody here): with its defaults it sends and asks binary tensors; with
``binary_data=False`` it speaks JSON. Every answer is compared with onnxruntime's own run on the same input.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import pytest
import tritonclient.http as triton

from leanserve_serving.tensors import binary_size, tensor_bytes
from tests.onnx_models import make_kinds, make_log, make_mlp, make_text
from tests.serving_harness import Process, get, metric, model_server, post, post_raw, sidecar, start_redis

MODELS = {"mlp": make_mlp, "text": make_text, "log": make_log, "kinds": make_kinds}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("binary")


@pytest.fixture(scope="module")
def models(workdir: Path) -> dict[str, Path]:
    return {name: make(workdir / f"{name}.onnx") for name, make in MODELS.items()}


@pytest.fixture(scope="module")
def stack(models: dict[str, Path], workdir: Path) -> Iterator[dict[str, dict[str, Process]]]:
    """Per model its model server, a batching sidecar (exact cache on Redis) in front of it, and a sidecar that
    passes requests through (batching off, no cache)."""
    redis = start_redis(workdir)
    servers = {name: model_server(path, name, workdir).start() for name, path in models.items()}
    cars = {
        name: sidecar(
            server.url, workdir, max_batch_size=8, max_wait_ms=30, redis_url=f"redis://127.0.0.1:{redis.port}/0"
        ).start("/v2/health/ready")
        for name, server in servers.items()
    }
    # batching off and no cache: the sidecar passes requests through as they came (sidecar.passes_through)
    relays = {
        name: sidecar(server.url, workdir, max_batch_size=1).start("/v2/health/ready")
        for name, server in servers.items()
    }
    yield {"model_server": servers, "sidecar": cars, "pass_through": relays}
    for proc in [*cars.values(), *relays.values(), *servers.values(), redis]:
        proc.stop()


@pytest.fixture(scope="module")
def sessions(models: dict[str, Path]) -> dict[str, ort.InferenceSession]:
    return {name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for name, path in models.items()}


TARGETS = ["model_server", "sidecar", "pass_through"]


def client(process: Process, concurrency: int = 1) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(process.url.removeprefix("http://"), concurrency=concurrency)


def tensor(name: str, array: np.ndarray, binary: bool = True) -> triton.InferInput:
    value = triton.InferInput(name, list(array.shape), triton.np_to_triton_dtype(array.dtype))
    value.set_data_from_numpy(array, binary_data=binary)
    return value


def mlp_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)


def expected(sessions: dict[str, ort.InferenceSession], model: str, feeds: dict[str, np.ndarray]) -> list[Any]:
    return sessions[model].run(None, feeds)


def binary_request(inputs: list[triton.InferInput], outputs: Any = None) -> tuple[bytes, dict[str, str]]:
    """A request body as tritonclient encodes it, with the headers it sends."""
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    headers = {"Content-Type": "application/octet-stream"}
    if json_size is not None:
        headers["Inference-Header-Content-Length"] = str(json_size)
    return body, headers


def parse(raw: bytes, headers: dict[str, str]) -> triton.InferResult:
    length = headers.get("Inference-Header-Content-Length")
    return triton.InferenceServerClient.parse_response_body(raw, header_length=int(length) if length else None)


@pytest.mark.parametrize("target", TARGETS)
def test_server_metadata_lists_the_binary_extension_and_models_read_as_triton_expects(stack, target):
    tc = client(stack[target]["mlp"])
    assert tc.is_server_live() and tc.is_server_ready()
    assert "binary_tensor_data" in tc.get_server_metadata()["extensions"]
    meta = tc.get_model_metadata("mlp")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]


@pytest.mark.parametrize("target", TARGETS)
def test_tritonclient_defaults_send_and_receive_binary_equal_to_onnxruntime(stack, sessions, target):
    x = mlp_rows(3, seed=1)
    result = client(stack[target]["mlp"]).infer("mlp", [tensor("input", x)])
    assert "binary_data_size" in result.get_output("logits")["parameters"]  # the answer came binary
    np.testing.assert_allclose(result.as_numpy("logits"), expected(sessions, "mlp", {"input": x})[0], rtol=1e-5)


@pytest.mark.parametrize("target", TARGETS)
def test_tritonclient_json_tensors_get_json_answers_equal_to_onnxruntime(stack, sessions, target):
    x = mlp_rows(2, seed=2)
    wanted = [triton.InferRequestedOutput("logits", binary_data=False)]
    result = client(stack[target]["mlp"]).infer("mlp", [tensor("input", x, binary=False)], outputs=wanted)
    assert "data" in result.get_output("logits")  # the answer came as JSON
    np.testing.assert_allclose(result.as_numpy("logits"), expected(sessions, "mlp", {"input": x})[0], rtol=1e-5)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("binary", [True, False])
def test_bytes_inputs_binary_and_json_equal_onnxruntime(stack, sessions, target, binary):
    texts = np.array([b"hello", b"", b"leanserve binary", "d\u00e9j\u00e0".encode()], dtype=object)
    wanted = [triton.InferRequestedOutput("normalized", binary_data=binary)]
    result = client(stack[target]["text"]).infer("text", [tensor("text", texts, binary)], outputs=wanted)
    want = expected(sessions, "text", {"text": np.array([t.decode() for t in texts], dtype=object)})[0]
    assert [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("normalized")] == list(want)
    assert want[0] == "HELLO"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("binary", [True, False])
def test_bool_fp16_and_int64_tensors_round_trip_in_both_encodings(stack, sessions, target, binary):
    feeds = {
        "flag": np.array([[True, False, True], [False, False, True]]),
        "half": np.array([[0.5, -1.25, 3.0], [65504 / 2, 1e-3, -0.0]], dtype=np.float16),
        "count": np.array([[2**40, -7, 0], [1, 2, -(2**62)]], dtype=np.int64),
    }
    wanted = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("flag_out", "half_out", "count_out")]
    result = client(stack[target]["kinds"]).infer(
        "kinds", [tensor(n, a, binary) for n, a in feeds.items()], outputs=wanted
    )
    for name, want in zip(("flag_out", "half_out", "count_out"), expected(sessions, "kinds", feeds), strict=True):
        got = result.as_numpy(name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name


@pytest.mark.parametrize("target", TARGETS)
def test_async_and_concurrent_calls_of_both_encodings_all_answer_right(stack, sessions, target):
    tc = client(stack[target]["mlp"], concurrency=8)
    xs = [mlp_rows(1 + i % 3, seed=100 + i) for i in range(16)]
    pending = [
        tc.async_infer(
            "mlp",
            [tensor("input", x, binary=i % 2 == 0)],
            outputs=[triton.InferRequestedOutput("logits", binary_data=i % 3 == 0)],
        )
        for i, x in enumerate(xs)
    ]
    for x, call in zip(xs, pending, strict=True):
        got = call.get_result(timeout=20).as_numpy("logits")
        np.testing.assert_allclose(got, expected(sessions, "mlp", {"input": x})[0], rtol=1e-5)
    tc.close()


def test_json_and_binary_requests_batch_together_and_all_answer_right(stack, sessions):
    car = stack["sidecar"]["mlp"]
    url = car.url + "/v2/models/mlp/infer"
    batches_before = metric(car.url, "leanserve_batch_size_count", 'model="mlp"')
    rows_before = metric(car.url, "leanserve_batch_size_sum", 'model="mlp"')
    xs = [mlp_rows(1, seed=200 + i) for i in range(24)]

    def one(i: int) -> np.ndarray:
        if i % 2:  # JSON, asking JSON back
            status, body, _ = post(
                url,
                {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": xs[i].ravel().tolist()}]},
            )
            assert status == 200, body
            return np.array(body["outputs"][0]["data"], dtype=np.float32).reshape(1, 2)
        body, headers = binary_request([tensor("input", xs[i])])
        status, raw, answer_headers = post_raw(url, body, headers)
        assert status == 200, raw[:200]
        return parse(raw, answer_headers).as_numpy("logits")

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(one, range(24)))
    for x, got in zip(xs, answers, strict=True):
        np.testing.assert_allclose(got, expected(sessions, "mlp", {"input": x})[0], rtol=1e-5)
    batches = metric(car.url, "leanserve_batch_size_count", 'model="mlp"') - batches_before
    rows = metric(car.url, "leanserve_batch_size_sum", 'model="mlp"') - rows_before
    assert rows == 24 and batches < 24  # some batch held more than one request


def malformed_bodies() -> dict[str, tuple[bytes, dict[str, str], str]]:
    """Binary bodies that must be refused, each with its headers and a phrase the 400 must say."""
    x = mlp_rows(1, seed=3)
    good, headers = binary_request([tensor("input", x)])
    length = int(headers["Inference-Header-Content-Length"])
    header = orjson.loads(good[:length])

    def with_size(size: int, extra: bytes = b"") -> tuple[bytes, dict[str, str]]:
        header["inputs"][0]["parameters"]["binary_data_size"] = size
        raw = orjson.dumps(header)
        return raw + good[length:] + extra, {**headers, "Inference-Header-Content-Length": str(len(raw))}

    short = with_size(255)
    past = with_size(10**12)
    extra = with_size(256, b"\0" * 8)
    texts = {
        "inputs": [{"name": "input", "datatype": "BYTES", "shape": [10**9], "parameters": {"binary_data_size": 8}}]
    }
    many = orjson.dumps(texts)
    return {
        "a size short of the shape": (*short, "does not match its shape"),
        "size past the body": (*past, "past the body"),
        "bytes after the last tensor": (*extra, "add up"),
        "header length past the body": (
            good,
            {**headers, "Inference-Header-Content-Length": str(len(good) + 1)},
            "past the body",
        ),
        "header not JSON": (
            b"\xff" * 20 + good[length:],
            {**headers, "Inference-Header-Content-Length": "20"},
            "invalid JSON",
        ),
        "shape wider than the bytes": (
            many + b"\0" * 8,
            {"Inference-Header-Content-Length": str(len(many))},
            "at least",
        ),
    }


@pytest.mark.parametrize("target", TARGETS)
def test_malformed_binary_bodies_get_a_400_naming_the_problem_and_spare_their_batch(stack, sessions, target):
    url = stack[target]["mlp"].url + "/v2/models/mlp/infer"
    bad = malformed_bodies()
    xs = [mlp_rows(1, seed=300 + i) for i in range(12)]

    def good(i: int) -> np.ndarray:
        body, headers = binary_request([tensor("input", xs[i])])
        status, raw, answer_headers = post_raw(url, body, headers)
        assert status == 200, raw[:200]
        return parse(raw, answer_headers).as_numpy("logits")

    with ThreadPoolExecutor(20) as pool:
        refused = {name: pool.submit(post_raw, url, body, headers) for name, (body, headers, _) in bad.items()}
        answers = list(pool.map(good, range(len(xs))))
    for name, (_, _, phrase) in bad.items():
        status, raw, _ = refused[name].result()
        assert status == 400, (name, raw[:200])
        assert phrase in orjson.loads(raw)["error"], (name, raw[:300])
    for x, got in zip(xs, answers, strict=True):
        np.testing.assert_allclose(got, expected(sessions, "mlp", {"input": x})[0], rtol=1e-5)


@pytest.mark.parametrize("target", TARGETS)
def test_bool_bytes_other_than_0_or_1_are_refused(stack, target):
    body = {
        "inputs": [
            {"name": "flag", "datatype": "BOOL", "shape": [1, 3], "parameters": {"binary_data_size": 3}},
            {"name": "half", "datatype": "FP16", "shape": [1, 3], "data": [1, 2, 3]},
            {"name": "count", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]},
        ]
    }
    header = orjson.dumps(body)
    status, raw, _ = post_raw(
        stack[target]["kinds"].url + "/v2/models/kinds/infer",
        header + bytes([1, 0, 2]),
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 400 and "element 2 (byte 2) is not a BOOL" in orjson.loads(raw)["error"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            lambda b: b["inputs"][0].update(parameters={"shared_memory_region": "r", "shared_memory_byte_size": 256}),
            "shared memory",
        ),
        (lambda b: b.update(outputs=[{"name": "logits", "parameters": {"classification": 1}}]), "classification"),
    ],
)
def test_an_unsupported_extension_is_a_400_naming_it(stack, target, change, named):
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
    change(body)
    status, answer, _ = post(stack[target]["mlp"].url + "/v2/models/mlp/infer", body)
    assert status == 400 and named in answer["error"] and "not supported" in answer["error"]


def test_a_json_request_then_a_binary_one_with_the_same_values_hit_the_same_exact_cache_entry(stack, sessions):
    url = stack["sidecar"]["mlp"].url + "/v2/models/mlp/infer"
    x = mlp_rows(1, seed=400)
    status, first, headers = post(
        url, {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": x.ravel().tolist()}]}
    )
    assert status == 200 and headers["X-Leanserve-Source"] == "model"
    body, request_headers = binary_request([tensor("input", x)])
    status, raw, headers = post_raw(url, body, request_headers)
    assert status == 200 and headers["X-Leanserve-Source"] == "exact"
    assert headers["Content-Type"] == "application/octet-stream"  # a cache hit asked in binary answers binary
    got = parse(raw, headers).as_numpy("logits")
    np.testing.assert_allclose(got, np.array(first["outputs"][0]["data"], dtype=np.float32).reshape(1, 2), rtol=1e-6)
    np.testing.assert_allclose(got, expected(sessions, "mlp", {"input": x})[0], rtol=1e-5)


NON_FINITE_INPUT = np.array([[-1.0, 0.0, np.inf, np.e], [1.0, -np.inf, 2.0, 0.5]], dtype=np.float32)


@pytest.mark.parametrize("target", TARGETS)
def test_nan_and_infinite_outputs_come_back_exactly_in_binary(stack, sessions, target):
    for _ in range(2):  # twice: the second must not be a cache entry that lost them
        result = client(stack[target]["log"]).infer("log", [tensor("x", NON_FINITE_INPUT)])
        got, want = result.as_numpy("y"), expected(sessions, "log", {"x": NON_FINITE_INPUT})[0]
        assert np.isnan(got[0, 0]) and got[0, 1] == -np.inf and got[0, 2] == np.inf
        assert np.array_equal(got, want, equal_nan=True)


@pytest.mark.parametrize("target", TARGETS)
def test_nan_and_infinite_outputs_asked_in_json_are_a_422_naming_the_fix(stack, target):
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [-1.0, 0.0, 1.0, 2.0]}]}
    status, answer, _ = post(stack[target]["log"].url + "/v2/models/log/infer", body)
    assert status == 422
    assert "output 'y' holds 2 NaN or infinite" in answer["error"] and "binary_data_output" in answer["error"]
    body["inputs"][0]["data"] = [1.0, 2.0, 3.0, 4.0]  # finite answers still come as JSON
    status, answer, _ = post(stack[target]["log"].url + "/v2/models/log/infer", body)
    assert status == 200 and answer["outputs"][0]["data"][0] == 0.0


def test_sidecar_metadata_lists_its_own_extensions(stack):
    status, meta = get(stack["sidecar"]["mlp"].url + "/v2")
    assert status == 200 and meta["extensions"] == ["binary_tensor_data"]


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        ("FP32", np.zeros((3, 4), np.float32)),
        ("FP16", np.zeros(5, np.float16)),
        ("BOOL", np.array([True, False])),
        ("INT64", np.arange(7)),
        ("BYTES", np.array(["ab", b"xyz", "\u00e9", ""], dtype=object)),
    ],
)
def test_binary_size_counts_what_tensor_bytes_makes(datatype: str, data: np.ndarray) -> None:
    """The batcher's byte cap counts a request's hop bytes without making them: the same count."""
    assert binary_size(datatype, data) == len(tensor_bytes(datatype, data))
