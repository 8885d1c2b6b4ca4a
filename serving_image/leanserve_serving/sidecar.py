"""The batching sidecar: the pod's front door, speaking v2 to clients and to any v2 upstream.

Per request: decode and check it against the upstream model's metadata (a bad
request never joins a batch), answer from the exact cache, then the semantic
cache, else queue it for the dynamic batcher; store the answer in the caches
on the way out. The upstream may be leanserve's model server, Triton or a
KServe v2 server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from typing import Any

import aiohttp
import numpy as np
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from leanserve_serving.batcher import BatchStats, DynamicBatcher
from leanserve_serving.cache import ExactCache, RedisHealth, SemanticCache, connect, exact_key
from leanserve_serving.config import SidecarConfig
from leanserve_serving.embedders import make_embedder
from leanserve_serving.http import (
    drainable,
    error_response,
    json_response,
    metrics_handler,
    protocol_errors,
    serve_main,
)
from leanserve_serving.tensors import (
    DATATYPES,
    InferRequest,
    ProtocolError,
    Tensor,
    TensorSpec,
    check_inputs,
    decode_request,
    dumps,
    encode_response,
)

log = logging.getLogger("leanserve.sidecar")

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class SidecarMetrics:
    """The sidecar's Prometheus metrics (part of the API: names and labels are stable)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "leanserve_requests_total", "Requests by model and status code", ["model", "code"], registry=r
        )
        self.latency = Histogram("leanserve_request_duration_seconds", "End-to-end latency through the sidecar",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.upstream_latency = Histogram("leanserve_upstream_duration_seconds", "Latency of one batch upstream",
                                          ["model"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_size = Histogram("leanserve_batch_size", "Rows per batch sent upstream", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)  # fmt: skip
        self.queue_depth = Gauge("leanserve_queue_depth", "Requests waiting for a batch", ["model"], registry=r)
        self.cache_hits = Counter("leanserve_cache_hits_total", "Cache hits by kind", ["kind"], registry=r)
        self.cache_misses = Counter("leanserve_cache_misses_total", "Cache misses by kind", ["kind"], registry=r)
        self.redis_up = Gauge("leanserve_redis_up", "1 when the cache's Redis answers, 0 when serving uncached",
                              registry=r)  # fmt: skip
        self.upstream_up = Gauge("leanserve_upstream_up", "1 when the upstream model server is ready", registry=r)


class Upstream:
    """A v2 server reached over HTTP: infer, metadata (cached per model) and readiness."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, metrics: SidecarMetrics) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.metrics = metrics
        self.ready = False
        self.specs: dict[str, list[TensorSpec]] = {}

    def mark(self, ready: bool) -> None:
        if ready != self.ready:
            log.info("upstream %s ready=%s", self.base_url, ready)
        self.ready = ready
        self.metrics.upstream_up.set(1 if ready else 0)

    async def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        try:
            async with self.session.request(
                method, self.base_url + path, data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                raw = await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.mark(False)
            raise ProtocolError(503, f"upstream model server unavailable: {type(exc).__name__}") from None
        try:
            payload = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            payload = {"error": raw[:200].decode("utf-8", "replace")}
        return resp.status, payload

    async def check_ready(self) -> bool:
        with contextlib.suppress(ProtocolError):
            status, _ = await self.call("GET", "/v2/health/ready")
            self.mark(status == 200)
        return self.ready

    async def model_inputs(self, model: str) -> list[TensorSpec]:
        if model not in self.specs:
            status, meta = await self.call("GET", f"/v2/models/{model}")
            if status != 200:
                raise ProtocolError(status, meta.get("error", f"upstream answered {status}"))
            self.specs[model] = [TensorSpec.from_json(i) for i in meta.get("inputs", [])]
        return self.specs[model]

    async def infer(self, model: str, request: InferRequest) -> list[Tensor]:
        body = {"inputs": [t.to_json() for t in request.inputs]}
        if request.outputs is not None:
            body["outputs"] = [{"name": o} for o in request.outputs]
        if request.parameters:
            body["parameters"] = request.parameters
        start = time.perf_counter()
        status, payload = await self.call("POST", f"/v2/models/{model}/infer", dumps(body))
        self.metrics.upstream_latency.labels(model).observe(time.perf_counter() - start)
        if status != 200:
            raise ProtocolError(status if status < 500 else 502, payload.get("error", f"upstream answered {status}"))
        self.mark(True)
        outputs = []
        for out in payload.get("outputs", []):
            dtype = DATATYPES.get(out["datatype"], object)
            data = np.asarray(out["data"], dtype=dtype).reshape(out["shape"])
            outputs.append(Tensor(out["name"], out["datatype"], tuple(out["shape"]), data))
        return outputs


def create_app(config: SidecarConfig) -> web.Application:
    """The sidecar's aiohttp application; connects to the upstream and Redis on startup."""
    metrics = SidecarMetrics()
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[protocol_errors])
    drain = drainable(app)
    state: dict[str, Any] = {}

    async def startup(app: web.Application) -> None:
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=config.request_timeout_s),
            connector=aiohttp.TCPConnector(limit=max(4, config.upstream_concurrency * 2)),
        )
        upstream = Upstream(config.upstream, session, metrics)
        stats = BatchStats(
            on_batch=lambda model, size: metrics.batch_size.labels(model).observe(size),
            on_queue_depth=lambda model, depth: metrics.queue_depth.labels(model).set(depth),
        )
        batcher = DynamicBatcher(
            upstream.infer, config.max_batch_size, config.max_wait_ms / 1000.0, config.max_queue,
            config.upstream_concurrency, stats,
        )  # fmt: skip
        state.update(session=session, upstream=upstream, batcher=batcher, exact=None, semantic={}, redis=None)
        if config.redis_url:
            client = connect(config.redis_url)
            health = RedisHealth(lambda up: metrics.redis_up.set(1 if up else 0))
            exact = ExactCache(client, health, config.cache_ttl_seconds, config.cache_exclude_fields)
            state.update(redis=client, health=health, exact=exact if config.exact_enabled else None)
            if config.semantic_enabled:
                state["embedder"] = make_embedder(config.semantic_embedder)
        else:
            metrics.redis_up.set(0)
        await upstream.check_ready()
        state["watch"] = asyncio.create_task(watch(upstream))

    async def watch(upstream: Upstream) -> None:
        """Keep readiness and the shared semantic index fresh."""
        while True:
            await asyncio.sleep(config.health_interval_s)
            await upstream.check_ready()
            for cache in state["semantic"].values():
                await cache.sync()

    async def cleanup(app: web.Application) -> None:
        state["watch"].cancel()
        await state["session"].close()
        if state.get("redis") is not None:
            await state["redis"].aclose()

    async def semantic_for(model: str) -> SemanticCache | None:
        if not (config.semantic_enabled and state.get("redis") is not None):
            return None
        cache = state["semantic"].get(model)
        if cache is None:
            cache = state["semantic"][model] = SemanticCache(
                state["redis"], state["health"], model, state["embedder"], config.semantic_threshold,
                config.semantic_max_entries, config.cache_ttl_seconds,
            )  # fmt: skip
            await cache.sync()  # start from the index other replicas share
        return cache

    async def answer(model: str, decoded: InferRequest) -> tuple[dict[str, Any], str]:
        """The response body and where it came from (exact, semantic or model)."""
        upstream: Upstream = state["upstream"]
        check_inputs(await upstream.model_inputs(model), decoded)
        exact: ExactCache | None = state["exact"]
        key = exact_key(model, config.model_version, decoded, exact.exclude) if exact else None
        if exact is not None and key is not None:
            hit = await exact.get(key)
            (metrics.cache_hits if hit else metrics.cache_misses).labels("exact").inc()
            if hit is not None:
                return hit, "exact"
        semantic = await semantic_for(model)
        text = SemanticCache.text_of(decoded) if semantic else None
        vector = None
        if semantic is not None and text is not None:
            hit, _, vector = await semantic.get(text)
            (metrics.cache_hits if hit else metrics.cache_misses).labels("semantic").inc()
            if hit is not None:
                return hit, "semantic"
        outputs = await state["batcher"].submit(model, decoded, config.request_timeout_s)
        body = encode_response(model, config.model_version, None, outputs)
        if exact is not None or semantic is not None:
            raw = dumps(body)
            if exact is not None and key is not None:
                await exact.put(key, raw)
            if semantic is not None and text is not None:
                await semantic.put(text, raw, vector)
        return body, "model"

    async def infer(request: web.Request) -> web.Response:
        model = request.match_info["name"]
        start = time.perf_counter()
        code = 200
        try:
            decoded = decode_request(await request.read())
            body, source = await answer(model, decoded)
            if decoded.id is not None:
                body = {**body, "id": decoded.id}
            return json_response(body, headers={"X-Leanserve-Source": source})
        except ProtocolError as exc:
            code = exc.status
            headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
            return error_response(exc.status, exc.reason, headers)
        except web.HTTPRequestEntityTooLarge:
            code = 413
            raise
        finally:
            metrics.requests.labels(model, str(code)).inc()
            metrics.latency.labels(model).observe(time.perf_counter() - start)

    async def live(_: web.Request) -> web.Response:
        return json_response({"live": True})

    async def ready(_: web.Request) -> web.Response:
        if drain.active:  # first: the endpoints must stop sending here, whatever the upstream's state
            return error_response(503, "draining: shutting down")
        if state["upstream"].ready:
            return json_response({"ready": True})
        return error_response(503, "upstream model server is not ready")

    async def proxy_get(request: web.Request) -> web.Response:
        status, payload = await state["upstream"].call("GET", request.path)
        return json_response(payload, status=status)

    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", proxy_get)
    app.router.add_get("/v2/models/{name}", proxy_get)
    app.router.add_get("/v2/models/{name}/ready", proxy_get)
    app.router.add_post("/v2/models/{name}/infer", infer)
    app.router.add_get("/metrics", metrics_handler(metrics.registry))
    app["metrics"] = metrics
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="leanserve batching, caching sidecar (Open Inference Protocol v2)")
    parser.add_argument("--upstream")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--max-batch-size", type=int)
    parser.add_argument("--max-wait-ms", type=float)
    parser.add_argument("--max-queue", type=int)
    parser.add_argument("--redis-url")
    parser.add_argument("--semantic", dest="semantic_enabled", action="store_const", const=True)
    serve_main(parser, SidecarConfig, create_app, argv)


if __name__ == "__main__":
    main()
