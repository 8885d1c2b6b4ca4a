"""Response caches in Redis: exact (canonical hash of the inputs) and semantic (embedding similarity).

Values are the JSON response bodies (and msgpack for the cache's own records),
never pickle: a poisoned cache entry is data, not code, and one that does not
decode is a miss.
Redis being down never fails a request: the caches fail open (a miss), mark
``leanserve_redis_up`` 0, and stop trying for a short back-off so that a load
run does not pay a failed connection per request.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgpack
import numpy as np
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from leanserve_serving.embedders import Embedder
from leanserve_serving.tensors import InferRequest

log = logging.getLogger("leanserve.cache")

REDIS_ERRORS = (RedisError, OSError, TimeoutError)

T = TypeVar("T")


def exact_key(model: str, version: str, request: InferRequest, exclude: set[str]) -> str:
    """A canonical hash of what determines the answer: model, version, inputs, outputs, parameters.

    Inputs and parameters named in ``exclude`` (request ids, timestamps) are left out;
    the order of inputs and of parameter keys does not matter.
    """
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{model}\0{version}\0".encode())
    for tensor in sorted(request.inputs, key=lambda t: t.name):
        if tensor.name in exclude:
            continue
        h.update(f"{tensor.name}\0{tensor.datatype}\0{tensor.shape}\0".encode())
        if tensor.datatype == "BYTES":
            for value in tensor.data.ravel():
                raw = value.encode() if isinstance(value, str) else bytes(value)
                h.update(len(raw).to_bytes(8, "little") + raw)
        else:
            h.update(np.ascontiguousarray(tensor.data).tobytes())
    params = {k: v for k, v in sorted(request.parameters.items()) if k not in exclude}
    h.update(msgpack.packb([request.outputs, params], default=str))
    return f"leanserve:exact:{model}:{h.hexdigest()}"


def _decode(raw: bytes | None) -> dict[str, Any] | None:
    """A cached response body, or None for a miss (absent, or not a JSON object: never trusted further)."""
    if raw is None:
        return None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        log.warning("ignoring a cache entry that is not JSON")
        return None
    return body if isinstance(body, dict) and isinstance(body.get("outputs"), list) else None


class RedisHealth:
    """Tracks whether Redis answers; after a failure, skip it for ``backoff_s`` (fail open)."""

    def __init__(self, on_change: Callable[[bool], None], backoff_s: float = 1.0) -> None:
        self.on_change = on_change
        self.backoff_s = backoff_s
        self.down_until = 0.0
        self.up = True
        on_change(True)

    def usable(self) -> bool:
        return time.monotonic() >= self.down_until

    def failed(self, exc: BaseException) -> None:
        if self.up:
            log.warning("redis unavailable, serving uncached: %s", exc)
        self.up = False
        self.down_until = time.monotonic() + self.backoff_s
        self.on_change(False)

    def succeeded(self) -> None:
        if not self.up:
            log.info("redis back, caching again")
        self.up = True
        self.on_change(True)

    async def attempt(self, operation: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        """Run one Redis operation, failing open: ``(True, its result)``, or ``(False, None)`` when Redis
        failed (recorded, see :meth:`failed`) or is in its back-off (the operation is not even started)."""
        if not self.usable():
            return False, None
        try:
            result = await operation()
        except REDIS_ERRORS as exc:
            self.failed(exc)
            return False, None
        self.succeeded()
        return True, result


def connect(url: str) -> aioredis.Redis:
    """A Redis client with short timeouts: a slow cache must not slow serving."""
    return aioredis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25, retry_on_timeout=False)


class ExactCache:
    """Whole responses keyed by :func:`exact_key`, with a TTL."""

    def __init__(self, client: aioredis.Redis, health: RedisHealth, ttl_s: int, exclude: list[str]) -> None:
        self.client = client
        self.health = health
        self.ttl_s = ttl_s
        self.exclude = set(exclude)

    async def get(self, key: str) -> dict[str, Any] | None:
        _, raw = await self.health.attempt(lambda: self.client.get(key))
        return _decode(raw)

    async def put(self, key: str, body: bytes) -> None:
        """Store a response body (JSON bytes, without the request id)."""
        await self.health.attempt(lambda: self.client.set(key, body, ex=self.ttl_s))


class SemanticCache:
    """Responses to text requests, found by cosine similarity of embeddings.

    The index (vectors) is held in memory for fast search and mirrored in Redis
    (a hash of id -> vector) so that replicas share it: :meth:`sync` pulls
    entries other replicas added. Responses live in Redis with the TTL. The
    index is bounded: the least recently used entries are evicted.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        health: RedisHealth,
        model: str,
        embedder: Embedder,
        threshold: float,
        max_entries: int,
        ttl_s: int,
    ) -> None:
        self.client = client
        self.health = health
        self.embedder = embedder
        self.threshold = threshold
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.vectors_key = f"leanserve:semantic:{model}:vectors"
        self.prefix = f"leanserve:semantic:{model}:response:"
        self.entries: OrderedDict[str, np.ndarray] = OrderedDict()  # LRU order: oldest first
        self._matrix: np.ndarray | None = None
        self._ids: list[str] = []

    @staticmethod
    def text_of(request: InferRequest) -> str | None:
        """The text of a request the semantic cache applies to: one BYTES input holding one string."""
        if len(request.inputs) != 1 or request.inputs[0].datatype != "BYTES" or request.inputs[0].data.size != 1:
            return None
        value = request.inputs[0].data.ravel()[0]
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    def _search(self, vector: np.ndarray) -> tuple[str, float] | None:
        if not self.entries:
            return None
        if self._matrix is None:
            self._ids = list(self.entries)
            self._matrix = np.stack([self.entries[i] for i in self._ids])
        scores = self._matrix @ vector
        best = int(np.argmax(scores))
        return self._ids[best], float(scores[best])

    async def get(self, text: str) -> tuple[dict[str, Any] | None, float, np.ndarray | None]:
        """The cached response of the most similar text above the threshold, the similarity, and the
        text's embedding (pass it to :meth:`put` on a miss: embedding is the costly part)."""
        if not self.health.usable():  # before embedding: no vector is worth its cost while Redis is away
            return None, 0.0, None
        vector = self.embedder.embed(text)
        found = self._search(vector)
        if found is None or found[1] < self.threshold:
            return None, found[1] if found else 0.0, vector
        entry_id, score = found
        answered, raw = await self.health.attempt(lambda: self.client.get(self.prefix + entry_id))
        if not answered:
            return None, score, vector
        if raw is None:  # expired: forget it here too
            self._drop(entry_id)
            return None, score, vector
        self.entries.move_to_end(entry_id)
        return _decode(raw), score, vector

    async def put(self, text: str, body: bytes, vector: np.ndarray | None = None) -> None:
        """Store a response for ``text``; ``vector`` is its embedding when :meth:`get` already made it."""
        if not self.health.usable():  # before embedding, as in get
            return
        if vector is None:
            vector = self.embedder.embed(text)
        entry_id = hashlib.blake2b(text.encode(), digest_size=12).hexdigest()
        stored, _ = await self.health.attempt(lambda: self._write(entry_id, body, vector))
        if not stored:
            return
        self._add(entry_id, vector)
        await self._evict()

    async def _write(self, entry_id: str, body: bytes, vector: np.ndarray) -> None:
        """The response (with the TTL) and its vector in the shared index, in one round trip."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(self.prefix + entry_id, body, ex=self.ttl_s)
            pipe.hset(self.vectors_key, entry_id, vector.astype(np.float32).tobytes())
            await pipe.execute()

    async def sync(self) -> int:
        """Pull entries other replicas added to the shared index; returns how many were new."""
        answered, stored = await self.health.attempt(lambda: self.client.hgetall(self.vectors_key))
        if not answered or stored is None:
            return 0
        new = 0
        for raw_id, raw_vec in stored.items():
            entry_id = raw_id.decode()
            if entry_id not in self.entries:
                self._add(entry_id, np.frombuffer(raw_vec, dtype=np.float32))
                new += 1
        await self._evict()
        return new

    def _add(self, entry_id: str, vector: np.ndarray) -> None:
        self.entries[entry_id] = vector
        self.entries.move_to_end(entry_id)
        self._matrix = None

    def _drop(self, entry_id: str) -> None:
        self.entries.pop(entry_id, None)
        self._matrix = None

    async def _evict(self) -> None:
        victims = []
        while len(self.entries) > self.max_entries:
            victim, _ = self.entries.popitem(last=False)
            victims.append(victim)
        if victims:
            self._matrix = None
            await self.health.attempt(lambda: self.client.hdel(self.vectors_key, *victims))
