"""Profiling Jobs: measure each candidate instance type whose profile is not cached, and collect the results.

Level-based like the rest: from the Jobs and pods as they are, decide per
candidate whether it is cached, being measured, measured now (the compact
profile read from the pod's termination message goes into the cache), failed
(the bench's own reason after the Job's retries, or DeadlineExceeded when the
Job ran past spec.profiling.deadlineSeconds and Kubernetes stopped it) or
unschedulable (its pod found no node for longer than the spec allows). A type
that failed or is unschedulable is left out of the plan, with that reason. Job
names are deterministic, so a restarted operator finds its Jobs instead of
creating more.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes.client import ApiClient
from pydantic import ValidationError

from leanserve.api.spec import InferenceDeploymentSpec
from leanserve.controller import builders, kube, profile_store
from leanserve.controller.builders import BuildSettings, Owner
from leanserve.planner.prices import PriceTable
from leanserve_serving.bench_job import FAILED_PREFIX
from leanserve_serving.profile import Profile

log = logging.getLogger("leanserve.operator")


@dataclass
class ProfilingState:
    rows: list[dict[str, Any]] = field(default_factory=list)
    """status.profiling: one row per candidate type."""
    measured: list[Profile] = field(default_factory=list)
    """Profiles collected by this pass (already saved to the cache)."""
    unavailable: dict[str, str] = field(default_factory=dict)
    """Types the plan must leave out, with why (unschedulable, bench failed)."""

    @property
    def pending(self) -> list[str]:
        return [r["instanceType"] for r in self.rows if r["state"] in ("Pending", "Running")]


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (status.get("state") or {}).get("terminated")
        if term:
            return term
    return None


def _unschedulable(pod: dict[str, Any]) -> str | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return cond.get("message") or "no node fits the pod"
    return None


#: The Job controller's reason for a Job stopped at its activeDeadlineSeconds.
DEADLINE_EXCEEDED = "DeadlineExceeded"


@dataclass(frozen=True)
class JobFailure:
    """Why the Job controller failed a Job: its condition's reason (typed: BackoffLimitExceeded,
    DeadlineExceeded, ...) and message."""

    reason: str
    message: str


def _job_failed(job: dict[str, Any]) -> JobFailure | None:
    """The Job's failure, from its Failed condition or the FailureTarget one that precedes it.

    Since Kubernetes 1.31 the Job controller sets FailureTarget as soon as the
    Job is doomed and Failed only once its pods are gone (a pod stopped at the
    deadline first gets its grace period): reading either reports it at once.
    """
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Failed", "FailureTarget") and cond.get("status") == "True":
            return JobFailure(cond.get("reason") or "", cond.get("message") or cond.get("reason") or "the Job failed")
    return None


def ensure_profiles(api: ApiClient, owner: Owner, spec: InferenceDeploymentSpec, prices: PriceTable,
                    build: BuildSettings, key: str, cached: list[Profile], image_version: str,
                    now: datetime | None = None) -> ProfilingState:  # fmt: skip
    """Create the missing profiling Jobs and read the finished ones; the state per candidate."""
    now = now or datetime.now(UTC)
    state = ProfilingState()
    have = {p.instance_type for p in cached}
    selector = f"{builders.OWNER_LABEL}={owner.name},app.kubernetes.io/component=profiling"
    jobs = {j["metadata"]["name"]: j for j in kube.list_objects(api, "batch/v1", "Job", owner.namespace, selector)}
    for name in spec.candidates or [t.name for t in prices.instance_types]:
        itype = prices.get(name)
        if itype is None:
            continue  # the planner reports it: not in the price table
        job_name = builders.profiling_job_name(owner, name)
        if name in have:
            done = job_name in jobs and (jobs[job_name].get("status") or {}).get("succeeded")
            state.rows.append({"instanceType": name, "state": "Done" if done else "Cached", "reason": ""})
            continue
        if spec.model.evaluation is None:
            reason = "profiling needs model.evaluation (labelled data to bench and gate on)"
            state.rows.append({"instanceType": name, "state": "Failed", "reason": reason})
            state.unavailable[name] = reason
            continue
        row = {"instanceType": name, "job": job_name}
        job = jobs.get(job_name)
        if job is None:
            kube.apply(api, builders.render_profiling_job(owner, spec, itype, build, key))
            log.info("event=profiling_job_created name=%s/%s job=%s", owner.namespace, owner.name, job_name)
            state.rows.append(row | {"state": "Pending", "reason": "Job created"})
            continue
        pods = kube.list_objects(api, "v1", "Pod", owner.namespace, f"job-name={job_name}")
        row.update(_read_job(api, owner, spec, name, job, pods, key, image_version, now, state))
        state.rows.append(row)
    return state


def _read_job(api: ApiClient, owner: Owner, spec: InferenceDeploymentSpec, name: str, job: dict[str, Any],
              pods: list[dict[str, Any]], key: str, image_version: str, now: datetime,
              state: ProfilingState) -> dict[str, Any]:  # fmt: skip
    for pod in pods:
        term = _terminated(pod)
        if term and term.get("exitCode") == 0:
            try:
                profile = Profile.from_compact(term.get("message") or "")
            except (ValidationError, ValueError) as exc:
                reason = f"the bench reported an unreadable profile: {str(exc).splitlines()[0]}"
                state.unavailable[name] = f"profiling failed: {reason}"
                return {"state": "Failed", "reason": reason}
            profile = profile.model_copy(update={"instance_type": name})
            profile_store.save(api, owner.namespace, key, profile, image_version)
            state.measured.append(profile)
            return {"state": "Done", "reason": f"measured on {profile.hardware.cpu_model}"}
    failed = _job_failed(job)
    if failed is not None:
        messages = [(_terminated(p) or {}).get("message", "") for p in pods]
        said = next((m.removeprefix(FAILED_PREFIX) for m in reversed(messages) if m), None)
        if failed.reason == DEADLINE_EXCEEDED:
            # The Job's own deadline: it may predate a spec change (Jobs are not re-applied).
            deadline = (job.get("spec") or {}).get("activeDeadlineSeconds", spec.profiling.deadline_seconds)
            reason = (f"{DEADLINE_EXCEEDED}: the bench did not finish within {deadline} s "
                      "(spec.profiling.deadlineSeconds, counted from the Job's start)")  # fmt: skip
            nowhere = next((m for m in map(_unschedulable, pods) if m), None)
            if nowhere:
                reason += f"; its pod found no node: {nowhere}"
            elif said:
                reason += f"; an earlier attempt failed: {said}"
            state.unavailable[name] = f"profiling failed: {reason}"  # the planner's prefix for a failed bench
            return {"state": "Failed", "reason": reason}
        reason = said or failed.message
        retries = spec.profiling.retries
        state.unavailable[name] = f"profiling failed after {retries + 1} attempt(s): {reason}"
        return {"state": "Failed", "reason": reason}
    waiting = [p for p in pods if _unschedulable(p)]
    if waiting:
        since = _parse_time(job["metadata"].get("creationTimestamp")) or now
        message = _unschedulable(waiting[0]) or ""
        timeout = spec.profiling.unschedulable_timeout_seconds
        if (now - since).total_seconds() >= timeout:
            state.unavailable[name] = f"unschedulable for {timeout} s: {message}"
            return {"state": "Unschedulable", "reason": f"unschedulable for {timeout} s: {message}"}
        return {"state": "Pending", "reason": f"unschedulable so far: {message}"}
    running = any((p.get("status") or {}).get("phase") == "Running" for p in pods)
    return {"state": "Running" if running else "Pending", "reason": "benching" if running else "waiting for a node"}
