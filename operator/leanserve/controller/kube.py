"""The Kubernetes adapter: server-side apply, reads, status patches and Events, as plain JSON.

Objects travel as dicts (what the builders return), not as the client's
generated classes: server-side apply needs exactly the fields we own and
nothing else, and a dict is what we wrote. Only the kinds leanserve manages
are known here; anything else is a programming error.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.rest import ApiException

from leanserve.api.resource import GROUP, KIND, PLURAL, VERSION
from leanserve.controller.conditions import now_rfc3339

FIELD_MANAGER = "leanserve"
#: Owns a Deployment's first replica count only, so the HPA can take it over (see ``ensure_created``).
CREATE_MANAGER = "leanserve-create"

log = logging.getLogger("leanserve.operator")

#: (apiVersion, kind) -> (path prefix, plural) of every kind the operator applies.
RESOURCES: dict[tuple[str, str], tuple[str, str]] = {
    ("v1", "ConfigMap"): ("/api/v1", "configmaps"),
    ("v1", "Secret"): ("/api/v1", "secrets"),
    ("v1", "Service"): ("/api/v1", "services"),
    ("v1", "Event"): ("/api/v1", "events"),
    ("v1", "Pod"): ("/api/v1", "pods"),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("/apis/autoscaling/v2", "horizontalpodautoscalers"),
    ("policy/v1", "PodDisruptionBudget"): ("/apis/policy/v1", "poddisruptionbudgets"),
    ("batch/v1", "Job"): ("/apis/batch/v1", "jobs"),
    (f"{GROUP}/{VERSION}", KIND): (f"/apis/{GROUP}/{VERSION}", PLURAL),
}


def collection_path(api_version: str, kind: str, namespace: str) -> str:
    prefix, plural = RESOURCES[(api_version, kind)]
    return f"{prefix}/namespaces/{namespace}/{plural}"


def object_path(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{collection_path(obj['apiVersion'], obj['kind'], meta['namespace'])}/{meta['name']}"


def reference(api_version: str, kind: str, name: str, namespace: str) -> dict[str, Any]:
    """The least of an object that ``get`` and ``object_path`` need."""
    return {"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": namespace}}


def request(
    api: ApiClient,
    method: str,
    path: str,
    body: Any = None,
    query: dict[str, str] | None = None,
    content_type: str = "application/json",
    accept: str = "application/json",
) -> Any:
    """One API call; the decoded JSON answer. Raises ApiException on an error status."""
    params = api.param_serialize(
        method=method,
        resource_path=path,
        query_params=list((query or {}).items()),
        header_params={"Content-Type": content_type, "Accept": accept},
        body=body,
        auth_settings=["BearerToken"],
    )
    response = api.call_api(*params)
    data = response.read()
    if not 200 <= response.status < 300:
        raise ApiException(http_resp=response)
    return json.loads(data) if data else None


def get(api: ApiClient, obj: dict[str, Any]) -> dict[str, Any] | None:
    """The object as the server has it, or None when it does not exist."""
    try:
        return request(api, "GET", object_path(obj))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def apply(api: ApiClient, obj: dict[str, Any], field_manager: str = FIELD_MANAGER) -> dict[str, Any]:
    """Server-side apply ``obj`` (forcing ownership of the fields it names); the server's result.

    Applying what the server already has is a no-op there: no new resourceVersion, no event.
    """
    return request(
        api,
        "PATCH",
        object_path(obj),
        body=obj,
        query={"fieldManager": field_manager, "force": "true"},
        content_type="application/apply-patch+yaml",
    )


def ensure_created(api: ApiClient, obj: dict[str, Any], initial: dict[str, Any], into: str = "spec") -> bool:
    """Create ``obj`` with ``initial`` merged into its ``into`` field, unless it exists; True when created.

    Used for a Deployment's replicas: set once at creation under ``CREATE_MANAGER``
    (an Update, not an Apply), so later applies that leave replicas out do not
    reset it, and the HPA owns it from then on; and for the cache key Secret's
    random key (``into="stringData"``), which later applies leave alone the same way.
    """
    body = json.loads(json.dumps(obj))
    body.setdefault(into, {}).update(initial)
    try:
        request(
            api,
            "POST",
            collection_path(obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"]),
            body=body,
            query={"fieldManager": CREATE_MANAGER},
        )
    except ApiException as exc:
        if exc.status != 409:  # created meanwhile (another reconcile): fine, apply follows
            raise
        return False
    return True


def controlled_by(obj: dict[str, Any], owner_uid: str) -> bool:
    """Whether ``owner_uid`` is the controller among ``obj``'s owner references."""
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(r.get("uid") == owner_uid and r.get("controller") for r in refs)


def delete_owned(api: ApiClient, obj: dict[str, Any], owner_uid: str) -> bool:
    """Delete ``obj`` if it exists and ``owner_uid`` controls it (never someone else's object); True if deleted."""
    current = get(api, obj)
    if current is None or not controlled_by(current, owner_uid):
        return False
    uid = current["metadata"]["uid"]  # type: ignore[index]
    try:  # the precondition makes sure it is the object just read, not a new one of the same name
        request(
            api, "DELETE", object_path(obj), body={"preconditions": {"uid": uid}, "propagationPolicy": "Background"}
        )
    except ApiException as exc:
        if exc.status not in (404, 409):
            raise
        return False
    return True


def list_objects(api: ApiClient, api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict]:
    answer = request(api, "GET", collection_path(api_version, kind, namespace), query={"labelSelector": label_selector})
    return answer.get("items", [])


def patch_status(api: ApiClient, name: str, namespace: str, status: dict[str, Any]) -> dict[str, Any]:
    """Replace the InferenceDeployment's status (a merge patch of the status subresource)."""
    path = f"{collection_path(f'{GROUP}/{VERSION}', KIND, namespace)}/{name}/status"
    return request(api, "PATCH", path, body={"status": status}, content_type="application/merge-patch+json")


def post_event(api: ApiClient, involved: dict[str, Any], reason: str, message: str, type_: str = "Normal") -> None:
    """A core/v1 Event on the InferenceDeployment, what ``kubectl describe`` shows. Never raises."""
    meta = involved["metadata"]
    now = now_rfc3339()
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": involved["apiVersion"],
            "kind": involved["kind"],
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "resourceVersion": meta.get("resourceVersion", ""),
        },
        "reason": reason,
        "message": message[:1024],
        "type": type_,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "source": {"component": "leanserve-operator"},
        "reportingComponent": "leanserve-operator",
    }
    try:
        request(api, "POST", collection_path("v1", "Event", meta["namespace"]), body=event)
    except (ApiException, OSError) as exc:  # an event lost is not worth a failed reconcile
        log.warning("event=post_failed reason=%s error=%s", reason, exc)
