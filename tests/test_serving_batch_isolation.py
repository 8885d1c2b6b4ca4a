"""One request must never fail the requests batched with it, and a restarted model server is validated afresh.

Real model-server processes (ONNX Runtime sessions) behind the real sidecar, over real HTTP.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from leanserve_serving.tensors import ProtocolError, decode_request
from tests.onnx_models import make_mlp, make_seq
from tests.serving_harness import Process, get, metric, mlp_request, model_server, post, sidecar, until


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("isolation")


@pytest.fixture(scope="module")
def models(workdir: Path) -> dict[str, Path]:
    return {"mlp": make_mlp(workdir / "mlp.onnx"), "seq": make_seq(workdir / "seq.onnx")}


def start(started: list[Process], process: Process) -> Process:
    started.append(process.start())
    return process


def rows(n: int, seed: int) -> list[list[float]]:
    return np.random.default_rng(seed).normal(size=(n, 64)).astype(np.float32).tolist()


def concurrently(url: str, bodies: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any], dict[str, str]]]:
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(lambda b: post(url, b, timeout=30), bodies))


def assert_answers(got: list[tuple[int, dict[str, Any], dict[str, str]]], direct_url: str, bodies: list) -> None:
    """Each answer is 200 and what the model server answers that request alone."""
    for (status, body, _), sent in zip(got, bodies, strict=True):
        assert status == 200, body
        alone = post(direct_url, sent)[1]
        np.testing.assert_allclose(body["outputs"][0]["data"], alone["outputs"][0]["data"], rtol=1e-5, atol=1e-6)


# ---- item 1: a poison pill in a batch ---------------------------------------------------------------


def test_a_value_beyond_fp32_fails_alone_and_the_requests_batched_with_it_are_answered(models, workdir, started):
    """1e39 is legal JSON but no float32: once it became inf (re-encoded as null) the model server refused the
    whole merged batch, and every innocent request batched with it got the 400."""
    upstream = start(started, model_server(models["mlp"], "mlp", workdir))
    car = start(started, sidecar(upstream.url, workdir, max_batch_size=16, max_wait_ms=300))
    infer = car.url + "/v2/models/mlp/infer"
    assert post(infer, mlp_request(rows(1, 0)[0]))[0] == 200  # metadata read before the rounds
    innocent_failures, bad_answers = 0, []
    for round_ in range(4):
        good = [mlp_request(r) for r in rows(15, seed=round_ + 1)]
        poison = rows(1, seed=100 + round_)[0]
        poison[round_ * 7] = 1e39
        bodies = [*good[:round_], mlp_request(poison), *good[round_:]]
        got = concurrently(infer, bodies)
        bad_answers.append(got.pop(round_))
        innocent_failures += sum(1 for status, _, _ in got if status != 200)
        assert_answers(got, upstream.url + "/v2/models/mlp/infer", [*good[:round_], *good[round_:]])
    assert innocent_failures == 0
    for round_, (status, err, _) in enumerate(bad_answers):
        assert status == 400, err
        assert f"element {round_ * 7} (1e+39) is out of the range of FP32" in err["error"]
    assert metric(car.url, "leanserve_batch_size_count", 'model="mlp"') < 1 + 4 * 15, "the rounds were not batched"


@pytest.mark.parametrize(
    ("datatype", "data", "reason"),
    [
        ("FP32", [1e39], "element 0 (1e+39) is out of the range of FP32"),
        ("FP32", [-3.5e38], "element 0 (-3.5e+38) is out of the range of FP32"),
        ("FP16", [1.0, 70000.0], "element 1 (70000.0) is out of the range of FP16"),
        ("INT8", [127, 128], "element 1 (128) is out of the range of INT8"),
        ("INT16", [-32769], "element 0 (-32769) is out of the range of INT16"),
        ("INT32", [2**31], "element 0 (2147483648) is out of the range of INT32"),
        ("INT64", [2**63], "element 0 (9223372036854775808) is out of the range of INT64"),
        ("UINT8", [-1], "element 0 (-1) is out of the range of UINT8"),
        ("UINT64", [-1, 2**63], "element 0 (-1) is out of the range of UINT64"),
        ("INT32", [1, 1.5], "element 1 (1.5) is not an integer, as INT32 needs"),
        ("BOOL", [True, 2], "BOOL data must be true or false"),
        ("BOOL", [0.0], "BOOL data must be true or false"),
        ("UINT64", [2**64], "element 0 (1.8446744073709552e+19) is out of the range of UINT64"),
        ("FP32", [0.5, None], "FP32 data must be numbers"),
    ],
)
def test_a_value_the_datatype_cannot_hold_is_refused_when_decoded(datatype, data, reason):
    """The one decoder both the sidecar and the model server use: numpy's cast would wrap, truncate or overflow."""
    body = {"inputs": [{"name": "x", "datatype": datatype, "shape": [len(data)], "data": data}]}
    with pytest.raises(ProtocolError) as refused:
        decode_request(json.dumps(body).encode())  # the stdlib writes integers of any size
    assert refused.value.status == 400
    assert refused.value.reason.startswith(f"input 'x': data does not match datatype {datatype}: {reason}")


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("FP32", [3.4e38, -1e-50], [3.4e38, -0.0]),
        ("FP16", [65504.0], [65504.0]),
        ("INT8", [-128, 127, 3.0], [-128, 127, 3]),
        ("UINT64", [2**64 - 1], [2**64 - 1]),
        ("INT64", [-(2**63), 2**63 - 1], [-(2**63), 2**63 - 1]),
        ("BOOL", [True, False], [True, False]),
        ("FP32", [True, 2], [1.0, 2.0]),
    ],
)
def test_values_the_datatype_holds_decode_unchanged(datatype, data, expected):
    body = {"inputs": [{"name": "x", "datatype": datatype, "shape": [len(data)], "data": data}]}
    decoded = decode_request(orjson.dumps(body)).inputs[0].data
    assert decoded.tolist() == pytest.approx(expected, rel=1e-6)


def test_a_batch_the_model_server_refuses_is_bisected_until_the_culprit_is_alone(models, workdir, started):
    """A refusal the sidecar cannot foresee: the model server takes bodies up to 40 kB, the sidecar up to 8 MB.

    A 200-row request (about 51 kB once re-encoded: the hop carries binary tensors) is refused by the model
    server even alone; batched with
    15 one-row requests, the merged body was refused too, and all 16 got the 413. Now the batch is bisected:
    the culprit alone gets its 413, the others their answers.
    """
    upstream = start(started, model_server(models["mlp"], "mlp", workdir, LEANSERVE_MAX_BODY_BYTES="40000"))
    car = start(started, sidecar(upstream.url, workdir, max_batch_size=512, max_wait_ms=400))
    infer = car.url + "/v2/models/mlp/infer"
    assert post(infer, mlp_request(rows(1, 0)[0]))[0] == 200
    big = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [200, 64], "data": rows(200, seed=1)}]}
    singles = [mlp_request(r) for r in rows(15, seed=2)]
    got = concurrently(infer, [*singles[:7], big, *singles[7:]])
    status, err, _ = got.pop(7)
    assert status == 413, err
    assert "request body too large" in err["error"]
    assert_answers(got, upstream.url + "/v2/models/mlp/infer", singles)
    # The model server refused a merged batch (the culprit with others) and then the culprit alone.
    assert metric(upstream.url, "leanserve_model_requests_total", 'code="413",model="mlp"') >= 2


# ---- item 3: the input specs of a model server restarted with another model --------------------------


def seq_request(length: int, seed: int) -> dict[str, Any]:
    data = np.random.default_rng(seed).normal(size=(1, length, 8)).astype(np.float32).tolist()
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, length, 8], "data": data}]}


def test_a_model_server_back_with_another_model_is_validated_against_the_new_one(models, workdir, started):
    """The sidecar sees the upstream go and come back (its health checks): it forgets the old model's inputs."""
    first = start(started, model_server(models["mlp"], "m", workdir))
    car = start(started, sidecar(first.url, workdir, health_interval_s=0.1))
    infer = car.url + "/v2/models/m/infer"
    assert post(infer, mlp_request(rows(1, 0)[0]))[0] == 200
    first.stop(kill=True)
    until(lambda: get(car.url + "/v2/health/ready")[0] == 503, what="the sidecar sees the upstream gone")
    second = start(started, model_server(models["seq"], "m", workdir, port=first.port))
    until(lambda: get(car.url + "/v2/health/ready")[0] == 200, what="the sidecar sees the upstream back")
    status, body, _ = post(infer, seq_request(5, seed=1))
    assert status == 200, body
    assert body["outputs"][0]["shape"] == [1, 2]
    # A request only the old model took is refused by the sidecar itself, never sent to the model server.
    status, err, _ = post(infer, mlp_request(rows(1, 2)[0]))
    assert status == 400
    assert "has shape [1, 64], the model expects [-1, -1, 8]" in err["error"]
    assert metric(second.url, "leanserve_model_requests_total", 'code="400",model="m"') == 0


def test_a_restart_the_sidecar_did_not_notice_is_caught_by_reading_the_inputs_again(models, workdir, started):
    """No health check in between (the interval is an hour) and no request while it was down: a request the
    old inputs refuse makes the sidecar read them again once, and the new model serves it."""
    first = start(started, model_server(models["mlp"], "m", workdir))
    car = start(started, sidecar(first.url, workdir, health_interval_s=3600))
    infer = car.url + "/v2/models/m/infer"
    assert post(infer, mlp_request(rows(1, 0)[0]))[0] == 200
    first.stop(kill=True)
    start(started, model_server(models["seq"], "m", workdir, port=first.port))
    status, body, _ = post(infer, seq_request(3, seed=2))
    assert status == 200, body
    assert body["outputs"][0]["shape"] == [1, 2]
    # A request neither model takes is still refused, with the new model's shapes in the reason.
    wide = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2, 9], "data": [0.5] * 18}]}
    status, err, _ = post(infer, wide)
    assert status == 400
    assert "has shape [1, 2, 9], the model expects [-1, -1, 8]" in err["error"]


def test_names_the_upstream_does_not_serve_leave_nothing_behind_in_the_sidecar(models, workdir, started):
    """A flood of unknown model names gets 404s and no re-read of anything: the sidecar keeps state for the
    models the upstream serves only (its memory must not grow with the names clients send)."""
    from aiohttp.test_utils import TestClient, TestServer

    from leanserve_serving.config import SidecarConfig
    from leanserve_serving.sidecar import SIDECAR, create_app

    server = start(started, model_server(models["mlp"], "m", workdir))

    async def run() -> tuple[list[int], dict[str, Any], dict[str, Any]]:
        app = create_app(SidecarConfig(upstream=server.url, health_interval_s=3600))
        async with TestClient(TestServer(app)) as client:
            ok = await client.post("/v2/models/m/infer", json=mlp_request(rows(1, 0)[0]))
            codes = [ok.status]
            for i in range(300):
                resp = await client.post(f"/v2/models/nope-{i}/infer", json=mlp_request(rows(1, 0)[0]))
                codes.append(resp.status)
            upstream = app[SIDECAR].state.upstream
            return codes, dict(upstream.specs), dict(upstream.reread_at)

    codes, specs, reread_at = asyncio.run(run())
    assert codes[0] == 200 and set(codes[1:]) == {404}
    assert list(specs) == ["m"] and reread_at == {}


# ---- a byte cap per batch ------------------------------------------------------------------------------


def test_batches_stop_growing_before_the_upstreams_body_limit(models, workdir, started):
    """A batch's inputs are capped below the body limit (less room for its header): the model server never
    answers a merged batch 413 (before, 32 images of 602 kB went over its 8 MiB and came back 413, to be
    bisected). Here rows of 256 bytes, a 3 KiB cap (12 rows) and a model server taking 4 KiB bodies: 24
    concurrent rows, unbounded, would make a 6 KiB batch."""
    server = start(started, model_server(models["mlp"], "mlp", workdir, LEANSERVE_MAX_BODY_BYTES="4096"))
    car = start(
        started,
        sidecar(server.url, workdir, max_batch_size=32, max_wait_ms=200, max_body_bytes=64 * 1024 + 3 * 1024),
    )
    bodies = [mlp_request(r) for r in rows(24, seed=7)]
    got = concurrently(car.url + "/v2/models/mlp/infer", bodies)
    assert all(status == 200 for status, _, _ in got)
    assert metric(server.url, "leanserve_model_requests_total", 'code="413",model="mlp"') == 0
    batches = metric(car.url, "leanserve_batch_size_count", 'model="mlp"')
    assert batches >= 2  # 24 rows in batches of at most 12
    assert metric(car.url, "leanserve_batch_size_bucket", 'le="16.0",model="mlp"') == batches
    assert metric(car.url, "leanserve_batch_size_sum", 'model="mlp"') == 24
    assert_answers(got, server.url + "/v2/models/mlp/infer", bodies)
