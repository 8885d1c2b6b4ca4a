"""Hostile cache contents: poisoned exact entries, forged and replayed records, a corrupted shared
semantic index. Real processes throughout: redis-server, the ONNX Runtime model server, the sidecar
over HTTP; the poison is written straight into the real Redis, as anything that reaches it could."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis

from leanserve_serving.cache import CacheScope, exact_key, seal
from leanserve_serving.tensors import decode_request
from tests.onnx_models import make_mlp, make_text
from tests.serving_harness import (
    Process,
    get,
    metric,
    mlp_request,
    model_server,
    post,
    sidecar,
    text_request,
)

HMAC_KEY = "test-deployment-key"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("poisoning")


@pytest.fixture(scope="module")
def models(workdir: Path) -> dict[str, Path]:
    return {"mlp": make_mlp(workdir / "mlp.onnx"), "text": make_text(workdir / "text.onnx")}


def run_sidecar(started: list[Process], upstream: str, workdir: Path, **settings: object) -> Process:
    proc = sidecar(upstream, workdir, **settings).start()
    started.append(proc)
    return proc


def client(server: Process, db: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, db=db)


def values(seed: int) -> list[float]:
    return np.random.default_rng(seed).normal(size=64).astype(np.float32).tolist()


def key_of(body: dict[str, Any], scope: CacheScope) -> str:
    return exact_key("mlp", "1", decode_request(orjson.dumps(body)), set(), scope)


def logits(data: list[Any], shape: list[int] | None = None, datatype: str = "FP32") -> dict[str, Any]:
    return {"name": "logits", "datatype": datatype, "shape": shape or [1, 2], "data": data}


#: Poisoned bodies (in a well-formed record, unsigned) and the reason each is refused for.
POISON: dict[str, tuple[Callable[[], bytes], str]] = {
    "wrong shape": (lambda: orjson.dumps({"outputs": [logits([1.0, 2.0, 3.0, 4.0], [2, 2])]}), "outputs"),
    "too few values": (lambda: orjson.dumps({"outputs": [logits([1.0], [1, 2])]}), "outputs"),
    "a BYTES output the model lacks": (
        lambda: orjson.dumps({"outputs": [{"name": "secret", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}),
        "outputs",
    ),
    "strings in an FP32 output": (lambda: orjson.dumps({"outputs": [logits(["1", "2"])]}), "outputs"),
    "empty outputs": (lambda: orjson.dumps({"model_name": "mlp", "outputs": []}), "outputs"),
    "20 MB for two values": (lambda: orjson.dumps({"outputs": [logits([0.5] * 4_000_000)]}), "size"),
    "not JSON": (lambda: b"\x80\x81 not json", "format"),
}


def test_poisoned_exact_entries_are_misses_answered_by_the_model(servers, redis, workdir, started):
    """Each poisoned entry at a request's key: a miss counted with its reason, the model's answer is
    served, and that answer replaces the poison (the next request is a genuine hit)."""
    car = run_sidecar(started, servers["mlp"].url, workdir, redis_url=f"redis://127.0.0.1:{redis.port}/1")
    infer = car.url + "/v2/models/mlp/infer"
    store = client(redis, 1)
    for seed, (case, (poison, reason)) in enumerate(POISON.items()):
        body = mlp_request(values(100 + seed))
        status, truth, headers = post(infer, body)
        assert (status, headers["X-Leanserve-Source"]) == (200, "model"), case
        key = key_of(body, CacheScope())
        assert store.exists(key), f"{case}: the entry is not at the key the test computes"
        store.set(key, seal(CacheScope(), key, poison()))
        before = metric(car.url, "leanserve_cache_rejected_total", f'kind="exact",reason="{reason}"')
        status, served, headers = post(infer, body)
        assert (status, headers["X-Leanserve-Source"]) == (200, "model"), case
        assert served == truth, case
        assert metric(car.url, "leanserve_cache_rejected_total", f'kind="exact",reason="{reason}"') == before + 1
        status, again, headers = post(infer, body)
        assert (status, headers["X-Leanserve-Source"], again) == (200, "exact", truth), case
    # A raw JSON body where a record belongs (the layout before records): refused too.
    body = mlp_request(values(99))
    post(infer, body)
    store.set(key_of(body, CacheScope()), orjson.dumps({"outputs": [logits([9.0, 9.0])]}))
    assert post(infer, body)[2]["X-Leanserve-Source"] == "model"


def test_a_cached_entry_never_sets_the_model_name_or_version(servers, redis, workdir, started):
    car = run_sidecar(started, servers["mlp"].url, workdir, redis_url=f"redis://127.0.0.1:{redis.port}/2")
    infer = car.url + "/v2/models/mlp/infer"
    body = mlp_request(values(7))
    truth = post(infer, body)[1]
    key = key_of(body, CacheScope())
    other = {"model_name": "other-model", "model_version": "666", "parameters": {"x": 1}, "outputs": truth["outputs"]}
    client(redis, 2).set(key, seal(CacheScope(), key, orjson.dumps(other)))
    status, served, headers = post(infer, body)
    assert (status, headers["X-Leanserve-Source"]) == (200, "exact")
    assert served == truth  # the sidecar's model name and version; nothing else from the entry
    assert (served["model_name"], served["model_version"]) == ("mlp", "1")


def test_with_an_hmac_key_forged_and_replayed_entries_are_misses(servers, redis, workdir, started):
    """A record signed with another key, an unsigned one, and a genuine record copied to another
    request's key all fail the integrity tag; a genuine record at its own key is a hit."""
    car = run_sidecar(
        started,
        servers["mlp"].url,
        workdir,
        redis_url=f"redis://127.0.0.1:{redis.port}/3",
        cache_hmac_key=HMAC_KEY,
    )
    infer = car.url + "/v2/models/mlp/infer"
    store = client(redis, 3)
    mine = CacheScope(hmac_key=HMAC_KEY.encode())
    a, b = mlp_request(values(1)), mlp_request(values(2))
    truth_a, truth_b = post(infer, a)[1], post(infer, b)[1]
    assert post(infer, a)[2]["X-Leanserve-Source"] == "exact"  # genuine, signed by the sidecar itself
    key_a, key_b = key_of(a, mine), key_of(b, mine)
    forged = orjson.dumps({"outputs": [logits([42.0, 42.0])]})
    attempts = [
        seal(CacheScope(hmac_key=b"another deployment's key"), key_a, forged),
        seal(CacheScope(), key_a, forged),  # no tag at all
    ]
    for record in attempts:
        store.set(key_a, record)
        status, served, headers = post(infer, a)
        assert (status, headers["X-Leanserve-Source"], served) == (200, "model", truth_a)
    store.set(key_b, store.get(key_a))  # a genuine record replayed at another request's key
    status, served, headers = post(infer, b)
    assert (status, headers["X-Leanserve-Source"], served) == (200, "model", truth_b)
    assert metric(car.url, "leanserve_cache_rejected_total", 'kind="exact",reason="tag"') == 3


def test_keys_are_namespaced_by_deployment_and_model_digest(servers, redis, workdir, started):
    url = f"redis://127.0.0.1:{redis.port}/4"
    body = mlp_request(values(3))
    first = run_sidecar(started, servers["mlp"].url, workdir, redis_url=url, cache_namespace="team-a/mlp")
    assert post(first.url + "/v2/models/mlp/infer", body)[2]["X-Leanserve-Source"] == "model"
    assert post(first.url + "/v2/models/mlp/infer", body)[2]["X-Leanserve-Source"] == "exact"
    for settings in ({"cache_namespace": "team-b/mlp"}, {"cache_namespace": "team-a/mlp", "model_digest": "ab" * 32}):
        other = run_sidecar(started, servers["mlp"].url, workdir, redis_url=url, **settings)
        assert post(other.url + "/v2/models/mlp/infer", body)[2]["X-Leanserve-Source"] == "model", settings


# ---- the shared semantic index ------------------------------------------------------------------


def semantic(redis: Process, db: int) -> dict[str, object]:
    return {
        "redis_url": f"redis://127.0.0.1:{redis.port}/{db}",
        "semantic_enabled": True,
        "semantic_threshold": 0.9,
        "semantic_embedder": "hashing",
    }


def vectors_key(store: redis.Redis) -> bytes:
    keys = list(store.scan_iter(match="*vectors*"))
    assert len(keys) == 1, keys
    return keys[0]


def unit(n: int, seed: int = 0) -> bytes:
    v = np.random.default_rng(seed).normal(size=n).astype(np.float32)
    return (v / np.linalg.norm(v)).astype("<f4").tobytes()


def test_foreign_vectors_in_the_shared_index_fail_no_request(servers, redis, workdir, started):
    """What a replica with another embedder writes (another dimension), and vectors that are not finite
    unit vectors, are skipped and counted: text requests keep being served, hits included."""
    car = run_sidecar(started, servers["text"].url, workdir, **semantic(redis, 5))
    infer = car.url + "/v2/models/text/infer"
    assert post(infer, text_request("The battery life is great"))[2]["X-Leanserve-Source"] == "model"
    store = client(redis, 5)
    key = vectors_key(store)
    nan = np.full(1024, np.nan, dtype="<f4").tobytes()
    store.hset(key, mapping={"a" * 24: unit(384), "b" * 24: nan, "c" * 24: unit(1024) * 2, "d" * 24: b"\x00"})
    time.sleep(0.8)  # syncs of the shared index
    status, hit, headers = post(infer, text_request("the battery life is great!!"))
    assert (status, headers["X-Leanserve-Source"]) == (200, "semantic")
    assert hit["outputs"][0]["data"] == ["THE BATTERY LIFE IS GREAT"]
    status, fresh, headers = post(infer, text_request("an entirely different sentence"))
    assert (status, headers["X-Leanserve-Source"], fresh["outputs"][0]["data"]) == (
        200,
        "model",
        ["AN ENTIRELY DIFFERENT SENTENCE"],
    )
    assert metric(car.url, "leanserve_cache_rejected_total", 'kind="semantic_index",reason="vector"') >= 3


def test_an_undecodable_index_id_leaves_readiness_following_the_model_server(models, redis, workdir, started):
    upstream = model_server(models["text"], "text", workdir).start()
    started.append(upstream)
    car = run_sidecar(started, upstream.url, workdir, **semantic(redis, 6))
    assert post(car.url + "/v2/models/text/infer", text_request("hello there"))[0] == 200
    store = client(redis, 6)
    store.hset(vectors_key(store), b"\xff\xfe\x00not-utf8", unit(1024))
    time.sleep(0.8)
    assert get(car.url + "/v2/health/ready")[0] == 200
    upstream.stop(kill=True)
    deadline = time.monotonic() + 5
    while get(car.url + "/v2/health/ready")[0] != 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert get(car.url + "/v2/health/ready")[0] == 503  # the health watch is still running
    assert metric(car.url, "leanserve_cache_rejected_total", 'kind="semantic_index",reason="id"') >= 1


def test_an_entry_removed_from_the_shared_index_is_forgotten_locally(servers, redis, workdir, started):
    car = run_sidecar(started, servers["text"].url, workdir, **semantic(redis, 7))
    infer = car.url + "/v2/models/text/infer"
    post(infer, text_request("The battery life is great"))
    assert post(infer, text_request("the battery life is great!"))[2]["X-Leanserve-Source"] == "semantic"
    store = client(redis, 7)
    store.delete(vectors_key(store))  # another replica evicted it (its response is still in Redis)
    time.sleep(0.8)
    assert post(infer, text_request("the battery life is great!"))[2]["X-Leanserve-Source"] == "model"
