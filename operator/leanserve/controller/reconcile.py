"""Reconcile one InferenceDeployment: parse, read profiles, plan, build, apply, report.

Level-based: from the object as it is now, compute the objects it should own
and apply them all with server-side apply; compute its status and write it only
when it differs. Running it twice in a row writes nothing the second time.

No kopf here (the handlers call this and translate the outcome into kopf's
retry vocabulary), and no planning or manifest logic (planner, builders).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kubernetes.client import ApiClient
from pydantic import ValidationError

from leanserve import __version__
from leanserve.api.spec import InferenceDeploymentSpec
from leanserve.api.validation import errors_from_validation
from leanserve.controller import builders, kube, profile_store, profiling
from leanserve.controller.builders import BuildSettings, Owner
from leanserve.controller.conditions import Cond, merge, same_status, transitions
from leanserve.planner.plan import PlanOptions, PlanResult, plan_deployment
from leanserve.planner.prices import PriceTable, load_prices
from leanserve.planner.status import candidate_rows, plan_status, savings_rows

log = logging.getLogger("leanserve.operator")

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
#: configurations it needs already simulated by the one before (the planner remembers them).
_PLANNING = threading.Lock()


@dataclass(frozen=True)
class OperatorSettings:
    """What the operator runs with: images, prices, planner options (from the environment by default)."""

    build: BuildSettings = field(default_factory=BuildSettings)
    prices: PriceTable = field(default_factory=load_prices)
    plan_options: PlanOptions = field(default_factory=PlanOptions)
    image_version: str = __version__

    @classmethod
    def from_environment(cls, custom_metrics: bool = False) -> OperatorSettings:
        """LEANSERVE_SERVING_IMAGE, LEANSERVE_GPU_IMAGE, LEANSERVE_REDIS_IMAGE, LEANSERVE_PRICES (a file)."""
        env = os.environ
        defaults = BuildSettings()
        build = BuildSettings(
            image=env.get("LEANSERVE_SERVING_IMAGE", defaults.image),
            gpu_image=env.get("LEANSERVE_GPU_IMAGE", defaults.gpu_image),
            redis_image=env.get("LEANSERVE_REDIS_IMAGE", defaults.redis_image),
            custom_metrics=custom_metrics,
        )
        prices_file = env.get("LEANSERVE_PRICES")
        return cls(build=build, prices=load_prices(Path(prices_file) if prices_file else None))


@dataclass
class Outcome:
    """What a reconcile did, for the handler (retries) and the caller (tests, benchmarks)."""

    status: dict[str, Any]
    applied: list[str] = field(default_factory=list)
    """kind/name of every object applied."""
    status_written: bool = False
    retry_after_s: float | None = None
    """Try again later (no profiles yet, profiling under way)."""
    retry_reason: str = ""
    permanent: str | None = None
    """Never with this spec (invalid spec); a new generation is needed."""
    plan_seconds: float = 0.0


def _owner(body: dict[str, Any]) -> Owner:
    meta = body["metadata"]
    return Owner(meta["name"], meta["namespace"], meta["uid"])


def _invalid(body: dict[str, Any], exc: ValidationError) -> list[str]:
    return ["spec." + e.format() for e in errors_from_validation(exc, body.get("spec"))]


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


def _write(api: ApiClient, body: dict[str, Any], status: dict[str, Any], outcome: Outcome) -> None:
    current = body.get("status") or {}
    if same_status(current, status):
        return
    meta = body["metadata"]
    removed = {k: None for k in current if k not in status}  # a merge patch deletes with null
    kube.patch_status(api, meta["name"], meta["namespace"], {**status, **removed})
    outcome.status_written = True
    for cond in transitions(current.get("conditions") or [], status.get("conditions") or []):
        kind = "Normal" if cond["status"] == "True" or cond["type"] == "Available" else "Warning"
        kube.post_event(api, body, cond["reason"], cond["message"], kind)


def reconcile(api: ApiClient, body: dict[str, Any], settings: OperatorSettings) -> Outcome:
    """Bring the cluster in line with ``body`` (an InferenceDeployment as the API server has it)."""
    meta = body["metadata"]
    generation = meta.get("generation")
    current = body.get("status") or {}
    conditions = current.get("conditions") or []
    try:
        spec = InferenceDeploymentSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        message = "the spec does not validate (written under an older schema?): " + "; ".join(_invalid(body, exc))
        status = {
            **current,
            "phase": "Failed",
            "observedGeneration": generation,
            "conditions": merge(conditions, [Cond("Planned", "False", "InvalidSpec", message)], generation),
        }
        outcome = Outcome(status, permanent=message)
        log.warning("event=invalid_spec name=%s/%s generation=%s %s", meta["namespace"], meta["name"], generation,
                    message)  # fmt: skip
        _write(api, body, status, outcome)
        return outcome

    owner = _owner(body)
    key = profile_store.model_key(spec.model)
    profiles, broken = profile_store.load(api, owner.namespace, key, settings.image_version)
    measuring = profiling.ensure_profiles(api, owner, spec, settings.prices, settings.build, key, profiles,
                                          settings.image_version)  # fmt: skip
    profiles = profiles + measuring.measured
    if measuring.pending:
        outcome = _profiling(body, measuring, generation)
        _write(api, body, outcome.status, outcome)
        return outcome
    serving = kube.get(api, kube.reference("apps/v1", "Deployment", owner.name, owner.namespace))
    options = replace(settings.plan_options, unavailable={**settings.plan_options.unavailable, **measuring.unavailable})
    start = time.perf_counter()
    with _PLANNING:
        result = plan_deployment(spec, profiles, settings.prices, options)
    plan_seconds = time.perf_counter() - start
    if result.winner is None:
        outcome = _unplanned(body, spec, result, profiles, broken, serving is not None, generation, measuring)
        outcome.plan_seconds = plan_seconds
        _write(api, body, outcome.status, outcome)
        return outcome

    winner = result.winner
    itype = settings.prices.get(winner.instance_type)
    assert itype is not None  # the planner only picks priced types
    variant = next(v for p in profiles if p.instance_type == winner.instance_type for v in p.variants
                   if v.name == winner.variant)  # fmt: skip
    manifests = builders.render_all(owner, spec, winner, itype, settings.build, variant.rss_mb)
    low, high = builders.replica_bounds(spec, winner, itype)
    outcome = Outcome({}, plan_seconds=plan_seconds)
    for manifest in manifests:
        if manifest["kind"] == "Deployment" and manifest["metadata"]["name"] == owner.name and serving is None:
            kube.ensure_created(api, manifest, {"replicas": low})
        applied = kube.apply(api, manifest)
        outcome.applied.append(f"{manifest['kind']}/{manifest['metadata']['name']}")
        if manifest["kind"] == "Deployment" and manifest["metadata"]["name"] == owner.name:
            serving = applied
    if not builders.wants_managed_redis(spec):  # the one part a changed spec can drop: stop paying for it
        for stale in builders.render_redis(owner, spec, settings.build):
            if kube.delete_owned(api, stale, owner.uid):
                outcome.applied.append(f"deleted {stale['kind']}/{stale['metadata']['name']}")
    ready, available = availability(serving)
    plan = plan_status(result, high)
    assert plan is not None
    plan_doc = plan.to_api()
    plan_doc["replicas"]["min"] = low
    plan_doc["profileKeys"] = [profile_store.configmap_name(key, p.instance_type, settings.image_version)
                               for p in profiles]  # fmt: skip
    label = winner.label()
    planned = Cond("Planned", "True", "Planned",
                   f"{label}: ${winner.cost_per_million:.4f}/1M requests, predicted p{spec.sla.latency.percentile:g} "
                   f"{winner.latency_ms:.1f} ms at {winner.capacity_rps:.0f} req/s per replica"
                   + _skipped(measuring))  # fmt: skip
    deployed = Cond("Deployed", "True", "Applied", f"{len(manifests)} objects applied: " + ", ".join(outcome.applied))
    conds = [planned, deployed, available, _budget_condition(spec, result)]
    status = {
        "phase": "Ready" if available.status == "True" else "Deploying",
        "observedGeneration": generation,
        "replicas": ready,
        "plan": plan_doc,
        "candidates": [r.to_api() for r in candidate_rows(result, STATUS_CANDIDATES)],
        "savings": [s.to_api() for s in savings_rows(result)],
        "profiling": measuring.rows,
        "conditions": merge(conditions, conds, generation),
    }
    if current.get("observed"):
        status["observed"] = current["observed"]
    outcome.status = status
    _write(api, body, status, outcome)
    log.info("event=reconciled name=%s/%s plan=%r objects=%d status_written=%s plan_s=%.3f",
             owner.namespace, owner.name, label, len(manifests), outcome.status_written, plan_seconds)  # fmt: skip
    return outcome


def _budget_condition(spec: InferenceDeploymentSpec, result: PlanResult) -> Cond:
    b = spec.budget
    if b.max_cost_per_million_requests is None and b.max_monthly_cost is None:
        return Cond("WithinBudget", "True", "NoBudget", "the spec sets no budget")
    w = result.winner
    if w is None:
        binding = "budget binds" in result.infeasible
        return Cond("WithinBudget", "False" if binding else "Unknown",
                    "OverBudget" if binding else "NotPlanned", result.infeasible)  # fmt: skip
    limits = []
    if b.max_cost_per_million_requests is not None:
        limits.append(f"${w.cost_per_million:.4f}/1M <= ${b.max_cost_per_million_requests:g}/1M")
    if b.max_monthly_cost is not None:
        limits.append(f"${w.monthly_cost:.2f}/month <= ${b.max_monthly_cost:g}/month")
    return Cond("WithinBudget", "True", "PlanWithinBudget", "predicted " + ", ".join(limits))


def _skipped(measuring: profiling.ProfilingState) -> str:
    if not measuring.unavailable:
        return ""
    return "; left out: " + "; ".join(f"{t}: {r}" for t, r in sorted(measuring.unavailable.items()))


def _profiling(body: dict[str, Any], measuring: profiling.ProfilingState, generation: int | None) -> Outcome:
    """Status while candidates are being measured: phase Profiling, what is done, pending and failed."""
    current = body.get("status") or {}
    by_state: dict[str, list[str]] = {}
    for row in measuring.rows:
        by_state.setdefault(row["state"], []).append(row["instanceType"])
    summary = "; ".join(f"{state.lower()}: {', '.join(types)}" for state, types in sorted(by_state.items()))
    planned = Cond("Planned", "False", "Profiling", f"measuring candidate instance types ({summary})")
    status = {**current, "phase": "Profiling", "observedGeneration": generation, "profiling": measuring.rows,
              "conditions": merge(current.get("conditions") or [], [planned], generation)}  # fmt: skip
    return Outcome(status, retry_after_s=PROFILING_POLL_S, retry_reason=f"profiling ({summary})")


def _unplanned(body: dict[str, Any], spec: InferenceDeploymentSpec, result: PlanResult, profiles: list[Any],
               broken: list[str], deployed: bool, generation: int | None,
               measuring: profiling.ProfilingState) -> Outcome:  # fmt: skip
    """Status for a spec that gets no plan: nothing new is applied; a running earlier plan keeps serving."""
    current = body.get("status") or {}
    keeps = " The previously deployed plan keeps serving." if deployed else " Nothing was deployed."
    if not profiles and measuring.unavailable:
        reasons = "; ".join(f"{t}: {r}" for t, r in sorted(measuring.unavailable.items()))
        planned = Cond("Planned", "False", "NoCandidateAvailable",
                       f"no candidate instance type could be measured: {reasons}.{keeps}")  # fmt: skip
        phase, retry = "Failed", NO_CANDIDATE_RETRY_S
    elif not profiles:
        wanted = ", ".join(spec.candidates) or "every type in the price table"
        note = f" (unreadable profile ConfigMaps: {', '.join(broken)})" if broken else ""
        planned = Cond("Planned", "False", "NoProfiles",
                       f"no profile of this model is cached for {wanted}{note}; "
                       f"looking again in {PROFILE_RETRY_S:.0f} s." + keeps)  # fmt: skip
        phase, retry = "Pending", PROFILE_RETRY_S
    else:
        planned = Cond("Planned", "False", "NoFeasiblePlan", result.infeasible + "." + keeps)
        phase, retry = ("Degraded" if deployed else "Failed"), None
    conds = [planned, _budget_condition(spec, result)]
    if not deployed:
        conds.append(Cond("Deployed", "False", "NotPlanned", "waiting for a plan"))
    status = {**current, "phase": phase, "observedGeneration": generation, "profiling": measuring.rows,
              "candidates": [r.to_api() for r in candidate_rows(result, STATUS_CANDIDATES)],
              "conditions": merge(current.get("conditions") or [], conds, generation)}  # fmt: skip
    if not deployed:
        status.pop("plan", None)
        status["savings"] = []
    return Outcome(status, retry_after_s=retry, retry_reason=planned.message)


def refresh_availability(api: ApiClient, body: dict[str, Any], deployment: dict[str, Any] | None) -> bool:
    """Update replicas, the Available condition and the phase from the serving Deployment; True when written."""
    current = body.get("status") or {}
    conditions = current.get("conditions") or []
    if not any(c["type"] == "Deployed" and c["status"] == "True" for c in conditions):
        return False
    ready, available = availability(deployment)
    status = dict(current)
    status["replicas"] = ready
    status["conditions"] = merge(conditions, [available], current.get("observedGeneration"))
    if current.get("phase") in ("Deploying", "Ready"):
        status["phase"] = "Ready" if available.status == "True" else "Deploying"
    outcome = Outcome(status)
    _write(api, body, status, outcome)
    return outcome.status_written
