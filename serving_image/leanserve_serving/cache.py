"""Response caches in Redis: exact (canonical hash of the inputs) and semantic (embedding similarity).

Redis is shared and writable by anything that reaches it, so nothing read back is trusted:

- entries are records (msgpack, never pickle: a poisoned entry is data, not code) holding the
  response body, the text it answered (semantic) and an integrity tag, an HMAC-SHA256 over
  key, body and text with the deployment's key (``cache_hmac_key``); a record that does not
  decode, is over the size limit or whose tag does not verify is a miss;
- a hit's outputs are checked against the model's declared outputs (names, datatypes, shape
  against the request's rows, data length) and only the outputs are served: the model name
  and version of the answer are the sidecar's, never the entry's;
- keys are namespaced by deployment and model digest, so another deployment or another
  model file sharing the Redis never meets these entries;
- the shared semantic index is keyed by embedder and dimension, and each vector is checked
  (length, finite, unit norm) before it joins the local index;
- a semantic hit must also pass guards that do not depend on the threshold: the numbers,
  negations and yes/no words of both texts match and their lengths are close (an embedding
  scores "$10" and "$100", "yes" and "no" as near-identical inside a longer text).

Every refused entry is a miss, counted by reason (``leanserve_cache_rejected_total``).
Redis being down never fails a request: the caches fail open (a miss), mark
``leanserve_redis_up`` 0, and stop trying for a short back-off so that a load
run does not pay a failed connection per request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import msgpack
import numpy as np
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from leanserve_serving.embedders import Embedder
from leanserve_serving.tensors import InferRequest, TensorSpec

log = logging.getLogger("leanserve.cache")

REDIS_ERRORS = (RedisError, OSError, TimeoutError)

T = TypeVar("T")

#: The layout of a cache record; a record of another layout is a miss.
RECORD_VERSION = 1

#: Why a cache entry was refused (the ``reason`` label of ``leanserve_cache_rejected_total``).
RejectReason = Literal["size", "format", "tag", "outputs", "guard", "id", "vector"]

#: A semantic index entry's id: the first 12 bytes of the text's blake2b, in hex.
ENTRY_ID = re.compile(rb"[0-9a-f]{24}")

#: How far from 1 the norm of a shared index vector may be (embedders write unit vectors).
NORM_TOLERANCE = 0.01

#: The longest of two texts may be at most this many times the shorter (in words) for a semantic hit.
MAX_LENGTH_RATIO = 1.5

#: Python types a JSON value of each v2 datatype may decode to.
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"), (int,)),
    **dict.fromkeys(("FP16", "FP32", "FP64"), (int, float)),
    "BOOL": (bool,),
    "BYTES": (str,),
}


class CacheRejectionError(Exception):
    """A cache entry that must not be served: a miss, counted with its reason."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class CacheScope:
    """Whose entries these are, and how they are sealed.

    ``namespace`` (the deployment) and ``model_digest`` (the model file's sha256, or what
    identifies the model served) go into every key: deployments sharing a Redis, and a
    deployment before and after its model changed, never read each other's entries.
    ``hmac_key`` signs and verifies records; without it records are checked by structure only.
    """

    namespace: str = "default"
    model_digest: str = ""
    hmac_key: bytes | None = None
    max_entry_bytes: int = 4 * 1024 * 1024

    def prefix(self, model: str) -> str:
        digest = hashlib.blake2b(self.model_digest.encode(), digest_size=8).hexdigest()
        return f"leanserve:{self.namespace}:{model}:{digest}"


@dataclass(frozen=True)
class Entry:
    """A cache record that decoded and verified: the response body and, for the semantic cache, its text."""

    body: dict[str, Any]
    text: str | None = None


def exact_key(
    model: str, version: str, request: InferRequest, exclude: set[str], scope: CacheScope | None = None
) -> str:
    """A canonical hash of what determines the answer: model, version, inputs, outputs, parameters.

    Inputs and parameters named in ``exclude`` (request ids, timestamps) are left out;
    the order of inputs and of parameter keys does not matter. The key lies under the
    scope's prefix (deployment and model digest).
    """
    scope = scope or CacheScope()
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{model}\0{version}\0{scope.model_digest}\0".encode())
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
    return f"{scope.prefix(model)}:exact:{h.hexdigest()}"


def integrity_tag(hmac_key: bytes, key: str, body: bytes, text: str | None) -> bytes:
    """HMAC-SHA256 over the record's key, body and text: an entry copied to another key, or edited, fails."""
    message = msgpack.packb([key, body, text])
    return hmac.new(hmac_key, message, hashlib.sha256).digest()


def seal(scope: CacheScope, key: str, body: bytes, text: str | None = None) -> bytes:
    """The record stored at ``key``: the body, the text it answered, and the tag (empty without a key)."""
    tag = integrity_tag(scope.hmac_key, key, body, text) if scope.hmac_key else b""
    return msgpack.packb({"v": RECORD_VERSION, "body": body, "text": text, "tag": tag})


def unseal(scope: CacheScope, key: str, raw: bytes) -> Entry:
    """The entry of a record read at ``key``; :class:`CacheRejectionError` when it is too big, malformed,
    or (with an HMAC key) its tag does not verify."""
    if len(raw) > scope.max_entry_bytes:
        raise CacheRejectionError("size", f"{len(raw)} bytes, over the limit of {scope.max_entry_bytes}")
    try:
        record = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise CacheRejectionError("format", f"not a cache record: {type(exc).__name__}") from None
    if not isinstance(record, dict) or record.get("v") != RECORD_VERSION:
        raise CacheRejectionError("format", "not a cache record of this version")
    body, text, tag = record.get("body"), record.get("text"), record.get("tag")
    if not isinstance(body, bytes) or not isinstance(text, str | None) or not isinstance(tag, bytes):
        raise CacheRejectionError("format", "a record field has the wrong type")
    if scope.hmac_key and not hmac.compare_digest(tag, integrity_tag(scope.hmac_key, key, body, text)):
        raise CacheRejectionError("tag", "the integrity tag does not verify")
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise CacheRejectionError("format", "the body is not JSON") from None
    if not isinstance(decoded, dict):
        raise CacheRejectionError("format", "the body is not a JSON object")
    return Entry(decoded, text)


def request_rows(request: InferRequest) -> int | None:
    """The request's batch rows (the first dimension of its inputs), None when it has no such dimension."""
    shapes = [t.shape for t in request.inputs if len(t.shape) >= 1]
    return shapes[0][0] if shapes else None


def check_outputs(
    body: dict[str, Any], specs: list[TensorSpec], rows: int | None, wanted: list[str] | None
) -> list[dict[str, Any]]:
    """The outputs of a cached body when they are what the model would answer to this request.

    Each output must be one the model declares (or the request asked for), once, with the
    declared datatype, a shape that fits the declared one (its first dimension the request's
    rows where the model's is free), and exactly as many values of that datatype as the shape
    holds. Raises :class:`CacheRejectionError` (reason ``outputs``) otherwise.
    """
    declared = {s.name: s for s in specs}
    expected = list(wanted) if wanted is not None else list(declared)
    outputs = body.get("outputs")
    if not isinstance(outputs, list) or not outputs:
        raise CacheRejectionError("outputs", "no outputs")
    names = [o.get("name") if isinstance(o, dict) else None for o in outputs]
    if sorted(map(str, names)) != sorted(expected) or len(set(names)) != len(names):
        raise CacheRejectionError("outputs", f"outputs {names}, the request expects {expected}")
    checked = []
    for out in outputs:
        spec = declared.get(out["name"])
        if spec is None:
            raise CacheRejectionError("outputs", f"the model has no output {out['name']!r}")
        if out.get("datatype") != spec.datatype:
            raise CacheRejectionError(
                "outputs", f"output {spec.name!r} is {out.get('datatype')!r}, not {spec.datatype}"
            )
        shape = out.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) != len(spec.shape)
            or not all(type(d) is int and d >= 0 for d in shape)
            or any(want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True))
            or (rows is not None and spec.shape and spec.shape[0] == -1 and shape[0] != rows)
        ):
            raise CacheRejectionError("outputs", f"output {spec.name!r} has shape {shape}, expected {list(spec.shape)}")
        data = out.get("data")
        allowed = _JSON_TYPES.get(spec.datatype, ())
        if not isinstance(data, list) or len(data) != math.prod(shape):
            raise CacheRejectionError("outputs", f"output {spec.name!r} does not hold {math.prod(shape)} values")
        if not all(isinstance(v, allowed) and (spec.datatype == "BOOL" or not isinstance(v, bool)) for v in data):
            raise CacheRejectionError("outputs", f"output {spec.name!r} holds values that are not {spec.datatype}")
        checked.append({"name": spec.name, "datatype": spec.datatype, "shape": shape, "data": data})
    return checked


# ---- semantic guards ---------------------------------------------------------------------------

#: A number (with its currency or percent sign) or a word.
_TOKEN = re.compile(r"[$€£¥]?\d+(?:[.,]\d+)*%?|[a-z]+(?:'[a-z]+)?")
#: Words that flip a statement; words ending in "n't" count too.
NEGATIONS = frozenset({"no", "not", "never", "none", "nothing", "nobody", "nowhere", "neither", "nor", "without"})
NEGATIONS |= {"cannot"}
#: Words whose swap flips an answer.
POLAR = frozenset({"yes", "no", "true", "false"})
#: Number words, so "ten" and "10" are the same number.
NUMBER_WORDS = {w: str(i) for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven"))}
NUMBER_WORDS |= {"eight": "8", "nine": "9", "ten": "10", "twelve": "12", "hundred": "100", "thousand": "1000"}


@dataclass(frozen=True)
class GuardFeatures:
    """What an embedding under-weights and an answer depends on: the numbers, negations and yes/no words."""

    numbers: tuple[str, ...]
    negations: int
    polar: tuple[str, ...]
    words: int


def guard_features(text: str) -> GuardFeatures:
    """The guard features of a text: its numbers in order (with currency and percent signs, number
    words as digits), its count of negations (so "isn't" and "is not" agree), its yes/no/true/false
    words in order, and its word count."""
    numbers, polar, negations = [], [], 0
    tokens = _TOKEN.findall(text.lower().replace("\u2019", "'"))
    for token in tokens:
        if token[0].isdigit() or token[0] in "$€£¥":
            numbers.append(token.replace(",", ""))
            continue
        if token in NUMBER_WORDS:
            numbers.append(NUMBER_WORDS[token])
        if token in POLAR:
            polar.append(token)
        if token in NEGATIONS or token.endswith("n't"):
            negations += 1
    return GuardFeatures(tuple(numbers), negations, tuple(polar), len(tokens))


def guard_refusal(query: str, cached: str) -> str | None:
    """Why ``cached``'s answer must not serve ``query`` although their embeddings are close, or None."""
    a, b = guard_features(query), guard_features(cached)
    if a.numbers != b.numbers:
        return f"numbers differ: {list(a.numbers)} vs {list(b.numbers)}"
    if a.negations != b.negations:
        return f"negations differ: {a.negations} vs {b.negations}"
    if a.polar != b.polar:
        return f"yes/no words differ: {list(a.polar)} vs {list(b.polar)}"
    if max(a.words, b.words) > MAX_LENGTH_RATIO * max(1, min(a.words, b.words)):
        return f"lengths differ: {a.words} vs {b.words} words"
    return None


def index_vector(raw_id: bytes, raw_vector: bytes, dimensions: int) -> tuple[str, np.ndarray]:
    """An entry of the shared semantic index, checked: an id of the form this code writes, and a finite
    float32 vector of the embedder's dimension and unit norm. :class:`CacheRejectionError` otherwise."""
    if not ENTRY_ID.fullmatch(raw_id):
        raise CacheRejectionError("id", f"index id {raw_id[:40]!r} is not one this cache writes")
    if len(raw_vector) != dimensions * 4:
        raise CacheRejectionError("vector", f"{len(raw_vector)} bytes, not {dimensions} float32 values")
    vector = np.frombuffer(raw_vector, dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(vector)) or abs(float(np.linalg.norm(vector)) - 1.0) > NORM_TOLERANCE:
        raise CacheRejectionError("vector", "not a finite unit vector")
    return raw_id.decode("ascii"), vector


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
    """Whole responses keyed by :func:`exact_key`, sealed records with a TTL."""

    def __init__(
        self, client: aioredis.Redis, health: RedisHealth, ttl_s: int, exclude: list[str], scope: CacheScope
    ) -> None:
        self.client = client
        self.health = health
        self.ttl_s = ttl_s
        self.exclude = set(exclude)
        self.scope = scope

    async def get(self, key: str) -> Entry | None:
        """The entry at ``key``, None when absent; :class:`CacheRejectionError` when it must not be served."""
        _, raw = await self.health.attempt(lambda: self.client.get(key))
        return None if raw is None else unseal(self.scope, key, raw)

    async def put(self, key: str, body: bytes) -> None:
        """Store a response body (JSON bytes, without the request id), unless it is over the size limit."""
        record = seal(self.scope, key, body)
        if len(record) <= self.scope.max_entry_bytes:
            await self.health.attempt(lambda: self.client.set(key, record, ex=self.ttl_s))


class SemanticCache:
    """Responses to text requests, found by cosine similarity of embeddings.

    The index (vectors) is held in memory for fast search and mirrored in Redis
    (a hash of id -> vector, one per embedder and dimension) so that replicas share
    it: :meth:`sync` pulls the entries other replicas added, checked, and drops the
    ones they removed. Responses live in Redis with the TTL, sealed with their text
    so that a hit is checked by :func:`guard_refusal`. The index is bounded: the
    least recently used entries are evicted.
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
        scope: CacheScope,
        on_reject: Callable[[RejectReason], None] = lambda _: None,
    ) -> None:
        self.client = client
        self.health = health
        self.embedder = embedder
        self.threshold = threshold
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.scope = scope
        self.on_reject = on_reject
        base = f"{scope.prefix(model)}:semantic:{embedder.name}:{embedder.dimensions}"
        self.vectors_key = f"{base}:vectors"
        self.prefix = f"{base}:response:"
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

    async def get(self, text: str) -> tuple[Entry | None, float, np.ndarray | None]:
        """The cached entry of the most similar text above the threshold, the similarity, and the
        text's embedding (pass it to :meth:`put` on a miss: embedding is the costly part).

        :class:`CacheRejectionError` when the entry must not be served: its record does not verify, or
        its text differs from ``text`` in what the guards check."""
        if not self.health.usable():  # before embedding: no vector is worth its cost while Redis is away
            return None, 0.0, None
        vector = self.embedder.embed(text)
        found = self._search(vector)
        if found is None or found[1] < self.threshold:
            return None, found[1] if found else 0.0, vector
        entry_id, score = found
        key = self.prefix + entry_id
        answered, raw = await self.health.attempt(lambda: self.client.get(key))
        if not answered:
            return None, score, vector
        if raw is None:  # expired: forget it here too
            self._drop(entry_id)
            return None, score, vector
        entry = unseal(self.scope, key, raw)
        if entry.text is None:
            raise CacheRejectionError("format", "a semantic entry without its text")
        refusal = guard_refusal(text, entry.text)
        if refusal is not None:
            raise CacheRejectionError("guard", refusal)
        self.entries.move_to_end(entry_id)
        return entry, score, vector

    async def put(self, text: str, body: bytes, vector: np.ndarray | None = None) -> None:
        """Store a response for ``text``; ``vector`` is its embedding when :meth:`get` already made it."""
        if not self.health.usable():  # before embedding, as in get
            return
        if vector is None:
            vector = self.embedder.embed(text)
        entry_id = hashlib.blake2b(text.encode(), digest_size=12).hexdigest()
        record = seal(self.scope, self.prefix + entry_id, body, text)
        if len(record) > self.scope.max_entry_bytes:
            return
        stored, _ = await self.health.attempt(lambda: self._write(entry_id, record, vector))
        if not stored:
            return
        self._add(entry_id, vector)
        await self._evict()

    async def _write(self, entry_id: str, record: bytes, vector: np.ndarray) -> None:
        """The record (with the TTL) and its vector in the shared index, in one round trip."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(self.prefix + entry_id, record, ex=self.ttl_s)
            pipe.hset(self.vectors_key, entry_id, vector.astype("<f4").tobytes())
            await pipe.execute()

    async def sync(self) -> int:
        """Mirror the shared index: add the entries other replicas added (each checked by
        :func:`index_vector`; a bad one is skipped and counted), drop the ones they removed.
        Returns how many were new."""
        answered, stored = await self.health.attempt(lambda: self.client.hgetall(self.vectors_key))
        if not answered or stored is None:
            return 0
        shared = set()
        new = 0
        for raw_id, raw_vec in stored.items():
            try:
                entry_id, vector = index_vector(raw_id, raw_vec, self.embedder.dimensions)
            except CacheRejectionError as exc:
                self.on_reject(exc.reason)
                continue
            shared.add(entry_id)
            if entry_id not in self.entries:
                self._add(entry_id, vector)
                new += 1
        for gone in [i for i in self.entries if i not in shared]:
            self._drop(gone)
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
