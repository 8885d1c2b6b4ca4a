"""Judge: what Prometheus observed against what the plan predicted. Pure: figures in, status and verdicts out.

Called by decide (controller/decide.py) with one Observation (leanserve.observer). It writes
``status.observed`` (the figures, the prediction beside them and the error), judges the SLA and the
budget on observed figures once a window holds enough requests (before that, on the prediction), and
says whether the figures drifted from what the plan was sized for: traffic outside its band, a cache
hit rate off the expected one, or the SLA missed several windows in a row. Whether a drift leads to a
new plan (hysteresis, savings) is decide's call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from leanserve.api.spec import InferenceDeploymentSpec
from leanserve.controller.conditions import Cond
from leanserve.observer import Observation
from leanserve.planner.plan import HOURS_PER_MONTH, PlanOptions

#: The share of its capacity the planner loads each replica with, and the least a re-plan after SLA
#: misses goes down to (each such re-plan takes a fifth off).
DEFAULT_UTILIZATION = PlanOptions().max_utilization
MIN_UTILIZATION = 0.3

#: The quantiles Prometheus is asked for, and the status field of each.
QUANTILE_FIELDS = ((50.0, "p50Ms"), (95.0, "p95Ms"), (99.0, "p99Ms"))


@dataclass(frozen=True)
class Drift:
    """Observed figures outside what the plan assumed, and the figures to plan with instead."""

    reasons: list[str]
    """What drifted, with the figures (for the condition and the Event)."""
    sla_miss: bool
    """The SLA was missed several windows in a row (a new plan is then applied whatever it costs)."""
    replan: dict[str, Any] = field(default_factory=dict)
    """averageRps, peakRps, cacheHitRate, maxUtilization: what to plan with (status.observed.replan's shape)."""


@dataclass(frozen=True)
class Judgement:
    observed: dict[str, Any]
    """status.observed."""
    conditions: list[Cond]
    drift: Drift | None = None


def latency_at(observed: dict[str, Any], percentile: float) -> float | None:
    """The observed latency at the SLA's percentile: the nearest measured quantile at or above it."""
    for q, key in QUANTILE_FIELDS:
        if percentile <= q:
            return observed.get(key)
    return observed.get("p99Ms")


def _ratio_error(observed: float | None, predicted: float | None) -> float | None:
    if observed is None or not predicted:
        return None
    return round(observed / predicted - 1, 4)


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, digits)


def judge(
    spec: InferenceDeploymentSpec,
    plan: dict[str, Any],
    band: tuple[float, float],
    observation: Observation,
    usd_per_hour: float,
    previous: dict[str, Any],
) -> Judgement:
    """status.observed and the conditions from one observation of the plan ``plan`` (status.plan's shape).

    ``band`` is the lowest and the highest hourly request rate the plan was sized for; ``previous`` is
    the last status.observed (for the SLA miss streak and the replan in place).
    """
    figures = observation.to_api()
    observed: dict[str, Any] = {k: _round(v) if isinstance(v, float) else v for k, v in figures.items()}
    observed["updatedAt"] = observed.pop("at")
    observed["windowSeconds"] = max(1, int(observation.window_s))
    percentile, target = spec.sla.latency.percentile, spec.sla.latency.target_ms
    latency = latency_at(observed, percentile)
    observed["latencyMs"] = latency
    cost = observation.cost_per_million(usd_per_hour)
    observed["costPerMillionRequests"] = _round(cost)
    saturated = observation.throttled_rate > 0.01 and observation.replicas > 0
    capacity = observation.rps / observation.replicas if saturated else None
    observed["capacityRpsPerReplica"] = _round(capacity, 1)
    predicted = {
        "latencyMs": plan.get("predictedLatencyMs"),
        "costPerMillionRequests": plan.get("costPerMillionRequests"),
        "capacityRpsPerReplica": plan.get("capacityRpsPerReplica"),
    }
    observed["predicted"] = predicted
    observed["error"] = {
        "latency": _ratio_error(latency, predicted["latencyMs"]),
        "costPerMillion": _ratio_error(cost, predicted["costPerMillionRequests"]),
        "capacity": _ratio_error(capacity, predicted["capacityRpsPerReplica"]),
    }
    enough = observation.requests >= spec.observe.min_requests
    missed = enough and latency is not None and latency > target
    observed["slaMissStreak"] = int(previous.get("slaMissStreak") or 0) + 1 if missed else 0
    if previous.get("replan"):
        observed["replan"] = previous["replan"]
    summary = (
        f"{observation.requests:.0f} requests in {observation.window_s:g} s ({observation.rps:.1f} req/s), "
        f"p{percentile:g} {_ms(latency)} (predicted {_ms(predicted['latencyMs'])}), "
        f"{_usd(cost)}/1M (predicted {_usd(predicted['costPerMillionRequests'])})"
    )
    conditions = [Cond("Observed", "True", "Observed", summary)]
    if not enough:
        wait = f"{observation.requests:.0f} requests in the window, {spec.observe.min_requests} needed to judge"
        conditions.append(Cond("SLAMet", "Unknown", "NotEnoughTraffic", wait))
    elif latency is None:
        conditions.append(Cond("SLAMet", "Unknown", "NoLatency", "no request was timed in the window"))
    elif missed:
        message = f"observed p{percentile:g} {latency:.1f} ms > {target:g} ms ({observed['slaMissStreak']} in a row)"
        conditions.append(Cond("SLAMet", "False", "SLAMissed", message))
    else:
        conditions.append(
            Cond("SLAMet", "True", "SLAMet", f"observed p{percentile:g} {latency:.1f} ms <= {target:g} ms")
        )
    budget = _budget(spec, observation, cost, usd_per_hour, enough)
    if budget is not None:
        conditions.append(budget)
    drift = _drift(spec, band, observation, observed, predicted, previous) if enough else None
    return Judgement(observed, conditions, drift)


def not_observed(reason: str, previous: dict[str, Any] | None) -> tuple[dict[str, Any] | None, Cond]:
    """Prometheus could not say: the last figures stay as they were (with their time), Observed=False."""
    return previous, Cond("Observed", "False", "PrometheusUnavailable", reason)


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} ms"


def _usd(x: float | None) -> str:
    return "$n/a" if x is None else f"${x:.4f}"


def _budget(
    spec: InferenceDeploymentSpec, obs: Observation, cost: float | None, usd_per_hour: float, enough: bool
) -> Cond | None:
    """WithinBudget on observed figures (None: not enough traffic yet; the predicted condition stands)."""
    b = spec.budget
    if not enough or cost is None or (b.max_cost_per_million_requests is None and b.max_monthly_cost is None):
        return None
    over = []
    if b.max_cost_per_million_requests is not None and cost > b.max_cost_per_million_requests:
        over.append(f"observed ${cost:.4f}/1M > ${b.max_cost_per_million_requests:g}/1M")
    if b.max_monthly_cost is not None:
        monthly = obs.replicas * usd_per_hour * HOURS_PER_MONTH
        if monthly > b.max_monthly_cost:
            over.append(f"observed {obs.replicas:.1f} replicas, ${monthly:.0f}/month > ${b.max_monthly_cost:g}")
    if over:
        return Cond("WithinBudget", "False", "ObservedOverBudget", "; ".join(over))
    return Cond("WithinBudget", "True", "ObservedWithinBudget", f"observed ${cost:.4f}/1M")


def _drift(
    spec: InferenceDeploymentSpec,
    band: tuple[float, float],
    obs: Observation,
    observed: dict[str, Any],
    predicted: dict[str, Any],
    previous: dict[str, Any],
) -> Drift | None:
    d = spec.observe.drift
    in_place = previous.get("replan") or {}
    reasons: list[str] = []
    replan: dict[str, Any] = {}
    low, high = band
    average, peak = in_place.get("averageRps") or spec.traffic.average_rps, high
    if obs.rps > high * (1 + d.traffic_tolerance):
        reasons.append(f"traffic {obs.rps:.1f} req/s above the peak planned for ({high:.1f} req/s)")
        replan |= {"averageRps": average * obs.rps / high, "peakRps": obs.rps}
    elif low > 0 and obs.rps < low * (1 - d.traffic_tolerance):
        reasons.append(f"traffic {obs.rps:.1f} req/s below the lowest hour planned for ({low:.1f} req/s)")
        replan |= {"averageRps": average * obs.rps / low, "peakRps": peak * obs.rps / low}
    expected = in_place.get("cacheHitRate")
    if expected is None and spec.cache.exact.enabled:
        expected = spec.cache.exact.expected_hit_rate
    hit = obs.cache_hit_rate
    if hit is not None and expected is not None and abs(hit - expected) > d.hit_rate_tolerance:
        reasons.append(f"cache hit rate {hit:.1%}, planned with {expected:.1%}")
        replan["cacheHitRate"] = hit
    sla_miss = observed["slaMissStreak"] >= d.sla_miss_windows
    if sla_miss:
        latency, wanted = observed.get("latencyMs") or 0.0, predicted.get("latencyMs") or 0.0
        reasons.append(
            f"p{spec.sla.latency.percentile:g} {latency:.1f} ms over the {spec.sla.latency.target_ms:g} ms SLA "
            f"{observed['slaMissStreak']} windows in a row (predicted {wanted:.1f} ms)"
        )
        # The planner's model of this deployment is optimistic: plan each replica for less load.
        utilization = in_place.get("maxUtilization") or DEFAULT_UTILIZATION
        replan["maxUtilization"] = max(MIN_UTILIZATION, utilization * 0.8)
    if not reasons:
        return None
    return Drift(reasons, sla_miss, {k: round(v, 4) for k, v in replan.items()})
