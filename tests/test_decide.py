"""decide(): every outcome of a reconcile as a pure function of what was observed. No API server.

The cluster tests (test_operator.py, test_profiling.py) run the same code
through observe and act against a real API server; these pin each phase's
status, writes and retry on plain data.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from leanserve.controller.builders import profiling_job_name
from leanserve.controller.config import OperatorConfig
from leanserve.controller.decide import NO_CANDIDATE_RETRY_S, PROFILE_RETRY_S, PROFILING_POLL_S, decide
from leanserve.controller.observe import Observed, owner_of, parse_spec
from leanserve.controller.profile_store import model_key
from leanserve.observer import Observation
from leanserve_serving.profile import Profile
from tests.stand_in_profiles import GPU_FIXTURE, stand_in
from tests.test_operator import SPEC as OPERATOR_SPEC

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
CONFIG = OperatorConfig()
TYPES = ["c6i.2xlarge", "m5.2xlarge"]

#: The cluster tests' spec (tests/test_operator.py), on the two CPU pools (the GPU one has its own tests there).
SPEC: dict[str, Any] = {**OPERATOR_SPEC, "candidates": TYPES}


def profile(instance_type: str) -> Profile:
    """A real measured profile (the committed H200 fixture), relabelled: the planner needs figures, not a node."""
    return stand_in(Profile.model_validate_json(GPU_FIXTURE.read_text()), instance_type)


def body(**changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    spec.update(changes)
    meta = {"name": "fraud", "namespace": "team-a", "uid": "uid-1", "generation": 3}
    return {"apiVersion": "leanserve.dev/v1alpha1", "kind": "InferenceDeployment", "metadata": meta, "spec": spec}


def observed(doc: dict[str, Any] | None = None, **fields: Any) -> Observed:
    doc = doc or body()
    spec, invalid = parse_spec(doc)
    key = model_key(spec.model) if spec else ""
    return Observed(body=doc, owner=owner_of(doc), now=NOW, spec=spec, invalid=invalid, key=key, **fields)


def cached() -> list[Profile]:
    return [profile(t) for t in TYPES]


def serving(ready: int) -> dict[str, Any]:
    available = "True" if ready else "False"
    return {"status": {"readyReplicas": ready, "conditions": [{"type": "Available", "status": available}]}}


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    return [f"{o['kind']}/{o['metadata']['name']}" for o in objects]


def test_an_invalid_spec_fails_permanently_and_writes_nothing_but_status():
    d = decide(observed(body(sla={"latency": {"targetMs": -1}})), CONFIG)
    planned = condition(d.status, "Planned")
    assert d.status["phase"] == "Failed" and planned["reason"] == "InvalidSpec"
    assert "spec.sla.latency.targetMs" in planned["message"] and d.permanent == planned["message"]
    assert not (d.apply or d.create_jobs or d.save_profiles or d.delete) and d.retry_after_s is None


def test_nothing_cached_creates_one_profiling_job_per_candidate_and_polls():
    d = decide(observed(), CONFIG)
    assert d.status["phase"] == "Profiling" and condition(d.status, "Planned")["reason"] == "Profiling"
    assert kinds(d.create_jobs) == [f"Job/{profiling_job_name(owner_of(body()), t)}" for t in TYPES]
    assert [r["state"] for r in d.status["profiling"]] == ["Pending", "Pending"]
    assert d.retry_after_s == PROFILING_POLL_S and not d.apply


def finished_job(instance_type: str, message: str, exit_code: int = 0) -> tuple[dict[str, Any], list[dict]]:
    name = profiling_job_name(owner_of(body()), instance_type)
    job = {"metadata": {"name": name, "creationTimestamp": "2026-11-25T11:50:00Z"}, "status": {"succeeded": 1}}
    term = {"exitCode": exit_code, "message": message}
    pod = {"metadata": {"name": name + "-x"}, "status": {"containerStatuses": [{"state": {"terminated": term}}]}}
    return job, [pod]


def test_finished_jobs_are_read_cached_and_planned_in_the_same_pass():
    jobs, pods = {}, {}
    for t in TYPES:
        job, job_pods = finished_job(t, profile(t).to_compact())
        jobs[job["metadata"]["name"]], pods[job["metadata"]["name"]] = job, job_pods
    d = decide(observed(jobs=jobs, pods=pods), CONFIG)
    assert sorted(p.instance_type for p in d.save_profiles) == TYPES
    assert d.status["phase"] == "Deploying" and condition(d.status, "Planned")["reason"] == "Planned"
    assert [r["state"] for r in d.status["profiling"]] == ["Done", "Done"]


def test_an_unreadable_profile_fails_that_type_with_the_reason():
    job, pods = finished_job("m5.2xlarge", "not a profile")
    name = job["metadata"]["name"]
    seen = observed(jobs={name: job}, pods={name: pods}, profiles=[profile("c6i.2xlarge")])
    d = decide(seen, CONFIG)
    row = next(r for r in d.status["profiling"] if r["instanceType"] == "m5.2xlarge")
    assert row["state"] == "Failed" and row["reason"].startswith("the bench reported an unreadable profile")
    assert "left out: m5.2xlarge: profiling failed: the bench reported" in condition(d.status, "Planned")["message"]


def unschedulable_job(age_s: float) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    name = profiling_job_name(owner_of(body()), "g4dn.xlarge")
    created = (NOW - timedelta(seconds=age_s)).isoformat().replace("+00:00", "Z")
    job = {"metadata": {"name": name, "creationTimestamp": created}, "status": {"active": 1}}
    cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/2 nodes: no GPU"}
    pod = {"metadata": {"name": name + "-x"}, "status": {"phase": "Pending", "conditions": [cond]}}
    return {name: job}, {name: [pod]}


def test_an_unschedulable_profiling_pod_waits_then_its_type_is_left_out_as_unschedulable():
    doc = body(candidates=["g4dn.xlarge", "m5.2xlarge"])
    jobs, pods = unschedulable_job(age_s=10)
    young = decide(observed(doc, jobs=jobs, pods=pods, profiles=[profile("m5.2xlarge")]), CONFIG)
    assert young.status["phase"] == "Profiling" and young.retry_after_s == PROFILING_POLL_S
    jobs, pods = unschedulable_job(age_s=3600)
    old = decide(observed(doc, jobs=jobs, pods=pods, profiles=[profile("m5.2xlarge")]), CONFIG)
    row = next(r for r in old.status["profiling"] if r["instanceType"] == "g4dn.xlarge")
    assert row["state"] == "Unschedulable" and row["reason"].endswith("0/2 nodes: no GPU")
    gpu = next(c for c in old.status["candidates"] if c["instanceType"] == "g4dn.xlarge")
    assert gpu["reason"].startswith("unschedulable for ") and not gpu["feasible"]
    assert old.status["plan"]["instanceType"] == "m5.2xlarge"


def test_no_evaluation_data_is_no_candidate_available_and_not_called_unschedulable():
    doc = body(model={"uri": "https://models.example.com/fraud.onnx"})
    d = decide(observed(doc), CONFIG)
    planned = condition(d.status, "Planned")
    assert d.status["phase"] == "Failed" and planned["reason"] == "NoCandidateAvailable"
    assert "profiling needs model.evaluation" in planned["message"] and "unschedulable" not in planned["message"]
    assert all(c["reason"].startswith("not profiled: ") for c in d.status["candidates"])
    assert d.retry_after_s == NO_CANDIDATE_RETRY_S and not d.create_jobs and not d.apply


def test_no_profile_and_nothing_to_measure_is_no_profiles():
    d = decide(observed(body(candidates=["x9.huge"])), CONFIG)
    planned = condition(d.status, "Planned")
    assert d.status["phase"] == "Pending" and planned["reason"] == "NoProfiles"
    assert d.retry_after_s == PROFILE_RETRY_S and "Nothing was deployed" in planned["message"]


def test_an_infeasible_plan_fails_before_anything_is_deployed_and_degrades_after():
    doc = body(budget={"maxCostPerMillionRequests": 0.0001})
    fresh = decide(observed(doc, profiles=cached()), CONFIG)
    assert fresh.status["phase"] == "Failed" and condition(fresh.status, "Planned")["reason"] == "NoFeasiblePlan"
    assert condition(fresh.status, "WithinBudget")["reason"] == "OverBudget"
    assert condition(fresh.status, "Deployed")["status"] == "False" and "plan" not in fresh.status
    doc["status"] = {"phase": "Ready", "plan": {"instanceType": "m5.2xlarge"}, "conditions": []}
    running = decide(observed(doc, profiles=cached(), serving=serving(2)), CONFIG)
    assert running.status["phase"] == "Degraded" and running.status["plan"] == {"instanceType": "m5.2xlarge"}
    assert "keeps serving" in condition(running.status, "Planned")["message"]
    assert not running.apply and not running.delete and running.retry_after_s is None


def test_a_first_plan_creates_the_deployment_at_the_warm_pool_and_is_deploying():
    d = decide(observed(profiles=cached()), CONFIG)
    assert d.status["phase"] == "Deploying" and condition(d.status, "Available")["reason"] == "ReplicasNotReady"
    assert "Deployment/fraud" in kinds(d.apply) and d.initial_replicas == 2
    hpa = next(o for o in d.apply if o["kind"] == "HorizontalPodAutoscaler")["spec"]
    plan = d.status["plan"]
    # One plan: status and the HPA show the same bounds, computed once by the planner.
    assert (plan["replicas"]["min"], plan["replicas"]["max"]) == (hpa["minReplicas"], hpa["maxReplicas"])
    peak = plan["replicas"]["peak"]
    assert hpa["minReplicas"] == 2 and hpa["maxReplicas"] == max(peak, math.ceil(peak * 1.25), 2)
    assert plan["profileKeys"] and not d.create_jobs and not d.save_profiles


def test_ready_replicas_make_it_ready_and_an_existing_deployment_keeps_its_count():
    doc = body()
    doc["status"] = {"observed": {"p95Ms": 12.0}}
    d = decide(observed(doc, profiles=cached(), serving=serving(3)), CONFIG)
    assert d.status["phase"] == "Ready" and d.status["replicas"] == 3 and d.initial_replicas is None
    assert condition(d.status, "Available")["status"] == "True"
    assert d.status["observed"] == {"p95Ms": 12.0}  # the observer's figures are not the plan's to drop


def test_a_managed_redis_no_longer_wanted_is_deleted():
    doc = body(cache={"exact": {"enabled": False}})
    stale = [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "fraud-redis"}}]
    d = decide(observed(doc, profiles=cached(), serving=serving(1), stale=stale), CONFIG)
    assert d.delete == stale and "Deployment/fraud-redis" not in kinds(d.apply)
    assert "deleted Deployment/fraud-redis" in condition(d.status, "Deployed")["message"]


@pytest.mark.parametrize("ready", [0, 2])
def test_decide_is_a_function_of_what_was_observed(ready):
    seen = observed(profiles=cached(), serving=serving(ready))
    first, second = decide(seen, CONFIG), decide(seen, CONFIG)
    assert first.status == second.status and kinds(first.apply) == kinds(second.apply)


# Observation: what Prometheus says, judged against the plan in place ----------------------------


PROMETHEUS = OperatorConfig(prometheus_url="http://127.0.0.1:9")  # never dialled: decide reads no network


def deployed(doc: dict[str, Any] | None = None) -> dict[str, Any]:
    """An InferenceDeployment whose first plan is in place (status from a first decide)."""
    doc = doc or body()
    first = decide(observed(doc, profiles=cached(), serving=serving(2)), PROMETHEUS)
    return {**doc, "status": first.status}


def reading(
    doc: dict[str, Any], *, rps: float, p95: float = 20.0, hit: float | None = None, **more: Any
) -> Observation:
    window = 300.0
    figures = {
        "at": NOW,
        "window_s": window,
        "requests": rps * window,
        "rps": rps,
        "p50_ms": p95 / 2,
        "p95_ms": p95,
        "p99_ms": p95 * 1.5,
        "error_rate": 0.0,
        "throttled_rate": 0.0,
        "cache_hit_rate": hit,
        "mean_batch": 4.0,
        "replicas": float(doc["status"]["plan"]["replicas"]["min"]),
    }
    return Observation(**(figures | more))


def later(doc: dict[str, Any], decision: Any, minutes: float, obs: Observation) -> Observed:
    """The next reconcile: the status the last decision wrote, ``minutes`` later, with a new reading."""
    when = NOW + timedelta(minutes=minutes)
    nxt = {**doc, "status": decision.status}
    return Observed(
        body=nxt,
        owner=owner_of(nxt),
        now=when,
        spec=parse_spec(nxt)[0],
        key=model_key(parse_spec(nxt)[0].model),
        profiles=cached(),
        serving=serving(2),
        observation=replace(obs, at=when),
    )


def test_without_prometheus_nothing_is_observed_and_the_condition_says_why():
    d = decide(observed(profiles=cached(), serving=serving(2)), CONFIG)
    assert condition(d.status, "Observed")["reason"] == "NoPrometheus" and "observed" not in d.status


def test_prometheus_down_is_observed_false_and_changes_nothing_else():
    doc = deployed()
    calm = decide(observed(doc, profiles=cached(), serving=serving(2)), PROMETHEUS)
    down = decide(
        observed(doc, profiles=cached(), serving=serving(2), observation_error="connection refused"), PROMETHEUS
    )
    cond = condition(down.status, "Observed")
    assert (
        cond["status"] == "False"
        and cond["reason"] == "PrometheusUnavailable"
        and "connection refused" in cond["message"]
    )
    assert down.status["plan"] == calm.status["plan"] and kinds(down.apply) == kinds(calm.apply)
    assert down.apply == calm.apply and not down.events


def test_a_reading_within_the_plan_shows_observed_beside_predicted():
    doc = deployed(body(budget={"maxCostPerMillionRequests": 100}))
    plan = doc["status"]["plan"]
    d = decide(observed(doc, profiles=cached(), serving=serving(2), observation=reading(doc, rps=800)), PROMETHEUS)
    seen = d.status["observed"]
    assert (
        seen["rps"] == 800
        and seen["latencyMs"] == 20.0
        and seen["predicted"]["latencyMs"] == plan["predictedLatencyMs"]
    )
    assert seen["error"]["latency"] == round(20.0 / plan["predictedLatencyMs"] - 1, 4)
    # replicas x price x window / requests: the cost of what was served
    price = CONFIG.prices.get(plan["instanceType"]).on_demand_usd_per_hour
    expected = plan["replicas"]["min"] * price * (300 / 3600) / (800 * 300) * 1e6
    assert seen["costPerMillionRequests"] == pytest.approx(expected, rel=1e-3)
    assert condition(d.status, "SLAMet")["status"] == "True" and condition(d.status, "Drift")["reason"] == "NoDrift"
    assert condition(d.status, "WithinBudget")["reason"] == "ObservedWithinBudget"
    assert d.status["plan"] == plan


def test_too_little_traffic_is_not_judged():
    doc = deployed()
    d = decide(observed(doc, profiles=cached(), serving=serving(2), observation=reading(doc, rps=1)), PROMETHEUS)
    assert (
        condition(d.status, "SLAMet")["reason"] == "NotEnoughTraffic"
        and condition(d.status, "Drift")["reason"] == "NoDrift"
    )


def test_traffic_drift_replans_once_then_holds_without_flapping():
    doc = deployed(body(observe={"drift": {"minSavings": 0, "minIntervalSeconds": 3600}}))
    surge = reading(doc, rps=2400 * 3)
    first = decide(observed(doc, profiles=cached(), serving=serving(2), observation=surge), PROMETHEUS)
    drift = condition(first.status, "Drift")
    assert drift["status"] == "True" and drift["reason"] == "Replanned" and "above the peak" in drift["message"]
    replan = first.status["observed"]["replan"]
    assert replan["peakRps"] == 7200 and replan["generation"] == 3 and first.events[0][0] == "Replanned"
    assert first.status["plan"]["replicas"]["peak"] > doc["status"]["plan"]["replicas"]["peak"]
    # Ten minutes on, the surge goes on: the new plan holds (no second re-plan, no return to the old one).
    again = decide(later(doc, first, 10, surge), PROMETHEUS)
    assert condition(again.status, "Drift")["reason"] in ("DriftTooSoon", "NoDrift") and not again.events
    assert again.status["plan"] == first.status["plan"] and again.status["observed"]["replan"] == replan
    # Traffic back to what the spec says, ten minutes later still: too soon to plan again.
    calm = decide(later(doc, again, 20, reading(doc, rps=800)), PROMETHEUS)
    assert calm.status["plan"] == first.status["plan"] and not calm.events


def test_a_drift_whose_new_plan_saves_too_little_is_not_applied():
    doc = deployed()
    d = decide(
        observed(doc, profiles=cached(), serving=serving(2), observation=reading(doc, rps=2400 * 1.3)), PROMETHEUS
    )
    drift = condition(d.status, "Drift")
    assert drift["status"] == "False" and drift["reason"] == "DriftNoGain" and "saves less than 10%" in drift["message"]
    assert d.status["plan"] == doc["status"]["plan"] and "replan" not in d.status["observed"] and not d.events


def test_within_the_tolerance_there_is_no_drift():
    doc = deployed(body(observe={"drift": {"minSavings": 0}}))
    d = decide(
        observed(doc, profiles=cached(), serving=serving(2), observation=reading(doc, rps=2400 * 1.2)), PROMETHEUS
    )
    assert condition(d.status, "Drift")["reason"] == "NoDrift" and d.status["plan"] == doc["status"]["plan"]


def test_three_sla_misses_in_a_row_replan_with_more_headroom():
    doc = deployed()
    slow = reading(doc, rps=800, p95=250.0)  # the SLA is p95 <= 100 ms
    d = decide(observed(doc, profiles=cached(), serving=serving(2), observation=slow), PROMETHEUS)
    assert condition(d.status, "SLAMet")["reason"] == "SLAMissed" and d.status["observed"]["slaMissStreak"] == 1
    for minutes in (1, 2):
        d = decide(later(doc, d, minutes, slow), PROMETHEUS)
    assert d.status["observed"]["slaMissStreak"] == 3
    drift = condition(d.status, "Drift")
    assert drift["reason"] == "Replanned" and "3 windows in a row" in drift["message"]
    assert d.status["observed"]["replan"]["maxUtilization"] == pytest.approx(0.64)
    assert d.status["plan"]["capacityRpsPerReplica"] < doc["status"]["plan"]["capacityRpsPerReplica"]


def daily_peak_history(days: int = 3) -> list[tuple[datetime, float]]:
    """Hourly request rates: 100 req/s, 2400 at 14:00 UTC every day, up to NOW."""
    start = NOW - timedelta(days=days)
    return [
        (start + timedelta(hours=h), 2400.0 if (start + timedelta(hours=h)).hour == 14 else 100.0)
        for h in range(days * 24)
    ]


def at(doc: dict[str, Any], when: datetime, **fields: Any) -> Observed:
    spec = parse_spec(doc)[0]
    return Observed(body=doc, owner=owner_of(doc), now=when, spec=spec, key=model_key(spec.model), **fields)


def hpa_min(decision: Any) -> int:
    return next(o for o in decision.apply if o["kind"] == "HorizontalPodAutoscaler")["spec"]["minReplicas"]


def test_the_predictive_warm_pool_raises_min_replicas_a_cold_start_before_the_daily_peak():
    doc = deployed(body(autoscaling={"warmPool": 1}))
    history = daily_peak_history()
    seen = {"profiles": cached(), "serving": serving(1), "history": history}
    quiet = decide(at(doc, NOW.replace(hour=13, minute=50), observation=reading(doc, rps=100), **seen), PROMETHEUS)
    ahead = decide(
        at(doc, NOW.replace(hour=13, minute=59, second=30), observation=reading(doc, rps=100), **seen), PROMETHEUS
    )
    after = decide(at(doc, NOW.replace(hour=15, minute=1), observation=reading(doc, rps=100), **seen), PROMETHEUS)
    hpa = {name: hpa_min(d) for name, d in (("quiet", quiet), ("ahead", ahead), ("after", after))}
    assert hpa["quiet"] == 1 and hpa["after"] == 1
    assert hpa["ahead"] > 1 and ahead.status["plan"]["replicas"]["min"] == hpa["ahead"]
    pool = ahead.status["observed"]["warmPool"]
    assert pool["basis"] == "hour-of-day" and pool["minReplicas"] == hpa["ahead"] and pool["coldStartSeconds"] == 60.0


def test_without_a_new_history_the_last_warm_pool_stands():
    doc = deployed(body(autoscaling={"warmPool": 1}))
    seen = {"profiles": cached(), "serving": serving(1)}
    raised = decide(
        at(
            doc,
            NOW.replace(hour=13, minute=59, second=30),
            observation=reading(doc, rps=100),
            history=daily_peak_history(),
            **seen,
        ),
        PROMETHEUS,
    )
    nxt = {**doc, "status": raised.status}
    down = decide(
        at(nxt, NOW.replace(hour=14, minute=0, second=30), observation_error="connection refused", **seen), PROMETHEUS
    )
    floor = raised.status["observed"]["warmPool"]["minReplicas"]
    assert floor > 1 and down.status["plan"]["replicas"]["min"] == floor


def test_observed_replicas_over_the_monthly_budget_are_over_budget():
    doc = deployed(body(budget={"maxMonthlyCost": 10000}))
    plan = doc["status"]["plan"]
    price = CONFIG.prices.get(plan["instanceType"]).on_demand_usd_per_hour
    many = reading(doc, rps=800, replicas=400.0)  # 400 replicas all month cost far more than $10k
    d = decide(observed(doc, profiles=cached(), serving=serving(2), observation=many), PROMETHEUS)
    cond = condition(d.status, "WithinBudget")
    assert cond["reason"] == "ObservedOverBudget"
    assert f"${400 * price * 730:.0f}/month > $10000" in cond["message"]
