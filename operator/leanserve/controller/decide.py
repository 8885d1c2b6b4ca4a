"""Decide: from what was observed, everything a reconcile should write. Pure: no API calls.

The second of reconcile's three steps. Every outcome (InvalidSpec, Profiling,
NoProfiles, NoCandidateAvailable, NoFeasiblePlan, Degraded, Deploying, Ready)
is a function of an ``Observed`` value and the configuration, tested without a
cluster (tests/test_decide.py). Planning happens here: the planner is pure too.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from leanserve.api.spec import InferenceDeploymentSpec
from leanserve.controller import builders, profile_store, profiling
from leanserve.controller.conditions import Cond, merge, parse_rfc3339, rfc3339
from leanserve.controller.config import OperatorConfig
from leanserve.controller.judge import judge, not_observed
from leanserve.controller.observe import Observed
from leanserve.planner.plan import Candidate, PlanResult, plan_deployment
from leanserve.planner.status import candidate_rows, plan_status, savings_rows
from leanserve.planner.unavailable import Unavailable
from leanserve.planner.warm_pool import cold_start_seconds, min_replicas_at
from leanserve.planner.warm_pool import schedule as warm_pool_schedule
from leanserve_serving.profile import Profile

#: Rows of the ranked table kept in status (every InferenceDeployment's status is held by watchers: keep it small).
STATUS_CANDIDATES = 20
#: How often a reconcile looks at the profiling Jobs while some are running.
PROFILING_POLL_S = 10.0
#: When no candidate could be measured (no node pool fits, every bench failed): look again this much later.
NO_CANDIDATE_RETRY_S = 300.0
#: How long to wait before looking for profiles again when none are cached.
PROFILE_RETRY_S = 60.0

#: One plan at a time per process. Planning is CPU-bound numpy (parallel plans gain little on a few
#: cores), each simulation holds tens of MB while it runs, and a plan waiting here usually finds the
#: configurations it needs already simulated by the one before (the memo). The lock changes no result.
_PLANNING = threading.Lock()


@dataclass
class Decision:
    """What to write, in the order act writes it, and what the handler should do next."""

    status: dict[str, Any]
    save_profiles: list[Profile] = field(default_factory=list)
    """Profiles measured by finished Jobs, for the cache."""
    create_jobs: list[dict[str, Any]] = field(default_factory=list)
    """Profiling Jobs to create."""
    apply: list[dict[str, Any]] = field(default_factory=list)
    """Objects to server-side apply, in order."""
    initial_replicas: int | None = None
    """The serving Deployment does not exist: create it with this many replicas first (the HPA owns the count)."""
    delete: list[dict[str, Any]] = field(default_factory=list)
    """Owned objects the spec no longer wants."""
    retry_after_s: float | None = None
    """Look again later (no profiles yet, profiling under way)."""
    retry_reason: str = ""
    permanent: str | None = None
    """Never with this spec (invalid spec); a new generation is needed."""
    plan: str = ""
    """The winner's label, for the log."""
    plan_seconds: float = 0.0
    events: list[tuple[str, str, str]] = field(default_factory=list)
    """(reason, message, type) of Events beyond condition changes (every re-plan on drift)."""


def decide(observed: Observed, config: OperatorConfig) -> Decision:
    """The status to write and the objects to create, apply and delete, from ``observed`` alone."""
    spec = observed.spec
    if spec is None:
        return _invalid_spec(observed)
    measuring = profiling.assess(observed, config)
    profiles = observed.profiles + measuring.measured
    if measuring.pending:
        decision = _profiling(observed, measuring)
    else:
        start = time.perf_counter()
        plan = Planning(spec, profiles, config, measuring.unavailable)
        result = plan(replan_in_place(observed))
        if result.winner is None:
            decision = _unplanned(observed, spec, result, profiles, measuring)
        else:
            judged = judge_observation(observed, config, plan, result)
            decision = _planned(observed, config, spec, judged.result, profiles, measuring, judged)
        decision.plan_seconds = time.perf_counter() - start
    decision.save_profiles = measuring.measured
    decision.create_jobs = measuring.create_jobs
    return decision


def _invalid_spec(observed: Observed) -> Decision:
    message = "the spec does not validate (written under an older schema?): " + "; ".join(observed.invalid)
    current = observed.status
    planned = Cond("Planned", "False", "InvalidSpec", message)
    status = {
        **current,
        "phase": "Failed",
        "observedGeneration": observed.generation,
        "conditions": merge(current.get("conditions") or [], [planned], observed.generation),
    }
    return Decision(status, permanent=message)


def _profiling(observed: Observed, measuring: profiling.ProfilingState) -> Decision:
    """Status while candidates are being measured: phase Profiling, what is done, pending and failed."""
    current = observed.status
    by_state: dict[str, list[str]] = {}
    for row in measuring.rows:
        by_state.setdefault(row["state"], []).append(row["instanceType"])
    summary = "; ".join(f"{state.lower()}: {', '.join(types)}" for state, types in sorted(by_state.items()))
    planned = Cond("Planned", "False", "Profiling", f"measuring candidate instance types ({summary})")
    status = {
        **current,
        "phase": "Profiling",
        "observedGeneration": observed.generation,
        "profiling": measuring.rows,
        "conditions": merge(current.get("conditions") or [], [planned], observed.generation),
    }
    return Decision(status, retry_after_s=PROFILING_POLL_S, retry_reason=f"profiling ({summary})")


def _unplanned(
    observed: Observed,
    spec: InferenceDeploymentSpec,
    result: PlanResult,
    profiles: list[Profile],
    measuring: profiling.ProfilingState,
) -> Decision:
    """Status for a spec that gets no plan: nothing new is applied; a running earlier plan keeps serving."""
    current = observed.status
    deployed = observed.serving is not None
    keeps = " The previously deployed plan keeps serving." if deployed else " Nothing was deployed."
    if not profiles and measuring.unavailable:
        reasons = "; ".join(f"{t}: {u.reason}" for t, u in sorted(measuring.unavailable.items()))
        message = f"no candidate instance type could be measured: {reasons}.{keeps}"
        planned = Cond("Planned", "False", "NoCandidateAvailable", message)
        phase, retry = "Failed", NO_CANDIDATE_RETRY_S
    elif not profiles:
        wanted = ", ".join(spec.candidates) or "every type in the price table"
        note = f" (unreadable profile ConfigMaps: {', '.join(observed.broken)})" if observed.broken else ""
        message = f"no profile of this model is cached for {wanted}{note}; looking again in {PROFILE_RETRY_S:.0f} s."
        planned = Cond("Planned", "False", "NoProfiles", message + keeps)
        phase, retry = "Pending", PROFILE_RETRY_S
    else:
        planned = Cond("Planned", "False", "NoFeasiblePlan", result.infeasible + "." + keeps)
        phase, retry = ("Degraded" if deployed else "Failed"), None
    conds = [planned, budget_condition(spec, result)]
    if not deployed:
        conds.append(Cond("Deployed", "False", "NotPlanned", "waiting for a plan"))
    status = {
        **current,
        "phase": phase,
        "observedGeneration": observed.generation,
        "profiling": measuring.rows,
        "candidates": [r.to_api() for r in candidate_rows(result, STATUS_CANDIDATES)],
        "conditions": merge(current.get("conditions") or [], conds, observed.generation),
    }
    if not deployed:
        status.pop("plan", None)
        status["savings"] = []
    return Decision(status, retry_after_s=retry, retry_reason=planned.message)


def _planned(
    observed: Observed,
    config: OperatorConfig,
    spec: InferenceDeploymentSpec,
    result: PlanResult,
    profiles: list[Profile],
    measuring: profiling.ProfilingState,
    judged: Judged,
) -> Decision:
    """A plan: the objects that serve it, and the status that shows it (with what was observed of it)."""
    winner = result.winner
    assert winner is not None
    itype = config.prices.get(winner.instance_type)
    assert itype is not None  # the planner only picks priced types
    floor, warm_pool = predicted_floor(observed, spec, winner)
    if floor > winner.replicas_min:
        winner = replace(winner, replicas_min=floor)
        result = replace(result, winner=winner)
    manifests = builders.render_all(observed.owner, spec, winner, itype, config.build)
    done = [f"{m['kind']}/{m['metadata']['name']}" for m in manifests]
    done += [f"deleted {m['kind']}/{m['metadata']['name']}" for m in observed.stale]
    # A Deployment about to be created has no ready replica yet: what the server would answer.
    ready, available = availability(observed.serving if observed.serving is not None else {})
    plan = plan_status(result)
    assert plan is not None
    plan_doc = plan.to_api()
    plan_doc["profileKeys"] = [
        profile_store.configmap_name(observed.key, p.instance_type, config.image_version) for p in profiles
    ]
    planned = Cond("Planned", "True", "Planned", _plan_message(spec, winner) + _skipped(measuring))
    deployed = Cond("Deployed", "True", "Applied", f"{len(manifests)} objects applied: " + ", ".join(done))
    conds = [planned, deployed, available, *judged.conditions]
    if not any(c.type == "WithinBudget" for c in judged.conditions) and not judged.keeps_budget:
        conds.append(budget_condition(spec, result))
    current = observed.status
    status = {
        "phase": "Ready" if available.status == "True" else "Deploying",
        "observedGeneration": observed.generation,
        "replicas": ready,
        "plan": plan_doc,
        "candidates": [r.to_api() for r in candidate_rows(result, STATUS_CANDIDATES)],
        "savings": [s.to_api() for s in savings_rows(result)],
        "profiling": measuring.rows,
        "conditions": merge(current.get("conditions") or [], conds, observed.generation),
    }
    if judged.observed:
        status["observed"] = judged.observed | ({"warmPool": warm_pool} if warm_pool else {})
    return Decision(
        status,
        apply=manifests,
        initial_replicas=winner.replicas_min if observed.serving is None else None,
        delete=list(observed.stale),
        plan=winner.label(),
        events=judged.events,
    )


def _plan_message(spec: InferenceDeploymentSpec, winner: Candidate) -> str:
    return (
        f"{winner.label()}: ${winner.cost_per_million:.4f}/1M requests, "
        f"predicted p{spec.sla.latency.percentile:g} {winner.latency_ms:.1f} ms "
        f"at {winner.capacity_rps:.0f} req/s per replica"
    )


def budget_condition(spec: InferenceDeploymentSpec, result: PlanResult) -> Cond:
    """WithinBudget, as predicted by the plan."""
    b = spec.budget
    if b.max_cost_per_million_requests is None and b.max_monthly_cost is None:
        return Cond("WithinBudget", "True", "NoBudget", "the spec sets no budget")
    w = result.winner
    if w is None:
        binding = "budget binds" in result.infeasible
        status, reason = ("False", "OverBudget") if binding else ("Unknown", "NotPlanned")
        return Cond("WithinBudget", status, reason, result.infeasible)
    limits = []
    if b.max_cost_per_million_requests is not None:
        limits.append(f"${w.cost_per_million:.4f}/1M <= ${b.max_cost_per_million_requests:g}/1M")
    if b.max_monthly_cost is not None:
        limits.append(f"${w.monthly_cost:.2f}/month <= ${b.max_monthly_cost:g}/month")
    return Cond("WithinBudget", "True", "PlanWithinBudget", "predicted " + ", ".join(limits))


def _skipped(measuring: profiling.ProfilingState) -> str:
    if not measuring.unavailable:
        return ""
    return "; left out: " + "; ".join(f"{t}: {u.reason}" for t, u in sorted(measuring.unavailable.items()))


def availability(deployment: dict[str, Any] | None) -> tuple[int, Cond]:
    """Ready replicas and the Available condition, from the serving Deployment's status."""
    if deployment is None:
        return 0, Cond("Available", "False", "NotDeployed", "the serving Deployment does not exist yet")
    status = deployment.get("status") or {}
    ready = int(status.get("readyReplicas") or 0)
    available = {c["type"]: c for c in status.get("conditions") or []}.get("Available")
    if ready > 0 and (available is None or available.get("status") == "True"):
        return ready, Cond("Available", "True", "ReplicasReady", f"{ready} serving replica(s) ready")
    waiting = available.get("message", "") if available else ""
    return ready, Cond("Available", "False", "ReplicasNotReady", waiting or "no serving replica is ready yet")


def availability_status(current: dict[str, Any], deployment: dict[str, Any] | None) -> dict[str, Any] | None:
    """The status with replicas, Available and the phase brought up to date from the serving Deployment;
    None before anything was deployed (nothing to report yet)."""
    conditions = current.get("conditions") or []
    if not any(c["type"] == "Deployed" and c["status"] == "True" for c in conditions):
        return None
    ready, available = availability(deployment)
    status = dict(current)
    status["replicas"] = ready
    status["conditions"] = merge(conditions, [available], current.get("observedGeneration"))
    if current.get("phase") in ("Deploying", "Ready"):
        status["phase"] = "Ready" if available.status == "True" else "Deploying"
    return status


class Planning:
    """Plans this deployment, with the figures of a re-plan in place when there is one."""

    def __init__(
        self,
        spec: InferenceDeploymentSpec,
        profiles: list[Profile],
        config: OperatorConfig,
        unavailable: dict[str, Unavailable],
    ) -> None:
        self.spec, self.profiles, self.config, self.unavailable = spec, profiles, config, unavailable

    def __call__(self, replan: dict[str, Any] | None) -> PlanResult:
        spec, base = self.spec, self.config.plan_options
        options = replace(base, unavailable={**base.unavailable, **self.unavailable})
        if replan:
            traffic = spec.traffic
            average = replan.get("averageRps") or traffic.average_rps
            peak = max(replan.get("peakRps") or traffic.effective_peak_rps(), average)
            changes = {"average_rps": average, "peak_rps": peak}
            spec = spec.model_copy(update={"traffic": traffic.model_copy(update=changes)})
            if replan.get("cacheHitRate") is not None:
                options = replace(options, observed_hit_rate=replan["cacheHitRate"])
            if replan.get("maxUtilization"):
                options = replace(options, max_utilization=replan["maxUtilization"])
        with _PLANNING:
            return plan_deployment(spec, self.profiles, self.config.prices, options, self.config.memo)


def replan_in_place(observed: Observed) -> dict[str, Any] | None:
    """The figures of the last re-plan on drift, while the spec is the one they were observed under."""
    replan = (observed.status.get("observed") or {}).get("replan")
    if replan and replan.get("generation") == observed.generation:
        return replan
    return None


@dataclass
class Judged:
    """What the observation says, for _planned: status.observed, conditions, Events, the plan to apply."""

    result: PlanResult
    observed: dict[str, Any] | None = None
    conditions: list[Cond] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    keeps_budget: bool = False
    """No reading this time: the WithinBudget condition stays as the last reading judged it."""


def judge_observation(observed: Observed, config: OperatorConfig, plan: Planning, result: PlanResult) -> Judged:
    """Judge the plan in place on what Prometheus observed; plan again on drift, at most once a period."""
    spec = plan.spec
    previous = observed.status.get("observed") or None
    in_place = observed.status.get("plan")
    if not config.prometheus_url:
        why = "the operator has no Prometheus to read (chart value observer.prometheusUrl)"
        return Judged(result, previous, [Cond("Observed", "False", "NoPrometheus", why)])
    if observed.observation_error is not None:
        kept, cond = not_observed(observed.observation_error, previous)
        return Judged(result, kept, [cond], keeps_budget=True)
    itype = config.prices.get(in_place["instanceType"]) if in_place else None
    if observed.observation is None or in_place is None or itype is None:  # not due, or nothing deployed yet
        return Judged(result, previous, keeps_budget=previous is not None)
    band = (min(result.hourly_rps, default=0.0), max(result.hourly_rps, default=0.0))
    verdict = judge(spec, in_place, band, observed.observation, itype.on_demand_usd_per_hour, previous or {})
    judged = Judged(result, verdict.observed, list(verdict.conditions))
    drift = verdict.drift
    if drift is None or not spec.observe.drift.enabled:
        judged.conditions.append(Cond("Drift", "False", "NoDrift", "the observed figures are within what was planned"))
        return judged
    found = "; ".join(drift.reasons)
    last = ((previous or {}).get("replan") or {}).get("at")
    wait = spec.observe.drift.min_interval_seconds
    if last and (observed.now - parse_rfc3339(last)).total_seconds() < wait:
        message = f"{found}; not re-planned: the last re-plan was at {last}, less than {wait} s ago"
        judged.conditions.append(Cond("Drift", "False", "DriftTooSoon", message))
        return judged
    replan = {**(replan_in_place(observed) or {}), **drift.replan}
    replan |= {"at": rfc3339(observed.now), "reason": found, "generation": observed.generation}
    candidate = plan(replan)
    current = _same_configuration(candidate, in_place)
    new = candidate.winner
    if new is None:
        judged.conditions.append(Cond("Drift", "False", "DriftNoPlan", f"{found}; {candidate.infeasible}"))
        return judged
    was = f"${current.cost_per_million:.4f}/1M" if current and current.feasible else "infeasible"
    gain = f"{in_place['instanceType']} {in_place['precision']} at the observed figures: {was}; "
    gain += f"{new.label()}: ${new.cost_per_million:.4f}/1M"
    worth = spec.observe.drift.min_savings
    cheaper = current is None or not current.feasible or new.cost_per_million <= current.cost_per_million * (1 - worth)
    if not (drift.sla_miss or cheaper):
        message = f"{found}; not re-planned: saves less than {worth:.0%} ({gain})"
        judged.conditions.append(Cond("Drift", "False", "DriftNoGain", message))
        return judged
    message = f"re-planned: {found} ({gain})"
    judged.result = candidate
    judged.observed = {**verdict.observed, "replan": replan}
    judged.conditions.append(Cond("Drift", "True", "Replanned", message))
    judged.events.append(("Replanned", message, "Normal"))
    return judged


def _same_configuration(result: PlanResult, plan: dict[str, Any]) -> Candidate | None:
    """The plan in place (status.plan's shape) among ``result``'s candidates, priced at its figures."""
    batch, wait = plan.get("maxBatchSize") or 1, plan.get("maxWaitMs") or 0.0
    for c in result.candidates:
        same_wait = c.policy.max_batch == 1 or c.policy.max_wait_ms == wait
        if (c.instance_type, c.variant, c.policy.max_batch) == (
            plan["instanceType"],
            plan["precision"],
            batch,
        ) and same_wait:
            return c
    return None


#: The cold start assumed before one is measured on the deployment's own pods.
DEFAULT_COLD_START_S = 60.0


def predicted_floor(observed: Observed, spec: InferenceDeploymentSpec, winner: Candidate) -> tuple[int, dict | None]:
    """minReplicas the predictive warm pool asks for now, and status.observed.warmPool.

    From this reading's two-week history when there is one (the schedule is made again each reading);
    else the last schedule's figure stands (Prometheus down keeps the pool as it was).
    """
    previous = (observed.status.get("observed") or {}).get("warmPool")
    if not spec.autoscaling.predictive_warm_pool:
        return winner.replicas_min, None
    if observed.history is not None:
        cold = cold_start_seconds(observed.serving_pods) or DEFAULT_COLD_START_S
        plan = warm_pool_schedule(
            observed.history,
            winner.capacity_rps,
            warm_pool=winner.replicas_min,
            max_replicas=winner.replicas_max,
            cold_start_s=cold,
        )
        floor = min_replicas_at(plan, observed.now)
        doc = {
            "basis": plan.basis,
            "minReplicas": floor,
            "coldStartSeconds": round(cold, 1),
            "reason": plan.reason,
            "at": rfc3339(observed.now),
        }
        return min(max(floor, winner.replicas_min), winner.replicas_max), doc
    if previous:
        return min(max(int(previous["minReplicas"]), winner.replicas_min), winner.replicas_max), previous
    return winner.replicas_min, None
