"""What one deployment did over a window, as figures: pure arithmetic over what Prometheus answered.

The adapter (leanserve.observer.client) reads the raw quantities into :class:`Readings`; the figures,
their ratios and the cost per million requests are computed here, where "no requests" (a ratio that is
undefined) and "no errors" (a ratio of zero) are told apart in Python, and tested without a Prometheus.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

#: The sidecar's caches in the order it asks them: every cached request asks the first one it has; the
#: semantic cache is asked only after an exact miss.
CACHE_KINDS: tuple[str, ...] = ("exact", "semantic")
#: The status code the sidecar throttles with (its queue is full: come back after Retry-After).
THROTTLED = "429"


@dataclass(frozen=True)
class Readings:
    """One observation's answers from Prometheus, validated (finite, non-negative), before any arithmetic."""

    requests_by_code: Mapping[str, float]
    """Requests answered in the window, by HTTP status code; empty when no request was."""
    latency_s: Mapping[float, float | None]
    """Quantile (0.5, 0.95, 0.99) -> seconds; None where no request was timed in the window."""
    cache_hits_by_kind: Mapping[str, float]
    cache_misses_by_kind: Mapping[str, float]
    batch_rows: float | None
    batches: float | None
    replicas: float
    """Serving targets up, averaged over the window."""


@dataclass(frozen=True)
class Observation:
    """What Prometheus says one InferenceDeployment did in the ``window_s`` seconds up to ``at``.

    ``requests`` counts every request the sidecars answered, whatever the status: a 429 or a 5xx is
    traffic the deployment received and paid for, so the rate and the cost per request include it.
    """

    at: datetime
    window_s: float
    requests: float
    rps: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    error_rate: float
    """The share of requests answered 5xx; 0 without requests."""
    throttled_rate: float
    """The share answered 429 (the sidecar's queue was full); 0 without requests."""
    cache_hit_rate: float | None
    """Requests answered from a cache (exact or semantic) over requests that asked one; None without cache
    traffic (no cache configured, or no requests)."""
    mean_batch: float | None
    """Rows per batch sent upstream; None when no batch was sent (no requests, or all from the cache)."""
    replicas: float

    def cost_per_million(self, usd_per_hour: float) -> float | None:
        """USD per million requests: the replica-hours of the window at ``usd_per_hour`` (one replica's
        price) over the requests answered in it, times a million; None when no request was answered."""
        if not (math.isfinite(usd_per_hour) and usd_per_hour >= 0):
            raise ValueError(f"usd_per_hour: a finite, non-negative price, got {usd_per_hour}")
        if self.requests <= 0:
            return None
        replica_hours = self.replicas * self.window_s / 3600
        return replica_hours * usd_per_hour / self.requests * 1e6

    def to_api(self) -> dict[str, Any]:
        """The figures with the API's camelCase keys, ``at`` in RFC 3339 (UTC). A figure that could not be
        computed is None: in a JSON merge patch of the status, null removes the stale value."""
        return {
            "at": self.at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "windowSeconds": self.window_s,
            "requests": self.requests,
            "rps": self.rps,
            "p50Ms": self.p50_ms,
            "p95Ms": self.p95_ms,
            "p99Ms": self.p99_ms,
            "errorRate": self.error_rate,
            "throttledRate": self.throttled_rate,
            "cacheHitRate": self.cache_hit_rate,
            "meanBatch": self.mean_batch,
            "replicas": self.replicas,
        }


def share(part: float, whole: float) -> float:
    """``part`` over ``whole``, 0 when ``whole`` is; at most 1 (increase() extrapolates each series by its
    own factor near a counter's birth, which can put a part a hair over its whole)."""
    return min(1.0, part / whole) if whole > 0 else 0.0


def cache_hit_rate(hits: Mapping[str, float], misses: Mapping[str, float]) -> float | None:
    """Hits of every kind over lookups, where lookups are the hits and misses of the first cache the sidecar
    asks (exact when it has series, else semantic); None when no request asked a cache."""
    asked = [kind for kind in CACHE_KINDS if kind in hits or kind in misses]
    if not asked:
        return None
    front = asked[0]
    lookups = hits.get(front, 0.0) + misses.get(front, 0.0)
    if lookups <= 0:
        return None
    return share(sum(hits.get(kind, 0.0) for kind in CACHE_KINDS), lookups)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def observation(readings: Readings, *, at: datetime, window_s: float) -> Observation:
    """The figures of ``readings`` for the ``window_s`` seconds up to ``at``."""
    by_code = readings.requests_by_code
    requests = sum(by_code.values())
    errors = sum(n for code, n in by_code.items() if len(code) == 3 and code.startswith("5"))
    batches = readings.batches
    return Observation(
        at=at,
        window_s=window_s,
        requests=requests,
        rps=requests / window_s,
        p50_ms=_ms(readings.latency_s.get(0.5)),
        p95_ms=_ms(readings.latency_s.get(0.95)),
        p99_ms=_ms(readings.latency_s.get(0.99)),
        error_rate=share(errors, requests),
        throttled_rate=share(by_code.get(THROTTLED, 0.0), requests),
        cache_hit_rate=cache_hit_rate(readings.cache_hits_by_kind, readings.cache_misses_by_kind),
        mean_batch=(readings.batch_rows or 0.0) / batches if batches else None,
        replicas=readings.replicas,
    )
