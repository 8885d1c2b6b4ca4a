"""Reconcile one InferenceDeployment: observe -> decide -> act.

Level-based: ``observe`` reads what the API server has now (observe.py),
``decide`` computes from that alone, as a pure function, the objects the
deployment should own and the status it should show (decide.py), and ``act``
writes them: server-side apply for the objects, the status only when it
differs. Running it twice in a row writes nothing the second time.

No kopf here (the handlers call this and translate the outcome into kopf's
retry vocabulary), and no planning or manifest logic (planner, builders).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client import ApiClient

from leanserve.controller import builders, kube, profile_store
from leanserve.controller.conditions import same_status, transitions
from leanserve.controller.config import OperatorConfig
from leanserve.controller.decide import Decision, availability_status, decide
from leanserve.controller.observe import Observed, observe

log = logging.getLogger("leanserve.operator")

SERVING_API = ("apps/v1", "Deployment")


@dataclass
class Outcome:
    """What a reconcile did, for the handler (retries) and the caller (tests, benchmarks)."""

    status: dict[str, Any]
    applied: list[str] = field(default_factory=list)
    """kind/name of every object applied ("deleted kind/name" for each one deleted)."""
    status_written: bool = False
    retry_after_s: float | None = None
    """Try again later (no profiles yet, profiling under way)."""
    retry_reason: str = ""
    permanent: str | None = None
    """Never with this spec (invalid spec); a new generation is needed."""
    plan_seconds: float = 0.0


def reconcile(api: ApiClient, body: dict[str, Any], config: OperatorConfig) -> Outcome:
    """Bring the cluster in line with ``body`` (an InferenceDeployment as the API server has it)."""
    observed = observe(api, body, config)
    decision = decide(observed, config)
    return act(api, observed, decision, config)


def act(api: ApiClient, observed: Observed, decision: Decision, config: OperatorConfig) -> Outcome:
    """The writes of a decision: profiles to the cache, Jobs, objects, deletions, then the status."""
    owner = observed.owner
    where = f"{owner.namespace}/{owner.name}"
    outcome = Outcome(
        decision.status,
        retry_after_s=decision.retry_after_s,
        retry_reason=decision.retry_reason,
        permanent=decision.permanent,
        plan_seconds=decision.plan_seconds,
    )
    if decision.permanent:
        log.warning("event=invalid_spec name=%s generation=%s %s", where, observed.generation, decision.permanent)
    for profile in decision.save_profiles:
        profile_store.save(api, owner.namespace, observed.key, profile, config.image_version)
    for job in decision.create_jobs:
        kube.apply(api, job)
        log.info("event=profiling_job_created name=%s job=%s", where, job["metadata"]["name"])
    for manifest in decision.apply:
        if decision.initial_replicas is not None and _is_serving(manifest, owner.name):
            kube.ensure_created(api, manifest, {"replicas": decision.initial_replicas})
        if manifest["kind"] == "Secret" and manifest["metadata"]["name"] == builders.cache_key_name(owner):
            key = {builders.CACHE_KEY_FIELD: secrets.token_urlsafe(32)}  # the one impure value: made here, once
            kube.ensure_created(api, manifest, key, into="stringData")
        kube.apply(api, manifest)
        outcome.applied.append(f"{manifest['kind']}/{manifest['metadata']['name']}")
    for stale in decision.delete:
        if kube.delete_owned(api, stale, owner.uid):
            outcome.applied.append(f"deleted {stale['kind']}/{stale['metadata']['name']}")
    outcome.status_written = write_status(api, observed.body, decision.status)
    if decision.plan:
        log.info(
            "event=reconciled name=%s plan=%r objects=%d status_written=%s plan_s=%.3f",
            where,
            decision.plan,
            len(decision.apply),
            outcome.status_written,
            decision.plan_seconds,
        )
    return outcome


def _is_serving(manifest: dict[str, Any], name: str) -> bool:
    return (manifest["apiVersion"], manifest["kind"]) == SERVING_API and manifest["metadata"]["name"] == name


def write_status(api: ApiClient, body: dict[str, Any], status: dict[str, Any]) -> bool:
    """Write ``status`` when it differs from the object's, with an Event per condition that changed; True if written."""
    current = body.get("status") or {}
    if same_status(current, status):
        return False
    meta = body["metadata"]
    removed = {k: None for k in current if k not in status}  # a merge patch deletes with null
    kube.patch_status(api, meta["name"], meta["namespace"], {**status, **removed})
    for cond in transitions(current.get("conditions") or [], status.get("conditions") or []):
        kind = "Normal" if cond["status"] == "True" or cond["type"] == "Available" else "Warning"
        kube.post_event(api, body, cond["reason"], cond["message"], kind)
    return True


def refresh_availability(api: ApiClient, body: dict[str, Any], deployment: dict[str, Any] | None) -> bool:
    """Update replicas, the Available condition and the phase from the serving Deployment; True when written."""
    status = availability_status(body.get("status") or {}, deployment)
    return status is not None and write_status(api, body, status)
