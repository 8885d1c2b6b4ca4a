"""The Prometheus adapter: one deployment's figures over a window, read with prometheus-api-client.

Thin: the queries come from leanserve.observer.queries, the answers are checked by
leanserve.observer.answers, the arithmetic is leanserve.observer.figures; this module only asks and
turns every way of not getting an answer into :class:`ObserverUnavailable`. A Prometheus that is down,
slow, answers an error status or something that is not a Prometheus answer, or knows no scrape target of
the deployment, means "not observed": the operator must neither crash nor re-plan on it. A figure with no
data (no cache traffic, no requests to time) is None in the observation, not a failure.

All queries are evaluated at the same instant (``now``), so the figures describe one window. ``timeout_s``
bounds the whole observation, not each query: each query gets what is left of it, both as the HTTP
timeout and as Prometheus's own evaluation timeout. No retries: the operator observes again at its next
reconcile, and a retry's back-off would outlast the deadline.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

import requests
import urllib3
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.exceptions import NewConnectionError
from urllib3.util.retry import Retry

from leanserve.observer.answers import InvalidAnswer, Sample, by_label, instant_vector, single
from leanserve.observer.figures import Observation, Readings, observation
from leanserve.observer.queries import check_names, check_window, deployment_queries

#: How much of an error (Prometheus's message, a connection error) a reason quotes.
REASON_CHARS = 300


class ObserverUnavailable(Exception):  # noqa: N818  (the state it reports, as the operator speaks of it)
    """Prometheus could not say what the deployment did; ``reason`` says why, for a condition's message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_url(url: str) -> None:
    """ValueError unless ``url`` is an http(s) URL with a host (the configured Prometheus)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url: an http(s) URL of Prometheus, got {url!r}")


class _Prometheus:
    """Instant queries at one time against one Prometheus, under one deadline."""

    def __init__(self, url: str, at: datetime, timeout_s: float) -> None:
        self.url = url.rstrip("/")
        self.time = at.timestamp()
        self.deadline = time.monotonic() + timeout_s
        self.session = requests.Session()
        self.connection = PrometheusConnect(
            url=self.url,
            retry=Retry(total=0, raise_on_status=False),
            session=self.session,
            timeout=timeout_s,  # type: ignore[arg-type]  (annotated int; requests takes a float)
        )

    def close(self) -> None:
        self.session.close()

    def vector(self, query: str) -> list[Sample]:
        """The instant vector ``query`` evaluates to; ObserverUnavailable for no answer or not one."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ObserverUnavailable(f"prometheus at {self.url}: no answer within the observation's timeout")
        params = {"time": f"{self.time:.3f}", "timeout": f"{max(1, int(left * 1000))}ms"}
        try:
            result = self.connection.custom_query(query, params=params, timeout=left)  # type: ignore[arg-type]
        except requests.JSONDecodeError as exc:  # a 200 whose body is not JSON (a RequestException too)
            raise ObserverUnavailable(_reason(f"prometheus at {self.url}: not a Prometheus answer", exc)) from None
        except requests.RequestException as exc:
            raise ObserverUnavailable(_transport_failure(self.url, exc)[:REASON_CHARS]) from None
        except PrometheusApiClientException as exc:  # an HTTP status other than 200, with Prometheus's message
            raise ObserverUnavailable(_reason(f"prometheus at {self.url} answered an error", exc)) from None
        except (ValueError, KeyError, TypeError) as exc:  # a 200 whose body is not {"data": {"result": ...}}
            raise ObserverUnavailable(_reason(f"prometheus at {self.url}: not a Prometheus answer", exc)) from None
        try:
            return instant_vector(result)
        except InvalidAnswer as exc:
            raise self.invalid(query, exc) from None

    def invalid(self, query: str, exc: InvalidAnswer) -> ObserverUnavailable:
        """An answer that is not one, as ObserverUnavailable naming the query."""
        return ObserverUnavailable(f"prometheus at {self.url}: invalid answer ({exc}) to {query}"[:REASON_CHARS])


def _transport_failure(url: str, exc: requests.RequestException) -> str:
    """What went wrong on the way, without the request's URL (long, and the query is not the news)."""
    cause = exc.args[0] if exc.args else exc
    cause = getattr(cause, "reason", None) or cause  # urllib3's MaxRetryError carries the error it gave up on
    if isinstance(cause, NewConnectionError):  # first: it is a ConnectTimeoutError too
        return f"prometheus at {url} unreachable: {cause}"
    if isinstance(exc, requests.Timeout) or isinstance(cause, urllib3.exceptions.TimeoutError):
        return f"prometheus at {url}: no answer within the observation's timeout"
    return f"prometheus at {url} unreachable: {cause}"


def _reason(what: str, exc: BaseException) -> str:
    return f"{what}: {exc}"[:REASON_CHARS]


def _readings(prometheus: _Prometheus, namespace: str, name: str, window_s: float) -> Readings:
    """Every query of one observation, checked; ObserverUnavailable when no target of it was scraped."""
    queries = deployment_queries(namespace, name, window_s)

    def one(query: str, what: str) -> float | None:
        samples = prometheus.vector(query)
        try:
            return single(samples, what=what)
        except InvalidAnswer as exc:
            raise prometheus.invalid(query, exc) from None

    def grouped(query: str, label: str, what: str) -> dict[str, float]:
        samples = prometheus.vector(query)
        try:
            return by_label(samples, label, what=what)
        except InvalidAnswer as exc:
            raise prometheus.invalid(query, exc) from None

    replicas = one(queries.replicas, "replicas")
    if not replicas:  # no series (no target known) or 0 (no target scraped): nothing below would be measured
        state = "no scrape target" if replicas is None else "no scrape target up"
        raise ObserverUnavailable(f"prometheus at {prometheus.url}: {state} of {namespace}/{name} in the window")
    return Readings(
        requests_by_code=grouped(queries.requests_by_code, "code", "requests"),
        latency_s={q: one(query, f"latency quantile {q:g}") for q, query in queries.latency_quantiles.items()},
        cache_hits_by_kind=grouped(queries.cache_hits_by_kind, "kind", "cache hits"),
        cache_misses_by_kind=grouped(queries.cache_misses_by_kind, "kind", "cache misses"),
        batch_rows=one(queries.batch_rows, "batch rows"),
        batches=one(queries.batches, "batches"),
        replicas=replicas,
    )


def observe_deployment(
    url: str,
    namespace: str,
    name: str,
    window_s: float,
    *,
    timeout_s: float = 5.0,
    now: datetime | None = None,
) -> Observation:
    """What the Prometheus at ``url`` says ``namespace/name`` did in the ``window_s`` seconds up to ``now``.

    ``now`` (timezone-aware; default the clock) is the instant every query is evaluated at. Raises
    ObserverUnavailable, and nothing else, when Prometheus cannot say; ValueError for arguments that
    are wrong before anything is asked.
    """
    check_url(url)
    check_names(namespace, name)
    check_window(window_s)
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s: a positive number of seconds, got {timeout_s}")
    if now is not None and now.tzinfo is None:
        raise ValueError(f"now: a timezone-aware datetime is needed, got naive {now.isoformat()}")
    at = now or datetime.now(UTC)
    prometheus = _Prometheus(url, at, timeout_s)
    try:
        readings = _readings(prometheus, namespace, name, window_s)
    finally:
        prometheus.close()
    return observation(readings, at=at, window_s=window_s)
