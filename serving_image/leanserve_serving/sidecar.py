"""The batching sidecar: the pod's front door, speaking v2 to clients and to any v2 upstream.

Per request: take a place in the batcher's queue before reading it (a saturated
sidecar refuses with 429 before paying for the decoding), decode and check it
against the upstream model's metadata (a bad request never joins a batch),
answer from the exact cache, then the semantic cache, else queue it for the
dynamic batcher; store the answer in the caches on the way out. The upstream
may be leanserve's model server, Triton or a KServe v2 server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import numpy as np
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from leanserve_serving.batcher import (
    AnswerTimeoutError,
    BatchError,
    BatchStats,
    DynamicBatcher,
    Place,
    QueueFullError,
    UpstreamShapeError,
    WaitTooLongError,
)
from leanserve_serving.cache import (
    CacheRejectionError,
    CacheScope,
    Entry,
    ExactCache,
    RedisHealth,
    SemanticCache,
    check_outputs,
    connect,
    exact_key,
    request_rows,
)
from leanserve_serving.config import SidecarConfig, parse_pad_inputs
from leanserve_serving.embedders import make_embedder
from leanserve_serving.http import (
    BATCH_BUCKETS,
    CANCEL_ON_DISCONNECT,
    drainable,
    error_response,
    infer_response,
    json_response,
    metrics_handler,
    protocol_errors,
    read_body,
    serve_main,
)
from leanserve_serving.tensors import (
    EXTENSIONS,
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    Tensor,
    TensorSpec,
    check_inputs,
    check_model_name,
    decode_outputs,
    decode_request,
    dumps,
    encode_body,
    encode_request,
    encode_response,
    non_finite,
    split_body,
)

if TYPE_CHECKING:
    from grpc import aio as grpc_aio

log = logging.getLogger("leanserve.sidecar")

#: Request and upstream latency buckets, seconds: 1, 1.5, 2, 3, 4, 5, 6 and 8 of each decade from 0.5 ms
#: to 10 s (a bucket at most half as wide as its lower edge). The observer reads p50/p95/p99 with
#: histogram_quantile, which interpolates inside a bucket: with the steps before (5 ms, then 10 ms), a
#: p95 of 8.6 ms read as 9.7 ms (+13 %).
LATENCY_BUCKETS = tuple(
    round(m * 10.0**e, 6) for e in range(-4, 2) for m in (1, 1.5, 2, 3, 4, 5, 6, 8) if 0.0005 <= m * 10.0**e <= 10
)

#: The batcher's errors as HTTP statuses: the batcher knows no transport, the sidecar chooses here.
BATCH_ERROR_STATUS: dict[type[BatchError], int] = {
    QueueFullError: 429,  # Too Many Requests (with Retry-After): come back shortly
    WaitTooLongError: 429,  # the queue ahead would outlast the request's timeout: come back shortly
    AnswerTimeoutError: 504,  # Gateway Timeout: the model did not answer within the request's timeout
    UpstreamShapeError: 502,  # Bad Gateway: the upstream's answer to a batch cannot be split back
}

#: Where an answer came from: the ``X-Leanserve-Source`` header.
Source = Literal["exact", "semantic", "model"]

#: The metric label of requests for a model the upstream does not serve: labels name known models only.
UNKNOWN_MODEL = "_unknown"

#: gRPC core experiments the sidecar turns off, unless ``GRPC_EXPERIMENTS`` is set already. With grpcio 1.85's
#: default EventEngine listener, the sidecar spent 218-233 us of CPU per unary ModelInfer (tiny MLP, batched,
#: one core); with the older listener 175-189 us, and 20-25 % more requests served (benchmarks/serving.py's
#: setup, measured side by side). An experiment a later grpcio no longer knows is logged by it and ignored.
GRPC_EXPERIMENTS = "-event_engine_listener"

#: Statuses a client should retry after a pause: answered with ``Retry-After: 1``.
RETRY_LATER = frozenset({429, 503})

#: The status counted for a request whose client went away before its answer (nginx's "client closed request").
CLIENT_GONE = 499

#: Upstream client errors every member of a batch would meet alone too (unknown model, timeout, overload):
#: a batch failing with one is not bisected.
SHARED_CLIENT_ERRORS = frozenset({404, 408, 429})

#: The least time between two reads of a model's inputs prompted by requests they refused: a flood of bad
#: requests is no flood of metadata reads.
SPEC_REREAD_S = 1.0


def passes_through(config: SidecarConfig) -> bool:
    """Whether REST infer requests go upstream as they came, undecoded: when nothing here needs their tensors,
    with batching off (``max_batch_size`` 1: no batch to merge them into) and no response cache (no key to
    make, no answer to store). Decoding, checking and encoding again cost the sidecar more than the whole
    hop (measured in benchmarks/serving.py); the upstream checks the request as it would for a direct client."""
    return config.max_batch_size <= 1 and not config.redis_url


#: What a merged request's JSON header may take of the upstream's body limit (names, shapes, sizes).
BATCH_HEADER_ALLOWANCE = 64 * 1024


def batch_byte_cap(config: SidecarConfig) -> int:
    """The most input bytes one batch sends upstream: the body limit (``max_body_bytes``, the model server's
    too by default) less room for the JSON header. 32 images of 602 kB each went over the model server's
    8 MiB and came back 413, to be bisected; a batch now stops growing before that. Padding may still take
    a padded batch past it, and a JSON-only upstream's bodies are larger: the 413 bisection stays behind."""
    return max(1, config.max_body_bytes - BATCH_HEADER_ALLOWANCE)


def one_members_fault(exc: Exception) -> bool:
    """Whether a failed batch's error may be one member's doing (a 4xx from the upstream, but those in
    :data:`SHARED_CLIENT_ERRORS`): the batcher then bisects the batch rather than fail every member."""
    return isinstance(exc, ProtocolError) and 400 <= exc.status < 500 and exc.status not in SHARED_CLIENT_ERRORS


def http_error(exc: ProtocolError | BatchError) -> ProtocolError:
    """The HTTP status and reason of a failed request: a batcher error's message is the reason."""
    if isinstance(exc, ProtocolError):
        return exc
    return ProtocolError(BATCH_ERROR_STATUS.get(type(exc), 500), str(exc))


class SidecarMetrics:
    """The sidecar's Prometheus metrics (part of the API: names and labels are stable)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "leanserve_requests_total", "Requests by model and status code", ["model", "code"], registry=r
        )
        self.latency = Histogram(
            "leanserve_request_duration_seconds",
            "End-to-end latency through the sidecar",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_latency = Histogram(
            "leanserve_upstream_duration_seconds",
            "Latency of one batch upstream",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "leanserve_batch_size", "Rows per batch sent upstream", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("leanserve_queue_depth", "Requests waiting for a batch", ["model"], registry=r)
        self.padding = Counter(
            "leanserve_padding_elements",
            "Pad values added to batches sent upstream (pad_inputs: ragged batching)",
            ["model"],
            registry=r,
        )
        self.cache_hits = Counter("leanserve_cache_hits_total", "Cache hits by kind", ["kind"], registry=r)
        self.cache_misses = Counter("leanserve_cache_misses_total", "Cache misses by kind", ["kind"], registry=r)
        self.cache_rejected = Counter(
            "leanserve_cache_rejected_total",
            "Cache entries refused (served as misses) by kind and reason",
            ["kind", "reason"],
            registry=r,
        )
        self.cache_sync_errors = Counter(
            "leanserve_cache_sync_errors_total", "Failed syncs of the shared semantic index", registry=r
        )
        self.redis_up = Gauge(
            "leanserve_redis_up", "1 when the cache's Redis answers, 0 when serving uncached", registry=r
        )
        self.upstream_up = Gauge("leanserve_upstream_up", "1 when the upstream model server is ready", registry=r)
        # Children by label values, made once: ``labels()`` takes a lock and checks its arguments on every call,
        # several times per request. The label values are bounded (known models and UNKNOWN_MODEL, status codes).
        self._counted = functools.cache(self.requests.labels)
        self._timed = functools.cache(self.latency.labels)
        self.queue_of = functools.cache(self.queue_depth.labels)

    def answered(self, model: str, code: int, seconds: float) -> None:
        """Count one answered request (REST or gRPC) under its model label and HTTP status, and its latency."""
        self._counted(model, str(code)).inc()
        self._timed(model).observe(seconds)


class Upstream:
    """A v2 server reached over HTTP: infer, metadata (cached per model until the upstream turns ready again:
    it may be another model server on the same port) and readiness."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, metrics: SidecarMetrics) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.metrics = metrics
        self.ready = False
        self.specs: dict[str, list[TensorSpec]] = {}
        self.output_specs: dict[str, list[TensorSpec]] = {}
        self.reread_at: dict[str, float] = {}
        """When each model's metadata was last read again (monotonic): spaced by :data:`SPEC_REREAD_S`."""
        self.binary: bool | None = None
        """Whether the upstream lists the binary tensor data extension (None: not asked yet)."""

    def mark(self, ready: bool) -> None:
        if ready != self.ready:
            log.info("upstream %s ready=%s", self.base_url, ready)
        if ready and not self.ready:  # back from not ready: maybe another model on the same port
            self.specs.clear()
            self.output_specs.clear()
            self.binary = None
        self.ready = ready
        self.metrics.upstream_up.set(1 if ready else 0)

    async def send(
        self, method: str, path: str, body: bytes | None = None, header_length: int | None = None
    ) -> tuple[int, bytes, str | None]:
        """The status, raw body and ``Inference-Header-Content-Length`` of the upstream's answer; a 503 when
        it cannot be reached. ``header_length`` marks ``body`` as a JSON header followed by binary tensors."""
        headers = {"Content-Type": "application/json"}
        if header_length is not None:
            headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_length)}
        try:
            async with self.session.request(method, self.base_url + path, data=body, headers=headers) as resp:
                raw = await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.mark(False)
            raise ProtocolError(503, f"upstream model server unavailable: {type(exc).__name__}") from None
        return resp.status, raw, resp.headers.get(HEADER_LENGTH)

    async def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        status, raw, _ = await self.send(method, path, body)
        return status, error_payload(raw)

    async def speaks_binary(self) -> bool:
        """Whether the upstream's server metadata lists ``binary_tensor_data`` (asked once per ready period):
        then batches travel binary, else JSON, so any v2 server can stay behind the sidecar."""
        if self.binary is None:
            status, meta = await self.call("GET", "/v2")
            extensions = meta.get("extensions") if status == 200 and isinstance(meta, dict) else None
            self.binary = isinstance(extensions, list) and "binary_tensor_data" in extensions
        return self.binary

    async def check_ready(self) -> bool:
        with contextlib.suppress(ProtocolError):
            status, _ = await self.call("GET", "/v2/health/ready")
            self.mark(status == 200)
        return self.ready

    async def model_inputs(self, model: str, reread: bool = False) -> list[TensorSpec]:
        """The model's declared inputs, read once and kept until the upstream turns ready again; ``reread``
        reads them anew unless the last re-read was less than :data:`SPEC_REREAD_S` ago."""
        now = time.monotonic()
        stale = reread and now - self.reread_at.get(model, now - SPEC_REREAD_S) >= SPEC_REREAD_S
        if stale:
            self.reread_at[model] = now
        if model not in self.specs or stale:
            status, meta = await self.call("GET", f"/v2/models/{model}")
            if status != 200:
                self.specs.pop(model, None)
                self.reread_at.pop(model, None)  # kept for served models only: bounded whatever names clients send
                raise ProtocolError(status, meta.get("error", f"upstream answered {status}"))
            self.output_specs[model] = [TensorSpec.from_json(o) for o in meta.get("outputs", [])]
            self.specs[model] = [TensorSpec.from_json(i) for i in meta.get("inputs", [])]
        return self.specs[model]

    async def model_outputs(self, model: str) -> list[TensorSpec]:
        """The model's declared outputs (read with its inputs): what a cached answer is checked against."""
        await self.model_inputs(model)
        return self.output_specs[model]

    async def infer(self, model: str, request: InferRequest) -> list[Tensor]:
        """Run one (merged) request upstream: when the upstream speaks the binary extension, inputs and outputs
        travel binary (no float printed and parsed again; NaN and infinity reach the sidecar as they are);
        JSON both ways with an upstream that does not speak it.

        A binary hop that comes back as "invalid JSON" lost its ``Inference-Header-Content-Length`` on the
        way (a proxy between that drops it: the sidecar checked the body it sent): the sidecar says so once,
        goes on in JSON with this upstream, and sends the batch again."""
        if await self.speaks_binary():
            try:
                return await self._infer(model, request, binary=True)
            except BinaryHopLostError as exc:
                log.warning("event=binary_hop_off upstream=%s reason=%r", self.base_url, str(exc))
                self.binary = False
        return await self._infer(model, request, binary=False)

    async def _post_infer(self, model: str, body: bytes, header_length: int | None) -> tuple[int, bytes, str | None]:
        """One infer call upstream (:meth:`send`), its time in ``leanserve_upstream_duration_seconds``."""
        start = time.perf_counter()
        answer = await self.send("POST", f"/v2/models/{model}/infer", body, header_length)
        self.metrics.upstream_latency.labels(model).observe(time.perf_counter() - start)
        return answer

    async def relay(self, model: str, body: bytes, header_length: int | None) -> tuple[bytes, int | None]:
        """Send a client's infer body upstream as it came, and return the answer's payload as it came with its
        JSON header's length (the pass-through: nothing decoded, checked or encoded again here; the upstream
        checks the request and writes the answer, errors included, as it would for a direct client)."""
        status, raw, answer_length = await self._post_infer(model, body, header_length)
        if status != 200:
            raise ProtocolError(status if status < 500 else 502, error_reason(raw, status))
        self.mark(True)
        if answer_length is None:
            return raw, None
        if not answer_length.isdigit() or not 0 < int(answer_length) <= len(raw):
            raise ProtocolError(502, f"the upstream's answer is malformed: {HEADER_LENGTH} {answer_length[:40]!r}")
        return raw, int(answer_length)

    async def _infer(self, model: str, request: InferRequest, binary: bool) -> list[Tensor]:
        payload, header_length = encode_request(request, binary, binary_inputs=binary)
        status, raw, answer_length = await self._post_infer(model, payload, header_length)
        if status != 200:
            reason = error_reason(raw, status)
            if header_length is not None and status == 400 and reason.startswith("invalid JSON"):
                raise BinaryHopLostError(f"the upstream read a binary request as JSON: {reason}")
            raise ProtocolError(status if status < 500 else 502, reason)
        self.mark(True)
        try:
            return decode_outputs(raw, answer_length)
        except ProtocolError as exc:
            if binary and answer_length is None and exc.reason.startswith("invalid JSON"):
                raise BinaryHopLostError(f"a binary answer came without {HEADER_LENGTH}") from None
            raise ProtocolError(502, f"the upstream's answer is malformed: {exc.reason}") from None


class BinaryHopLostError(Exception):
    """A binary request or answer lost its ``Inference-Header-Content-Length`` between sidecar and upstream."""


def error_reason(raw: bytes, status: int) -> str:
    """The reason an upstream gave for a failed call: its v2 error's text, else which status it answered."""
    payload = error_payload(raw)
    reason = payload.get("error") if isinstance(payload, dict) else None
    return str(reason or f"upstream answered {status}")


def error_payload(raw: bytes) -> Any:
    """An upstream's JSON answer, or its first 200 characters as the error when it is not JSON."""
    try:
        return orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        return {"error": raw[:200].decode("utf-8", "replace")}


@dataclass
class Lookup:
    """What the caches answered for one request, and where the model's answer goes when they missed."""

    body: dict[str, Any] | None = None
    source: Source = "model"
    exact_key: str | None = None
    semantic: SemanticCache | None = None
    text: str | None = None
    vector: np.ndarray | None = None
    """The text's embedding, made by the lookup: storing the answer must not pay for it again."""


def cache_scope(config: SidecarConfig) -> CacheScope:
    """The deployment's cache namespace, model digest, integrity key and size limit, from the settings."""
    key = config.cache_hmac_key
    if not key and config.cache_hmac_key_file:
        with open(config.cache_hmac_key_file, encoding="utf-8") as file:
            key = file.read().strip()
    return CacheScope(
        namespace=config.cache_namespace or "default",
        model_digest=config.model_digest,
        hmac_key=key.encode() if key else None,
        max_entry_bytes=config.cache_max_entry_bytes,
    )


class ResponseCaches:
    """The cache policy over one Redis: the exact cache first (a hash, cheap), then the semantic cache (an
    embedding, dearer), else the model, whose answer is stored in both on the way out.

    A hit is served only once its record verified and its outputs are what the model declares for this
    request; its model name and version are the sidecar's. A refused entry is a miss, counted by reason.
    """

    def __init__(self, config: SidecarConfig, metrics: SidecarMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.scope = cache_scope(config)
        if self.scope.hmac_key is None:
            log.warning("no cache_hmac_key: cache entries are checked by structure only, not authenticated")
        self.redis = connect(config.redis_url)
        self.health = RedisHealth(lambda up: metrics.redis_up.set(1 if up else 0))
        self.exact = (
            ExactCache(self.redis, self.health, config.cache_ttl_seconds, config.cache_exclude_fields, self.scope)
            if config.exact_enabled
            else None
        )
        self.embedder = make_embedder(config.semantic_embedder) if config.semantic_enabled else None
        self.semantic: dict[str, SemanticCache] = {}

    async def lookup(self, model: str, request: InferRequest, outputs: list[TensorSpec]) -> Lookup:
        """Ask the exact cache, then the semantic one (counting hits, misses and refusals by kind);
        ``outputs`` are the model's declared outputs, which a hit must match."""
        found = Lookup()
        exact = self.exact
        if exact is not None:
            key = found.exact_key = exact_key(model, self.config.model_version, request, exact.exclude, self.scope)
            found.body = await self._served("exact", model, request, outputs, lambda: exact.get(key))
            if found.body is not None:
                found.source = "exact"
                return found
        semantic = await self.semantic_for(model)
        text = SemanticCache.text_of(request) if semantic is not None else None
        if semantic is not None and text is not None:
            found.semantic, found.text = semantic, text

            async def ask() -> Entry | None:
                entry, _, found.vector = await semantic.get(text)
                return entry

            found.body = await self._served("semantic", model, request, outputs, ask)
            if found.body is not None:
                found.source = "semantic"
        return found

    async def _served(
        self,
        kind: str,
        model: str,
        request: InferRequest,
        outputs: list[TensorSpec],
        ask: Callable[[], Awaitable[Entry | None]],
    ) -> dict[str, Any] | None:
        """The response body of a verified hit (the sidecar's model name and version, the entry's checked
        outputs), or None for a miss; a refused entry is logged, counted and a miss."""
        try:
            entry = await ask()
            body = None
            if entry is not None:
                checked = check_outputs(entry.body, outputs, request_rows(request), request.outputs)
                body = {"model_name": model, "outputs": checked}
                if self.config.model_version:
                    body["model_version"] = self.config.model_version
        except CacheRejectionError as exc:
            log.warning("cache entry refused kind=%s model=%s reason=%s detail=%s", kind, model, exc.reason, exc.detail)
            self.metrics.cache_rejected.labels(kind, exc.reason).inc()
            body = None
        self._count(kind, body)
        return body

    async def remember(self, found: Lookup, body: dict[str, Any]) -> None:
        """Store the model's answer (without the request id) in the caches the lookup missed."""
        if found.exact_key is None and found.text is None:
            return
        raw = dumps(body)
        if self.exact is not None and found.exact_key is not None:
            await self.exact.put(found.exact_key, raw)
        if found.semantic is not None and found.text is not None:
            await found.semantic.put(found.text, raw, found.vector)

    async def semantic_for(self, model: str) -> SemanticCache | None:
        """The model's semantic cache, made on its first request; None when semantic caching is off."""
        if self.embedder is None:
            return None
        cache = self.semantic.get(model)
        if cache is None:
            cache = self.semantic[model] = SemanticCache(
                self.redis,
                self.health,
                model,
                self.embedder,
                threshold=self.config.semantic_threshold,
                max_entries=self.config.semantic_max_entries,
                ttl_s=self.config.cache_ttl_seconds,
                scope=self.scope,
                on_reject=lambda reason: self.metrics.cache_rejected.labels("semantic_index", reason).inc(),
            )
            await cache.sync()  # start from the index other replicas share
        return cache

    async def sync(self) -> None:
        """Pull the entries other replicas added to the shared semantic indexes."""
        for cache in list(self.semantic.values()):  # a copy: a model's first request may add one meanwhile
            await cache.sync()

    async def close(self) -> None:
        await self.redis.aclose()

    def _count(self, kind: str, hit: dict[str, Any] | None) -> None:
        (self.metrics.cache_hits if hit is not None else self.metrics.cache_misses).labels(kind).inc()


@dataclass
class SidecarState:
    """What start-up opens (aiohttp's session needs the running event loop), clean-up closes."""

    session: aiohttp.ClientSession
    upstream: Upstream
    batcher: DynamicBatcher
    caches: ResponseCaches | None
    """None without ``redis_url``: every request goes to the model."""
    relay: bool = False
    """Pass requests through as they come (:func:`passes_through`)."""
    watch: asyncio.Task[None] | None = None
    grpc_server: grpc_aio.Server | None = None
    """The v2 gRPC service (grpc_service); None when ``grpc_port`` is 0."""


class Sidecar:
    """One sidecar process: its aiohttp application, start-up and clean-up, the health watch, the handlers.

    The handlers are the transport: errors become HTTP statuses here, the batcher's through
    :data:`BATCH_ERROR_STATUS`.
    """

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.metrics = SidecarMetrics()
        self._state: SidecarState | None = None
        self.app = web.Application(client_max_size=config.max_body_bytes, middlewares=[protocol_errors])
        self.drain = drainable(self.app)
        self.app[SIDECAR] = self
        self.app[CANCEL_ON_DISCONNECT] = True
        self.app.on_startup.append(self.startup)
        self.app.on_cleanup.append(self.cleanup)
        router = self.app.router
        router.add_get("/v2/health/live", self.live)
        router.add_get("/v2/health/ready", self.ready)
        router.add_get("/v2", self.proxy_get)
        router.add_get("/v2/models/{name}", self.proxy_get)
        router.add_get("/v2/models/{name}/ready", self.proxy_get)
        router.add_post("/v2/models/{name}/infer", self.infer)
        router.add_get("/metrics", metrics_handler(self.metrics.registry))

    @property
    def state(self) -> SidecarState:
        if self._state is None:
            raise RuntimeError("the sidecar has not started")
        return self._state

    async def startup(self, _: web.Application) -> None:
        """Open the upstream session, the batcher over it and the caches; check the upstream, then watch it."""
        config = self.config
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=config.request_timeout_s),
            connector=aiohttp.TCPConnector(limit=max(4, config.upstream_concurrency * 2)),
        )
        upstream = Upstream(config.upstream, session, self.metrics)
        caches = ResponseCaches(config, self.metrics) if config.redis_url else None
        if caches is None:
            self.metrics.redis_up.set(0)
        state = self._state = SidecarState(
            session, upstream, self.batcher_over(upstream), caches, relay=passes_through(config)
        )
        await upstream.check_ready()
        if config.grpc_port:
            os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)  # read once, when gRPC's core loads
            from leanserve_serving.grpc_service import start_grpc_server  # grpc is loaded only where it serves

            state.grpc_server = await start_grpc_server(self, config.host, config.grpc_port, config.max_body_bytes)
        state.watch = asyncio.create_task(self.watch(state))

    def batcher_over(self, upstream: Upstream) -> DynamicBatcher:
        """The configured batching in front of ``upstream``, its batches and queue in the metrics."""
        return DynamicBatcher(
            upstream.infer,
            max_batch_size=self.config.max_batch_size,
            max_wait_s=self.config.max_wait_ms / 1000.0,
            max_queue=self.config.max_queue,
            concurrency=self.config.upstream_concurrency,
            stats=BatchStats(
                on_batch=lambda model, size: self.metrics.batch_size.labels(model).observe(size),
                on_queue_depth=lambda model, depth: self.metrics.queue_of(model).set(depth),
                on_padding=lambda model, elements: self.metrics.padding.labels(model).inc(elements),
            ),
            isolate=one_members_fault,
            max_queue_wait_s=self.config.max_queue_wait_s or self.config.request_timeout_s,
            pad_inputs=self.config.pad_inputs,
            declared_outputs=upstream.output_specs.get,  # read with the inputs when the request was checked
            max_batch_bytes=batch_byte_cap(self.config),
        )

    async def watch(self, state: SidecarState) -> None:
        """Keep readiness and the shared semantic index fresh.

        Readiness must follow the model server whatever the cache does: a failed sync (anything
        in the shared Redis may be hostile) is logged, counted, and tried again next round."""
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            await state.upstream.check_ready()
            if state.caches is None:
                continue
            try:
                await state.caches.sync()
            except Exception:
                self.metrics.cache_sync_errors.inc()
                log.exception("semantic index sync failed; serving goes on")

    async def cleanup(self, _: web.Application) -> None:
        state = self._state
        if state is None:  # start-up failed before opening anything
            return
        if state.grpc_server is not None:  # first: its calls in flight still need the upstream session
            await state.grpc_server.stop(self.config.shutdown_timeout_s)
        if state.watch is not None:
            state.watch.cancel()
        await state.session.close()
        if state.caches is not None:
            await state.caches.close()

    async def check(self, model: str, request: InferRequest) -> None:
        """Check ``request`` against the model's inputs (a bad request never joins a batch). When they refuse
        it, read them again once and check again: a model server restarted with another model between two
        health checks must not be judged by the old model's shapes."""
        upstream = self.state.upstream
        inputs = await upstream.model_inputs(model)  # a model the upstream does not serve: its 404, no re-read
        try:
            check_inputs(inputs, request)
        except ProtocolError:
            check_inputs(await upstream.model_inputs(model, reread=True), request)

    async def answer(
        self, model: str, request: InferRequest, place: Place | None = None
    ) -> tuple[dict[str, Any], Source]:
        """The response body and where it came from (exact, semantic or model); ``place`` is the request's
        place in the batcher's queue, taken before it was read."""
        state = self.state
        await self.check(model, request)
        found = (
            await state.caches.lookup(model, request, await state.upstream.model_outputs(model))
            if state.caches is not None
            else Lookup()
        )
        if found.body is not None:
            return found.body, found.source
        outputs = await state.batcher.submit(model, request, self.config.request_timeout_s, place)
        body = encode_response(model, self.config.model_version, None, outputs)
        # JSON, the caches' format, cannot hold NaN or infinity: such an answer is not stored
        if state.caches is not None and not any(non_finite(t.data) for t in outputs):
            await state.caches.remember(found, body)
        return body, "model"

    async def infer(self, request: web.Request) -> web.Response:
        model = request.match_info["name"]
        start = time.perf_counter()
        code = 500  # until the request is answered: anything unforeseen reaches the middleware as a 500
        place: Place | None = None
        try:
            check_model_name(model)
            place = self.state.batcher.admit()  # before the body is read: refusing costs no decoding
            raw = await read_body(request)
            header_length = request.headers.get(HEADER_LENGTH)
            if await self.relays(model, header_length):
                payload, answer_length = await self.relay(model, raw, header_length, place)
                response = infer_response(payload, answer_length, headers={"X-Leanserve-Source": "model"})
                code = 200
                return response
            decoded = decode_request(raw, header_length)
            body, source = await self.answer(model, decoded, place)
            if decoded.id is not None:
                body = {**body, "id": decoded.id}
            payload, header_length = encode_body(body, decoded.encoding)
            response = infer_response(payload, header_length, headers={"X-Leanserve-Source": source})
            code = 200
            return response
        except (ProtocolError, BatchError) as exc:
            error = http_error(exc)
            code = error.status
            headers = {"Retry-After": "1"} if code in RETRY_LATER else None
            return error_response(code, error.reason, headers)
        except web.HTTPException as exc:  # 413: the body is over the limit
            code = exc.status
            raise
        except asyncio.CancelledError:  # the client went away (its request is not sent upstream)
            code = CLIENT_GONE
            raise
        finally:
            if place is not None:
                place.release()
            self.metrics.answered(self.model_label(model), code, time.perf_counter() - start)

    async def relays(self, model: str, header_length: str | None) -> bool:
        """Whether this request is passed through (:func:`passes_through`): when the sidecar relays, for a model
        the upstream serves (its 404 otherwise, as on the decoding path) and a body the upstream can read (a
        binary one only to an upstream that lists the binary extension; to one that does not, the sidecar
        decodes it and sends it on in JSON)."""
        state = self.state
        if not state.relay:
            return False
        await state.upstream.model_inputs(model)  # read once: the 404 of an unknown model, and its metric label
        return header_length is None or await state.upstream.speaks_binary()

    async def relay(
        self, model: str, body: bytes, header_length: str | None, place: Place | None
    ) -> tuple[bytes, int | None]:
        """Pass one request through to the upstream in the batcher's slots (its queue bound and timeout hold)."""
        length = None
        if header_length is not None:
            split_body(body, header_length)  # the same 400 as the decoding path for a header past the body
            length = int(header_length)
        upstream = self.state.upstream
        return await self.state.batcher.run_alone(
            model, lambda: upstream.relay(model, body, length), self.config.request_timeout_s, place
        )

    def model_label(self, model: str) -> str:
        """``model`` when the upstream serves it (its metadata was read), else one label for all the rest:
        a label per requested name would let any client grow the metrics without bound."""
        return model if self._state is not None and model in self._state.upstream.specs else UNKNOWN_MODEL

    async def live(self, _: web.Request) -> web.Response:
        return json_response({"live": True})

    async def ready(self, _: web.Request) -> web.Response:
        if self.drain.active:  # first: the endpoints must stop sending here, whatever the upstream's state
            return error_response(503, "draining: shutting down")
        if self.state.upstream.ready:
            return json_response({"ready": True})
        return error_response(503, "upstream model server is not ready")

    async def proxy_get(self, request: web.Request) -> web.Response:
        """Forward a metadata or readiness GET: the route's own path with a checked name, never the request's
        (decoded, a name like ``..%2F..%2Fmetrics`` would reach other paths of the upstream)."""
        path = request.match_info.route.resource.canonical  # type: ignore[union-attr]
        if "name" in request.match_info:
            path = path.format(name=check_model_name(request.match_info["name"]))
        status, payload = await self.state.upstream.call("GET", path)
        if path == "/v2" and status == 200 and isinstance(payload, dict):
            payload = {**payload, "extensions": EXTENSIONS}  # what the sidecar implements, whatever is behind it
        return json_response(payload, status=status)


#: The sidecar behind an application (for tests and tools that hold only the app).
SIDECAR = web.AppKey("sidecar", Sidecar)


def create_app(config: SidecarConfig) -> web.Application:
    """The sidecar's aiohttp application; connects to the upstream and Redis on startup."""
    return Sidecar(config).app


def pad_inputs_flag(text: str) -> dict[str, float | int]:
    """``--pad-inputs``: refused by argparse with the parser's own reason (not "invalid value")."""
    try:
        return parse_pad_inputs(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="leanserve batching, caching sidecar (Open Inference Protocol v2)")
    parser.add_argument("--upstream")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--grpc-port", type=int)
    parser.add_argument("--max-batch-size", type=int)
    parser.add_argument("--max-wait-ms", type=float)
    parser.add_argument("--max-queue", type=int)
    parser.add_argument(
        "--pad-inputs", type=pad_inputs_flag, metavar="NAME=VALUE,...", help="ragged batching, e.g. input_ids=0"
    )
    parser.add_argument("--redis-url")
    parser.add_argument("--semantic", dest="semantic_enabled", action="store_const", const=True)
    serve_main(parser, SidecarConfig, create_app, argv)


if __name__ == "__main__":
    main()
