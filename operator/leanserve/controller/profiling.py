"""Profiling: which candidate instance types are cached, being measured, measured now, failed or unschedulable.

Pure: from the Jobs and pods as observed (controller/observe.py), decide per
candidate whether it is cached, being measured, measured now (the compact
profile read from the pod's termination message, for the cache), failed (the
bench's own reason after the Job's retries, or DeadlineExceeded when the Job
ran past spec.profiling.deadlineSeconds and Kubernetes stopped it) or
unschedulable (its pod found no node for longer than the spec allows). A type
that failed or is unschedulable is left out of the plan, with that reason. Job
names are deterministic, so a restarted operator finds its Jobs instead of
creating more. The writes (Jobs to create, profiles to cache) are returned for
the act step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from leanserve.controller import builders
from leanserve.controller.conditions import parse_rfc3339
from leanserve.controller.config import OperatorConfig
from leanserve.controller.observe import Observed
from leanserve.planner.unavailable import Unavailable
from leanserve_serving.bench_job import FAILED_PREFIX
from leanserve_serving.profile import Profile


@dataclass
class ProfilingState:
    """What profiling stands at, and what to write about it."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    """status.profiling: one row per candidate type."""
    measured: list[Profile] = field(default_factory=list)
    """Profiles read from finished Jobs in this pass (to be cached)."""
    unavailable: dict[str, Unavailable] = field(default_factory=dict)
    """Types the plan must leave out, with why (unschedulable, bench failed, not profilable)."""
    create_jobs: list[dict[str, Any]] = field(default_factory=list)
    """Profiling Jobs to create."""

    @property
    def pending(self) -> list[str]:
        return [r["instanceType"] for r in self.rows if r["state"] in ("Pending", "Running")]


def _parse_time(value: str | None) -> datetime | None:
    return parse_rfc3339(value) if value else None


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


@dataclass(frozen=True)
class JobReading:
    """One profiling Job read: its row's state and reason, and what it yields."""

    state: str
    reason: str
    profile: Profile | None = None
    unavailable: Unavailable | None = None


def assess(observed: Observed, config: OperatorConfig) -> ProfilingState:
    """The state per candidate: the Jobs to create, the profiles finished Jobs measured, the types left out."""
    spec, owner = observed.spec, observed.owner
    assert spec is not None  # decide handles an invalid spec first
    state = ProfilingState()
    have = {p.instance_type for p in observed.profiles}
    for name in spec.candidates or [t.name for t in config.prices.instance_types]:
        itype = config.prices.get(name)
        if itype is None:
            continue  # the planner reports it: not in the price table
        job_name = builders.profiling_job_name(owner, name)
        job = observed.jobs.get(job_name)
        if name in have:
            done = job is not None and (job.get("status") or {}).get("succeeded")
            state.rows.append({"instanceType": name, "state": "Done" if done else "Cached", "reason": ""})
            continue
        if spec.model.evaluation is None:
            reason = "profiling needs model.evaluation (labelled data to bench and gate on)"
            state.rows.append({"instanceType": name, "state": "Failed", "reason": reason})
            state.unavailable[name] = Unavailable.not_profilable(reason)
            continue
        row = {"instanceType": name, "job": job_name}
        if job is None:
            state.create_jobs.append(builders.render_profiling_job(owner, spec, itype, config.build, observed.key))
            state.rows.append(row | {"state": "Pending", "reason": "Job created"})
            continue
        reading = read_job(observed, name, job, observed.pods.get(job_name, []))
        state.rows.append(row | {"state": reading.state, "reason": reading.reason})
        if reading.profile is not None:
            state.measured.append(reading.profile)
        if reading.unavailable is not None:
            state.unavailable[name] = reading.unavailable
    return state


def read_job(observed: Observed, instance_type: str, job: dict[str, Any], pods: list[dict[str, Any]]) -> JobReading:
    """What one profiling Job says: measured (the profile), failed, unschedulable, or still under way."""
    spec = observed.spec
    assert spec is not None
    for pod in pods:
        term = _terminated(pod)
        if term and term.get("exitCode") == 0:
            try:
                profile = Profile.from_compact(term.get("message") or "")
            except (ValidationError, ValueError) as exc:
                reason = f"the bench reported an unreadable profile: {str(exc).splitlines()[0]}"
                return JobReading("Failed", reason, unavailable=Unavailable.profiling_failed(reason))
            profile = profile.model_copy(update={"instance_type": instance_type})
            return JobReading("Done", f"measured on {profile.hardware.cpu_model}", profile=profile)
    failed = _job_failed(job)
    if failed is not None:
        messages = [(_terminated(p) or {}).get("message", "") for p in pods]
        said = next((m.removeprefix(FAILED_PREFIX) for m in reversed(messages) if m), None)
        if failed.reason == DEADLINE_EXCEEDED:
            # The Job's own deadline: it may predate a spec change (Jobs are not re-applied).
            deadline = (job.get("spec") or {}).get("activeDeadlineSeconds", spec.profiling.deadline_seconds)
            reason = (
                f"{DEADLINE_EXCEEDED}: the bench did not finish within {deadline} s "
                "(spec.profiling.deadlineSeconds, counted from the Job's start)"
            )
            nowhere = next((m for m in map(_unschedulable, pods) if m), None)
            if nowhere:
                reason += f"; its pod found no node: {nowhere}"
            elif said:
                reason += f"; an earlier attempt failed: {said}"
            return JobReading("Failed", reason, unavailable=Unavailable.profiling_failed(reason))
        reason = said or failed.message
        attempts = spec.profiling.retries + 1
        return JobReading("Failed", reason, unavailable=Unavailable.profiling_failed(reason, attempts))
    waiting = [p for p in pods if _unschedulable(p)]
    if waiting:
        since = _parse_time(job["metadata"].get("creationTimestamp")) or observed.now
        message = _unschedulable(waiting[0]) or ""
        timeout = spec.profiling.unschedulable_timeout_seconds
        if (observed.now - since).total_seconds() >= timeout:
            gone = Unavailable.unschedulable(message, timeout)
            return JobReading("Unschedulable", gone.reason, unavailable=gone)
        return JobReading("Pending", f"unschedulable so far: {message}")
    running = any((p.get("status") or {}).get("phase") == "Running" for p in pods)
    return JobReading("Running" if running else "Pending", "benching" if running else "waiting for a node")
