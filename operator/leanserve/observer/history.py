"""The request-rate history of one InferenceDeployment, from Prometheus: what the predictive warm pool learns from.

One range query over the last ``days`` days: the deployment's request rate
(every model and status code: an error is served too) averaged over windows of
``step_s`` seconds, one point per window. The windows are aligned to multiples
of ``step_s`` (whole hours for an hourly step) and each point is stamped at the
*start* of the window it averages, so an hourly point says what that clock hour
carried; Prometheus stamps ``rate(x[1h])`` at the window's end, which would
shift a predicted peak an hour late.

Prometheus down, slow or answering nonsense raises :class:`ObserverUnavailable`:
the caller reads it as "not observed", never as "no traffic". A deployment
without samples gives an empty history.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.util.retry import Retry

from leanserve.observer.client import ObserverUnavailable, check_url
from leanserve.observer.queries import check_names, selector

#: Prometheus refuses a range query of more points than this per series.
MAX_POINTS = 11_000
#: A rate needs two scrapes in its window; below a minute that is not sure with the usual 15-30 s scrapes.
MIN_STEP_S = 60


def request_rate_query(namespace: str, name: str, window_s: int) -> str:
    """PromQL: the deployment's requests per second, over every model and code, averaged over ``window_s``."""
    return f"sum(rate(leanserve_requests_total{selector(namespace, name)}[{window_s}s]))"


def request_rate_history(
    url: str,
    namespace: str,
    name: str,
    *,
    days: int,
    step_s: int,
    timeout_s: float = 5.0,
    now: datetime | None = None,
) -> list[tuple[datetime, float]]:
    """(start of window, mean rps over the window) for the last ``days`` days, oldest first.

    The newest window ends at the last multiple of ``step_s`` before ``now``
    (default: the clock), so every point averages a whole window.
    """
    _check(url, namespace, name, days, step_s, timeout_s, now)
    step = timedelta(seconds=step_s)
    moment = (now or datetime.now(UTC)).timestamp()
    end = datetime.fromtimestamp(moment // step_s * step_s, UTC)
    start = end - timedelta(days=days) + step
    prometheus = PrometheusConnect(url=url, retry=Retry(total=0), timeout=timeout_s)  # type: ignore[arg-type]
    try:
        result = prometheus.custom_query_range(
            request_rate_query(namespace, name, step_s), start_time=start, end_time=end, step=str(step_s)
        )
    except (requests.RequestException, PrometheusApiClientException, ValueError) as exc:
        raise ObserverUnavailable(f"prometheus at {url}: {exc}") from exc
    return _points(result, step, url)


def _check(url: str, namespace: str, name: str, days: int, step_s: int, timeout_s: float, now: datetime | None) -> None:
    check_url(url)
    check_names(namespace, name)
    if days < 1:
        raise ValueError(f"days: at least 1, got {days}")
    if step_s < MIN_STEP_S:
        raise ValueError(f"step_s: at least {MIN_STEP_S} s, got {step_s}")
    if days * 86_400 // step_s > MAX_POINTS:
        raise ValueError(f"days={days}, step_s={step_s}: over the {MAX_POINTS} points Prometheus returns; widen step_s")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s: a positive number of seconds, got {timeout_s}")
    if now is not None and now.tzinfo is None:
        raise ValueError(f"now: a timezone-aware datetime is needed, got naive {now.isoformat()}")


def _points(result: Any, step: timedelta, url: str) -> list[tuple[datetime, float]]:
    """The series' points, restamped at the start of their windows; NaN (no rate there) left out."""
    if not isinstance(result, list) or len(result) > 1:
        raise ObserverUnavailable(f"prometheus at {url}: expected at most one series from sum(), got {result!r:.200}")
    if not result:
        return []
    try:
        values = [(float(t), float(v)) for t, v in result[0]["values"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ObserverUnavailable(f"prometheus at {url}: a range result that is not one: {exc}") from exc
    return [(datetime.fromtimestamp(t, UTC) - step, v) for t, v in values if math.isfinite(v) and v >= 0]
