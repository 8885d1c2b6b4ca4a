"""The predictive warm pool: a minReplicas schedule that is raised before each predicted rise. Pure: no I/O.

An HPA scales on what it sees, so at a daily peak it adds replicas when the
load is already there, and each new pod takes its cold start (pod created ->
Ready: image pull, model load, a node for GPU types) before it serves. Traffic
that repeats every day (or every week) can be served warm instead: this module
learns the rate each hour of the day (of the week, given two full weeks) needs
from the observed request-rate history, turns it into replicas, and writes a
schedule that raises minReplicas one cold start *before* each predicted rise
and lowers it only when the predicted busy hour is over. The HPA still scales
above the schedule on what it measures; the schedule is only its floor.

Each hour's rate is a high quantile (``DEFAULT_QUANTILE``, the 95th
percentile) of the samples that fell in that hour, not their maximum: the
maximum lets one burst (a load test, a retry storm, a one-off launch) keep
replicas warm at that hour every day for as long as the history remembers it,
while the 95th percentile still covers the hour's regular peak on (nearly)
every day it recurs. What lies above it is the HPA's to follow reactively.
With few samples in an hour (hourly points over a week: 7) the 95th percentile
lies between the two highest, close to the maximum.

Hours are hours of UTC. A sample ``(t, rps)`` is the rate at ``t``, or, for an
averaged sample (a Prometheus ``rate()`` over a window), the mean rate of the
interval that *starts* at ``t`` (``leanserve.observer.history`` stamps its
points so).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any, Literal

import numpy as np

HOUR_S = 3600
DAY_S = 24 * HOUR_S
WEEK_S = 7 * DAY_S

#: The quantile of an hour's samples taken as the rate that hour needs (see the module docstring).
DEFAULT_QUANTILE = 0.95
#: Hour-of-week needs two full weeks: each hour of the week seen at least twice.
WEEKLY_HISTORY_S = 2 * WEEK_S
#: Pods measured for the cold start (the newest), and the quantile of their cold starts taken.
COLD_START_RECENT_PODS = 20
COLD_START_QUANTILE = 0.9

Basis = Literal["warm-pool", "hour-of-day", "hour-of-week"]


@dataclass(frozen=True)
class WarmPoolStep:
    """From ``start_s`` (seconds into the schedule's period) until the next step, minReplicas is ``min_replicas``.

    The period is a day from 00:00 UTC or a week from Monday 00:00 UTC (the
    schedule's ``period_s``); the steps repeat every period.
    """

    start_s: int
    min_replicas: int


@dataclass(frozen=True)
class WarmPoolSchedule:
    """minReplicas over a repeating day or week, and the arithmetic it came from.

    ``steps`` start at 0, are sorted and change value at every step.
    ``hourly_rps`` and ``hourly_replicas`` are what each hour of the period was
    predicted to need (empty for a warm-pool-only schedule); ``reason`` says in
    one sentence which basis was used and why.
    """

    basis: Basis
    period_s: int
    steps: tuple[WarmPoolStep, ...]
    cold_start_s: float
    hourly_rps: tuple[float, ...]
    hourly_replicas: tuple[int, ...]
    reason: str

    def hourly(self) -> tuple[int, ...]:
        """minReplicas at the start of each hour of the period (a raise a cold start early shows an hour early)."""
        return tuple(_at_offset(self, h * HOUR_S) for h in range(self.period_s // HOUR_S))


def schedule(
    history: Sequence[tuple[datetime, float]],
    capacity_rps: float,
    *,
    warm_pool: int,
    max_replicas: int,
    cold_start_s: float,
    utilization: float = 0.8,
    quantile: float = DEFAULT_QUANTILE,
) -> WarmPoolSchedule:
    """The minReplicas schedule that serves the history's daily (or weekly) pattern warm.

    ``capacity_rps`` is what one replica serves within the SLA; replicas are
    sized to run at ``utilization`` of it, so a prediction a little short does
    not overload them. Every hour needs at least ``warm_pool`` and at most
    ``max_replicas`` (pass the HPA's bounds). Under a day of history there is no
    pattern to learn: the schedule is the warm pool, all the time.
    """
    _check_arguments(capacity_rps, warm_pool, max_replicas, cold_start_s, utilization, quantile)
    samples = _checked_history(history)
    span_s = _span_s(samples)
    if span_s < DAY_S:
        hours = f"{span_s / HOUR_S:.1f} h" if samples else "no"
        return _flat(warm_pool, cold_start_s, f"{hours} history, under a day: the warm pool only ({warm_pool})")

    basis: Basis = "hour-of-day"
    period_s = DAY_S
    reason = f"{span_s / DAY_S:.1f} days of history, under two full weeks: by hour of the day (UTC)"
    if span_s >= WEEKLY_HISTORY_S:
        weekly = _buckets(samples, WEEK_S)
        if all(weekly):
            basis, period_s = "hour-of-week", WEEK_S
            reason = f"{span_s / DAY_S:.1f} days of history, two full weeks or more: by hour of the week (UTC)"
        else:
            reason = f"{span_s / DAY_S:.1f} days of history but hours of the week unseen: by hour of the day (UTC)"
    buckets = _buckets(samples, period_s)

    observed = [float(np.quantile(b, quantile)) if b else None for b in buckets]
    busiest = max(r for r in observed if r is not None)
    unseen = observed.count(None)
    if unseen:
        # An hour without a sample (Prometheus was down) is not a quiet hour: assume the busiest.
        reason += f"; {unseen} hour(s) without samples take the busiest hour's rate"
    rates = tuple(busiest if r is None else r for r in observed)
    per_replica = capacity_rps * utilization
    replicas = tuple(_replicas(r, per_replica, warm_pool, max_replicas) for r in rates)
    steps = _steps(replicas, period_s, math.ceil(round(cold_start_s, 3)))  # 294.00000000000006 s is 294
    return WarmPoolSchedule(basis, period_s, steps, cold_start_s, rates, replicas, reason)


def min_replicas_at(schedule: WarmPoolSchedule, when: datetime) -> int:
    """minReplicas the schedule asks for at ``when`` (timezone-aware)."""
    if when.tzinfo is None:
        raise ValueError(f"when: a timezone-aware datetime is needed, got naive {when.isoformat()}")
    return _at_offset(schedule, _offset_s(when.astimezone(UTC), schedule.period_s))


def cold_start_seconds(
    pods: list[dict[str, Any]],
    *,
    recent: int = COLD_START_RECENT_PODS,
    quantile: float = COLD_START_QUANTILE,
) -> float | None:
    """The cold start (pod created -> Ready, seconds): a high quantile over the newest pods that became Ready.

    ``pods`` are Pod objects as the API serves them (camelCase dicts):
    ``metadata.creationTimestamp`` to the Ready condition's
    ``lastTransitionTime``. That time is the *last* transition, so a pod whose
    containers restarted (Ready again after a crash) is left out: its figure
    would be its uptime, not its start. A readiness blip without a restart still
    moves it, and cannot be told apart; the quantile (not the maximum) keeps one
    such pod from setting the figure. The quantile rather than the median
    because a raise that comes too late costs the peak's latency, one that
    comes early costs a few minutes of a warm replica. Node provisioning, when a
    pod waits for a new node, is part of the cold start and is counted.
    None without a Ready pod to measure.
    """
    if recent < 1:
        raise ValueError(f"recent: at least 1 pod, got {recent}")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile: between 0 and 1, got {quantile}")
    measured: list[tuple[datetime, float]] = []
    for pod in pods:
        created = _timestamp((pod.get("metadata") or {}).get("creationTimestamp"))
        status = pod.get("status") or {}
        ready = next(
            (c for c in status.get("conditions") or [] if c.get("type") == "Ready" and c.get("status") == "True"),
            None,
        )
        restarted = any(c.get("restartCount", 0) > 0 for c in status.get("containerStatuses") or [])
        if created is None or ready is None or restarted:
            continue
        became_ready = _timestamp(ready.get("lastTransitionTime"))
        if became_ready is None or became_ready < created:
            continue
        measured.append((created, (became_ready - created).total_seconds()))
    if not measured:
        return None
    newest = sorted(measured)[-recent:]
    return float(np.quantile([seconds for _, seconds in newest], quantile))


def _check_arguments(
    capacity_rps: float, warm_pool: int, max_replicas: int, cold_start_s: float, utilization: float, quantile: float
) -> None:
    if not (math.isfinite(capacity_rps) and capacity_rps > 0):
        raise ValueError(f"capacity_rps: a positive rate, got {capacity_rps}")
    if warm_pool < 0:
        raise ValueError(f"warm_pool: 0 or more, got {warm_pool}")
    if max_replicas < max(warm_pool, 1):
        raise ValueError(f"max_replicas: at least 1 and the warm pool ({warm_pool}), got {max_replicas}")
    if not (math.isfinite(cold_start_s) and cold_start_s >= 0):
        raise ValueError(f"cold_start_s: 0 or more seconds, got {cold_start_s}")
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"utilization: above 0 and at most 1, got {utilization}")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile: between 0 and 1, got {quantile}")


def _checked_history(history: Sequence[tuple[datetime, float]]) -> list[tuple[datetime, float]]:
    """The samples in UTC, sorted; a naive timestamp or a rate that is not a finite figure >= 0 is an error."""
    samples = []
    for i, (when, rps) in enumerate(history):
        if when.tzinfo is None:
            raise ValueError(f"history[{i}]: a timezone-aware datetime is needed, got naive {when.isoformat()}")
        if not (math.isfinite(rps) and rps >= 0):
            raise ValueError(f"history[{i}]: a rate of 0 or more, got {rps}")
        samples.append((when.astimezone(UTC), float(rps)))
    return sorted(samples)


def _span_s(samples: list[tuple[datetime, float]]) -> float:
    """How long the history covers: first to last sample, plus the interval the last one stands for."""
    if len(samples) < 2:
        return 0.0
    times = [t.timestamp() for t, _ in samples]
    intervals = [b - a for a, b in pairwise(times) if b > a]
    return times[-1] - times[0] + (float(np.median(intervals)) if intervals else 0.0)


def _offset_s(when: datetime, period_s: int) -> int:
    """Seconds into the day (from 00:00 UTC) or the week (from Monday 00:00 UTC)."""
    day = when.hour * HOUR_S + when.minute * 60 + when.second
    return day if period_s == DAY_S else when.weekday() * DAY_S + day


def _buckets(samples: list[tuple[datetime, float]], period_s: int) -> list[list[float]]:
    """The rates of the samples in each hour of the period."""
    buckets: list[list[float]] = [[] for _ in range(period_s // HOUR_S)]
    for when, rps in samples:
        buckets[_offset_s(when, period_s) // HOUR_S].append(rps)
    return buckets


def _replicas(rps: float, per_replica: float, warm_pool: int, max_replicas: int) -> int:
    """Replicas to serve ``rps`` at ``per_replica`` each, within [warm_pool, max_replicas]."""
    needed = math.ceil(rps / per_replica - 1e-9)  # 3.0000000001 replicas' worth of rounding error is 3
    return min(max_replicas, max(warm_pool, needed))


def _steps(replicas: tuple[int, ...], period_s: int, lead_s: int) -> tuple[WarmPoolStep, ...]:
    """minReplicas over the period: each hour's replicas from ``lead_s`` before the hour starts until it ends.

    At any moment the floor is the largest need of the hours it is inside or
    within a cold start ahead of, so a rise is met by pods started a cold start
    earlier, and a fall lowers the floor only once the busy hour is over. The
    period wraps: the lead of 00:00 reaches into the previous day.
    """
    starts = [h * HOUR_S for h in range(len(replicas))]
    breaks = sorted({s % period_s for s in starts} | {(s - lead_s) % period_s for s in starts} | {0})
    steps: list[WarmPoolStep] = []
    for at in breaks:
        covering = [
            n for s, n in zip(starts, replicas, strict=True) if (at - (s - lead_s)) % period_s < HOUR_S + lead_s
        ]
        value = max(covering)
        if not steps or steps[-1].min_replicas != value:
            steps.append(WarmPoolStep(at, value))
    return tuple(steps)


def _flat(warm_pool: int, cold_start_s: float, reason: str) -> WarmPoolSchedule:
    return WarmPoolSchedule("warm-pool", DAY_S, (WarmPoolStep(0, warm_pool),), cold_start_s, (), (), reason)


def _at_offset(schedule: WarmPoolSchedule, offset_s: int) -> int:
    starts = [step.start_s for step in schedule.steps]
    return schedule.steps[bisect.bisect_right(starts, offset_s % schedule.period_s) - 1].min_replicas


def _timestamp(value: object) -> datetime | None:
    """An API timestamp ("2024-05-01T12:00:00Z", or a datetime from the kubernetes client) in UTC, or None."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    return None
