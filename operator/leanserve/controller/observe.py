"""Observe: everything a reconcile decides from, read in one place (reads only, no writes).

The first of reconcile's three steps (observe -> decide -> act, cert-manager's
ProcessItem shape): what the API server has now, gathered into one immutable
value, so that the decision is a pure function of it and can be tested
without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes.client import ApiClient
from pydantic import ValidationError

from leanserve.api.spec import InferenceDeploymentSpec
from leanserve.api.validation import errors_from_validation
from leanserve.controller import builders, kube, profile_store
from leanserve.controller.builders import Owner
from leanserve.controller.conditions import parse_rfc3339
from leanserve.controller.config import OperatorConfig
from leanserve.observer import Observation, ObserverUnavailable, observe_deployment
from leanserve.observer.history import request_rate_history
from leanserve_serving.profile import Profile

#: How much request-rate history the predictive warm pool reads (two weeks: hour of the week).
HISTORY_DAYS = 14
#: The label the Job controller puts on a Job's pods.
JOB_NAME_LABEL = "job-name"


@dataclass(frozen=True)
class Observed:
    """One InferenceDeployment and what it owns, as the API server had them at ``now``."""

    body: dict[str, Any]
    """The InferenceDeployment (its status is what the decision compares with)."""
    owner: Owner
    now: datetime
    spec: InferenceDeploymentSpec | None = None
    """None when the spec does not validate; ``invalid`` says why."""
    invalid: list[str] = field(default_factory=list)
    key: str = ""
    """The model's key in the profile cache."""
    profiles: list[Profile] = field(default_factory=list)
    """Cached profiles of this model for this image version."""
    broken: list[str] = field(default_factory=list)
    """Profile ConfigMaps that did not parse."""
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """This deployment's profiling Jobs, by name."""
    pods: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Their pods, by Job name."""
    serving: dict[str, Any] | None = None
    """The serving Deployment, None when it does not exist."""
    stale: list[dict[str, Any]] = field(default_factory=list)
    """Objects this deployment owns that its spec no longer wants (the managed Redis after the cache moved)."""
    observation: Observation | None = None
    """What Prometheus said the deployment did, when a reading was due and Prometheus answered."""
    observation_error: str | None = None
    """Why Prometheus could not say, when a reading was due."""
    history: list[tuple[datetime, float]] | None = None
    """The request rate, hourly, over the last two weeks (the predictive warm pool learns from it)."""
    serving_pods: list[dict[str, Any]] = field(default_factory=list)
    """The serving pods, when a reading was taken (their start times give the cold start)."""

    @property
    def generation(self) -> int | None:
        return self.body["metadata"].get("generation")

    @property
    def status(self) -> dict[str, Any]:
        return self.body.get("status") or {}


def owner_of(body: dict[str, Any]) -> Owner:
    meta = body["metadata"]
    return Owner(meta["name"], meta["namespace"], meta["uid"])


def parse_spec(body: dict[str, Any]) -> tuple[InferenceDeploymentSpec | None, list[str]]:
    """The spec, or the field errors that stop it (a spec written under an older schema)."""
    try:
        return InferenceDeploymentSpec.model_validate(body.get("spec") or {}), []
    except ValidationError as exc:
        return None, ["spec." + e.format() for e in errors_from_validation(exc, body.get("spec"))]


def reading_due(body: dict[str, Any], spec: InferenceDeploymentSpec, now: datetime) -> bool:
    """A plan is deployed and the last reading is older than spec.observe.intervalSeconds (or there is none)."""
    status = body.get("status") or {}
    if not status.get("plan"):
        return False
    last = (status.get("observed") or {}).get("updatedAt")
    if not last:
        return True
    return (now - parse_rfc3339(last)).total_seconds() >= spec.observe.interval_seconds


def observe(api: ApiClient, body: dict[str, Any], config: OperatorConfig, now: datetime | None = None) -> Observed:
    """Read what the decision needs: profiles, profiling Jobs and pods, the serving Deployment, stale objects."""
    owner = owner_of(body)
    now = now or datetime.now(UTC)
    spec, invalid = parse_spec(body)
    if spec is None:
        return Observed(body=body, owner=owner, now=now, invalid=invalid)
    key = profile_store.model_key(spec.model)
    profiles, broken = profile_store.load(api, owner.namespace, key, config.image_version)
    selector = f"{builders.OWNER_LABEL}={owner.name},app.kubernetes.io/component=profiling"
    jobs = {j["metadata"]["name"]: j for j in kube.list_objects(api, "batch/v1", "Job", owner.namespace, selector)}
    pods: dict[str, list[dict[str, Any]]] = {}
    if jobs:  # the Jobs' pods carry the Jobs' template labels
        for pod in kube.list_objects(api, "v1", "Pod", owner.namespace, selector):
            job = (pod["metadata"].get("labels") or {}).get(JOB_NAME_LABEL)
            if job in jobs:
                pods.setdefault(job, []).append(pod)
    serving = kube.get(api, kube.reference("apps/v1", "Deployment", owner.name, owner.namespace))
    stale = []
    if not builders.wants_managed_redis(spec):
        for obj in builders.render_redis(owner, spec, config.build):
            current = kube.get(api, obj)
            if current is not None and kube.controlled_by(current, owner.uid):
                stale.append(obj)
    observation, observation_error = None, None
    if config.prometheus_url and reading_due(body, spec, now):
        try:
            observation = observe_deployment(
                config.prometheus_url, owner.namespace, owner.name, spec.observe.window_seconds, now=now
            )
        except ObserverUnavailable as exc:
            observation_error = exc.reason
    history, serving_pods = None, []
    if observation is not None:
        try:
            history = request_rate_history(
                config.prometheus_url, owner.namespace, owner.name, days=HISTORY_DAYS, step_s=3600, now=now
            )
        except ObserverUnavailable:
            history = None  # the figures were read: the warm pool keeps its last schedule
        selector = f"{builders.OWNER_LABEL}={owner.name},app.kubernetes.io/component=serving"
        serving_pods = kube.list_objects(api, "v1", "Pod", owner.namespace, selector)
    return Observed(
        body=body,
        owner=owner,
        now=now,
        observation=observation,
        observation_error=observation_error,
        history=history,
        serving_pods=serving_pods,
        spec=spec,
        key=key,
        profiles=profiles,
        broken=broken,
        jobs=jobs,
        pods=pods,
        serving=serving,
        stale=stale,
    )
