"""The observed state of an InferenceDeployment, written by the operator only.

Status is a subresource: users never write it, and the schema is lenient (every
field optional) so that an older operator's status never blocks a newer one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from leanserve.api.base import ApiModel

Phase = Literal["Pending", "Profiling", "Planning", "Deploying", "Ready", "Degraded", "Failed"]

#: The condition types the operator maintains.
CONDITION_TYPES: tuple[str, ...] = ("Planned", "Deployed", "Available", "WithinBudget")


class Condition(ApiModel):
    """The standard Kubernetes condition shape (metav1.Condition)."""

    type: str = Field(min_length=1, max_length=316)
    """Planned, Deployed, Available or WithinBudget."""
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    """CamelCase machine-readable cause."""
    message: str = Field(default="", max_length=32768)
    """Human-readable detail."""
    last_transition_time: datetime
    """When status last changed."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation this condition was computed for."""


class ReplicaPlan(ApiModel):
    """How many replicas the plan runs."""

    min: int | None = Field(default=None, ge=0)
    """HPA minReplicas (the warm pool)."""
    max: int | None = Field(default=None, ge=0)
    """HPA maxReplicas (capped by the budget)."""
    average: float | None = Field(default=None, ge=0)
    """Replicas needed at average traffic, time-weighted over the day."""
    peak: int | None = Field(default=None, ge=0)
    """Replicas needed at peak traffic."""


class PlanStatus(ApiModel):
    """The configuration the planner chose."""

    instance_type: str | None = None
    precision: str | None = None
    max_batch_size: int | None = Field(default=None, ge=1)
    max_wait_ms: float | None = Field(default=None, ge=0)
    replicas: ReplicaPlan | None = None
    capacity_rps_per_replica: float | None = Field(default=None, ge=0)
    """Highest per-replica request rate that keeps the SLA (predicted)."""
    predicted_latency_ms: float | None = Field(default=None, ge=0)
    """Predicted latency at the SLA percentile at the planned per-replica rate."""
    cost_per_million_requests: float | None = Field(default=None, ge=0)
    """Predicted USD per million requests."""
    monthly_cost: float | None = Field(default=None, ge=0)
    """Predicted USD per month."""
    pod_cpu: str | None = None
    """One replica's CPU request (the vCPUs its profile was measured at), e.g. ``1000m``."""
    pod_memory: str | None = None
    """One replica's memory request, both containers, e.g. ``1536Mi``."""
    node_share: float | None = Field(default=None, ge=0)
    """The fraction of a node's price one replica pays: the larger of its CPU and memory shares of what the
    node allocates to pods (OpenCost's allocation)."""
    replicas_per_node: int | None = Field(default=None, ge=0)
    nodes_at_peak: int | None = Field(default=None, ge=0)
    """Whole nodes the replicas needed at peak pack onto."""
    profile_keys: list[str] = Field(default_factory=list)
    """The profiles the plan was computed from."""


class CandidateRow(ApiModel):
    """One row of the ranked table of configurations the planner considered."""

    rank: int = Field(ge=1)
    instance_type: str
    precision: str
    max_batch_size: int | None = Field(default=None, ge=1)
    max_wait_ms: float | None = Field(default=None, ge=0)
    feasible: bool
    predicted_latency_ms: float | None = Field(default=None, ge=0)
    capacity_rps_per_replica: float | None = Field(default=None, ge=0)
    replicas_average: float | None = Field(default=None, ge=0)
    replicas_peak: int | None = Field(default=None, ge=0)
    cost_per_million_requests: float | None = Field(default=None, ge=0)
    monthly_cost: float | None = Field(default=None, ge=0)
    accuracy_drop: float | None = None
    reason: str = ""
    """Why it lost (over SLA, over budget, accuracy gate, unschedulable), or empty."""


class SavingsStep(ApiModel):
    """One step of the savings waterfall, from the naive baseline to the plan."""

    lever: str
    """baseline, quantization, batching, right-sizing, caching, autoscaling or plan."""
    cost_per_million_requests: float = Field(ge=0)
    """USD per million requests after this step."""
    description: str = ""


class PredictedFigures(ApiModel):
    """What the plan in place predicted, beside what was observed."""

    latency_ms: float | None = Field(default=None, ge=0)
    """At the SLA's percentile, at the capacity planned per replica."""
    cost_per_million_requests: float | None = Field(default=None, ge=0)
    capacity_rps_per_replica: float | None = Field(default=None, ge=0)


class ObservedErrors(ApiModel):
    """Observed over predicted, minus one (0.1: observed 10 % above the prediction)."""

    latency: float | None = None
    cost_per_million: float | None = None
    capacity: float | None = None
    """Only when the replicas were saturated (requests throttled): otherwise they carried what came."""


class Replan(ApiModel):
    """The figures the plan in place was made with, when drift made the operator plan again."""

    at: datetime
    reason: str
    generation: int | None = Field(default=None, ge=0)
    """The spec generation it applies to: a new spec starts from the spec's own figures again."""
    average_rps: float | None = Field(default=None, ge=0)
    peak_rps: float | None = Field(default=None, ge=0)
    cache_hit_rate: float | None = Field(default=None, ge=0, le=1)
    max_utilization: float | None = Field(default=None, gt=0, le=1)
    """The share of its capacity each replica is planned to carry, lowered after SLA misses."""


class WarmPoolStatus(ApiModel):
    """The predictive warm pool: minReplicas raised ahead of the hours the history says are busy."""

    basis: str
    """warm-pool (under a day of history), hour-of-day, or hour-of-week (two weeks or more)."""
    min_replicas: int = Field(ge=0)
    """What the schedule asks for now (the HPA's minReplicas is the larger of this and the plan's)."""
    cold_start_seconds: float | None = Field(default=None, ge=0)
    """Pod created -> Ready, measured on this deployment's pods: how early each raise comes."""
    reason: str = ""
    at: datetime | None = None


class ObservedStatus(ApiModel):
    """What Prometheus says the deployment actually does, beside what the plan predicted."""

    rps: float | None = Field(default=None, ge=0)
    requests: float | None = Field(default=None, ge=0)
    p50_ms: float | None = Field(default=None, ge=0)
    p95_ms: float | None = Field(default=None, ge=0)
    p99_ms: float | None = Field(default=None, ge=0)
    latency_ms: float | None = Field(default=None, ge=0)
    """At the SLA's percentile (p50, p95 or p99, the nearest above it)."""
    error_rate: float | None = Field(default=None, ge=0, le=1)
    throttled_rate: float | None = Field(default=None, ge=0, le=1)
    cache_hit_rate: float | None = Field(default=None, ge=0, le=1)
    mean_batch: float | None = Field(default=None, ge=0)
    replicas: float | None = Field(default=None, ge=0)
    cost_per_million_requests: float | None = Field(default=None, ge=0)
    capacity_rps_per_replica: float | None = Field(default=None, ge=0)
    """Requests per second per replica, when the replicas were saturated."""
    window_seconds: int | None = Field(default=None, ge=1)
    updated_at: datetime | None = None
    predicted: PredictedFigures | None = None
    error: ObservedErrors | None = None
    sla_miss_streak: int = Field(default=0, ge=0)
    """Consecutive observations whose latency missed the SLA."""
    replan: Replan | None = None
    warm_pool: WarmPoolStatus | None = None


class ProfilingRow(ApiModel):
    """Where the measurement of one candidate instance type stands."""

    instance_type: str
    state: Literal["Cached", "Pending", "Running", "Done", "Failed", "Unschedulable"]
    """Cached: measured before; Pending/Running: its Job is waiting or benching; Done: measured now;
    Failed: the bench failed after its retries; Unschedulable: no node could take it in time."""
    job: str | None = None
    reason: str = ""


class InferenceDeploymentStatus(ApiModel):
    """Where the deployment stands and how the operator got there."""

    phase: Phase | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(default=None, ge=0)
    replicas: int | None = Field(default=None, ge=0)
    """Replicas of the serving Deployment that are ready."""
    plan: PlanStatus | None = None
    candidates: list[CandidateRow] = Field(default_factory=list)
    savings: list[SavingsStep] = Field(default_factory=list)
    profiling: list[ProfilingRow] = Field(default_factory=list)
    """One row per candidate instance type: measured, being measured, failed or unschedulable."""
    observed: ObservedStatus | None = None
