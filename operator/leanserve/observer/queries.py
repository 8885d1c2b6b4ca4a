"""PromQL for one InferenceDeployment over a window: what the observer asks Prometheus, built from plain values.

Pure (strings in, strings out), so the queries can be read and tested without a Prometheus. Series are
selected by two labels, ``namespace`` and ``inferencedeployment``: in a cluster, Prometheus's relabelling
turns the pod's ``leanserve.dev/inferencedeployment`` label and its namespace into them (the serving pods
are scraped through their ``prometheus.io/*`` annotations, one target per pod: the sidecar's port); the
local stack's static targets carry the same two labels.

The queries return raw quantities (counts by status code and cache kind, latency quantiles, batch rows
and batches, replicas), never ratios: a ratio of two counts is the figures' business (leanserve.observer
.figures), where "no requests" can be told apart from "no errors" without PromQL's ``or vector(0)``.

Counters are read with ``increase()`` over the window. Prometheus extrapolates it from the first and last
samples inside the window to the window's edges: the right estimate of a rate over a window whose edges
fall between scrapes. Series of one target share their scrape timestamps, so hits and misses (or rows and
batches) are stretched by the same factor, which cancels in their ratio; the exception is a counter whose
first sample in the window is small beside its increase (a pod that just started): Prometheus then assumes
it started at zero and extrapolates less, each series by its own amount. And a labelled series is born at
its first event, so what it counted before its first scrape is not in any increase (the sidecar creates
``code`` and ``kind`` children on first use). Both matter for windows of a few scrapes only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

#: The latency quantiles the observer reads.
QUANTILES: tuple[float, ...] = (0.5, 0.95, 0.99)
#: At most this many points in the subquery that averages the replicas over the window.
REPLICA_POINTS = 240
#: A window shorter than this cannot hold two scrapes, which every increase() needs.
MIN_WINDOW_S = 1.0

_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@dataclass(frozen=True)
class DeploymentQueries:
    """Every query of one observation, each an instant query evaluated at the window's end."""

    requests_by_code: str
    """Requests answered in the window, by status code (``sum by (code)``)."""
    latency_quantiles: Mapping[float, str]
    """Quantile -> the sidecar's request duration at that quantile, seconds."""
    cache_hits_by_kind: str
    cache_misses_by_kind: str
    batch_rows: str
    """Rows sent upstream in the window (the batch-size histogram's sum)."""
    batches: str
    """Batches sent upstream in the window (its count)."""
    replicas: str
    """Targets up, averaged over the window."""


def check_names(namespace: str, name: str) -> None:
    """ValueError unless ``namespace`` is a Kubernetes namespace name and ``name`` an object name.

    They go into PromQL string literals: a name that passes can hold neither a quote nor a backslash.
    """
    if not _NAMESPACE.match(namespace):
        raise ValueError(f"namespace: a Kubernetes namespace name, got {namespace!r}")
    if not _NAME.match(name):
        raise ValueError(f"name: an InferenceDeployment name, got {name!r}")


def check_window(window_s: float) -> None:
    """ValueError unless ``window_s`` is a finite number of seconds, at least :data:`MIN_WINDOW_S`."""
    if not (math.isfinite(window_s) and window_s >= MIN_WINDOW_S):
        raise ValueError(f"window_s: at least {MIN_WINDOW_S:g} s, got {window_s}")


def selector(namespace: str, name: str) -> str:
    """The label matchers of one deployment's series, in braces."""
    check_names(namespace, name)
    return f'{{namespace="{namespace}",inferencedeployment="{name}"}}'


def duration(seconds: float) -> str:
    """A PromQL duration of ``seconds``, to the millisecond (``90500ms``)."""
    return f"{max(1, round(seconds * 1000))}ms"


def replica_step_s(window_s: float) -> float:
    """The subquery step of the replica average: a second, or coarser so the window holds at most
    :data:`REPLICA_POINTS` steps (a week is then averaged every 42 minutes, not at 600 000 points)."""
    return max(1.0, window_s / REPLICA_POINTS)


def deployment_queries(namespace: str, name: str, window_s: float) -> DeploymentQueries:
    """The queries of one observation of ``namespace/name`` over the ``window_s`` seconds before their time."""
    check_window(window_s)
    sel = selector(namespace, name)
    w = duration(window_s)

    def increase(metric: str, by: str = "") -> str:
        grouping = f" by ({by})" if by else ""
        return f"sum{grouping} (increase({metric}{sel}[{w}]))"

    buckets = f"sum by (le) (rate(leanserve_request_duration_seconds_bucket{sel}[{w}]))"
    return DeploymentQueries(
        requests_by_code=increase("leanserve_requests_total", "code"),
        latency_quantiles={q: f"histogram_quantile({q:g}, {buckets})" for q in QUANTILES},
        cache_hits_by_kind=increase("leanserve_cache_hits_total", "kind"),
        cache_misses_by_kind=increase("leanserve_cache_misses_total", "kind"),
        batch_rows=increase("leanserve_batch_size_sum"),
        batches=increase("leanserve_batch_size_count"),
        # sum(up): 1 per target scraped, 0 per target down; no series at all when no target is known.
        replicas=f"avg_over_time(sum(up{sel})[{w}:{duration(replica_step_s(window_s))}])",
    )
