"""The operator on the real control plane: apply, re-plan, no-op, delete, RBAC, restart, malformed objects.

The operator runs as a subprocess (``leanserve operator``, kopf) authenticated as
the chart's ServiceAccount (see tests/operator_harness.py). Node pools are kwok
nodes; profiles are stand-ins (tests/stand_in_profiles.py) because nothing can be
measured on a simulated node; pods do not run, kwok marks them Running and Ready.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import time
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from leanserve.api.resource import GROUP, PLURAL, VERSION
from leanserve.api.spec import ModelSpec
from leanserve.controller import profile_store
from leanserve.controller.builders import OWNER_LABEL
from leanserve.controller.config import OperatorConfig
from leanserve.controller.kube import request
from leanserve.controller.reconcile import reconcile
from leanserve.planner.plan import PlanOptions, service_curve
from leanserve_serving.profile import Profile
from tests.conftest import REPO, install_crd
from tests.operator_harness import (
    OPERATOR_NAMESPACE,
    SERVICE_ACCOUNT,
)
from tests.stand_in_profiles import stand_in_profiles
from tests.test_cluster_api import wait_for

pytestmark = pytest.mark.cluster

POOLS = {"m5.2xlarge", "c6i.2xlarge", "g4dn.xlarge"}

SPEC: dict[str, Any] = {
    "model": {
        "uri": "https://models.example.com/fraud.onnx",
        "evaluation": {"uri": "https://models.example.com/e.npz"},
    },
    "sla": {"latency": {"targetMs": 100}, "maxAccuracyDrop": 0.01},
    "traffic": {"averageRps": 800, "peakRps": 2400},
    "candidates": sorted(POOLS),
    "autoscaling": {"warmPool": 2},
}


def doc(name: str, **changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    spec.update(changes)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceDeployment", "metadata": {"name": name}, "spec": spec}


@pytest.fixture
def ns(kube: Any, namespace: str) -> str:
    """A namespace whose profile cache holds the stand-in profiles of SPEC's model."""
    key = profile_store.model_key(ModelSpec.model_validate(SPEC["model"]))
    for profile in stand_in_profiles():
        profile_store.save(kube, namespace, key, profile)
    return namespace


def custom(kube: Any) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube)


def create(kube: Any, ns: str, body: dict[str, Any]) -> dict[str, Any]:
    return custom(kube).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)


def read(kube: Any, ns: str, name: str) -> dict[str, Any]:
    return custom(kube).get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)


def wait_phase(kube: Any, ns: str, name: str, phase: str, timeout: float = 60, generation: int = 1) -> dict:
    def check() -> dict | None:
        obj = read(kube, ns, name)
        status = obj.get("status") or {}
        return obj if status.get("phase") == phase and status.get("observedGeneration") == generation else None

    return wait_for(f"{name} in phase {phase} (generation {generation})", check, timeout)


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


def owned(kube: Any, ns: str, name: str) -> dict[str, dict[str, Any]]:
    """kind/name -> object, for everything labelled as belonging to ``name``."""
    selector = f"{OWNER_LABEL}={name}"
    found: dict[str, dict[str, Any]] = {}
    listers = {
        "Deployment": client.AppsV1Api(kube).list_namespaced_deployment,
        "Service": client.CoreV1Api(kube).list_namespaced_service,
        "ConfigMap": client.CoreV1Api(kube).list_namespaced_config_map,
        "Secret": client.CoreV1Api(kube).list_namespaced_secret,
        "HorizontalPodAutoscaler": client.AutoscalingV2Api(kube).list_namespaced_horizontal_pod_autoscaler,
        "PodDisruptionBudget": client.PolicyV1Api(kube).list_namespaced_pod_disruption_budget,
    }
    for kind, lister in listers.items():
        for item in lister(ns, label_selector=selector).items:
            found[f"{kind}/{item.metadata.name}"] = kube.sanitize_for_serialization(item)
    return found


def versions(objects: dict[str, dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    """What only a write of ours can change, per object.

    Controllers keep writing the status of Deployments, HPAs and PDBs (so their
    resourceVersion moves on its own); a write of ours shows as a new generation
    (spec) or a new time on the ``leanserve`` Apply entry of managedFields.
    ConfigMaps and Services have no controller writing them: their
    resourceVersion is the test there.
    """
    out: dict[str, tuple[Any, ...]] = {}
    for key, obj in objects.items():
        meta = obj["metadata"]
        ours = [
            (f.get("operation"), f.get("time"))
            for f in meta.get("managedFields") or []
            if f.get("manager") == "leanserve"
        ]
        if key.split("/")[0] in ("ConfigMap", "Service"):
            out[key] = (meta["uid"], meta["resourceVersion"])
        else:
            out[key] = (meta["uid"], meta.get("generation"), sorted(ours))
    return out


def events(kube: Any, ns: str, name: str) -> list[str]:
    items = client.CoreV1Api(kube).list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    return [e.reason for e in items if e.source and e.source.component == "leanserve-operator"]


def printer_columns(kube: Any, ns: str, name: str) -> dict[str, Any]:
    """The row `kubectl get infd` prints, from the API server's Table rendering."""
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}/{name}"
    table = request(kube, "GET", path, accept="application/json;as=Table;v=v1;g=meta.k8s.io")
    return dict(zip([c["name"] for c in table["columnDefinitions"]], table["rows"][0]["cells"], strict=True))


# ---- apply -----------------------------------------------------------------------------------------


def test_apply_creates_every_object_on_the_planned_pool_and_reports(kube, operator, ns):
    create(kube, ns, doc("fraud"))
    obj = wait_phase(kube, ns, "fraud", "Ready")
    plan = obj["status"]["plan"]
    assert plan["instanceType"] in POOLS and plan["precision"] in ("fp32", "int8-dynamic")
    objects = owned(kube, ns, "fraud")
    assert set(objects) == {
        "Deployment/fraud",
        "Deployment/fraud-redis",
        "Service/fraud",
        "Service/fraud-redis",
        "ConfigMap/fraud-sidecar",
        "Secret/fraud-cache-key",
        "HorizontalPodAutoscaler/fraud",
        "PodDisruptionBudget/fraud",
    }
    for o in objects.values():
        (ref,) = o["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
            "InferenceDeployment",
            "fraud",
            obj["metadata"]["uid"],
            True,
        )
    pod_spec = objects["Deployment/fraud"]["spec"]["template"]["spec"]
    assert pod_spec["nodeSelector"] == {"node.kubernetes.io/instance-type": plan["instanceType"]}
    hpa = objects["HorizontalPodAutoscaler/fraud"]["spec"]
    assert hpa["minReplicas"] == 2 == plan["replicas"]["min"] and hpa["maxReplicas"] == plan["replicas"]["max"]
    # The scheduler placed the warm pool on nodes of the planned pool; kwok marked them Running.
    selector = f"{OWNER_LABEL}=fraud,app.kubernetes.io/component=serving"

    def running() -> list[Any]:
        pods = client.CoreV1Api(kube).list_namespaced_pod(ns, label_selector=selector).items
        return [p for p in pods if p.status.phase == "Running"]

    pods = wait_for("2 running serving pods", lambda: len(running()) >= 2 and running(), timeout=60)
    nodes = {
        n.metadata.name: n.metadata.labels["node.kubernetes.io/instance-type"]
        for n in client.CoreV1Api(kube).list_node().items
    }
    assert {nodes[p.spec.node_name] for p in pods} == {plan["instanceType"]}
    assert obj["status"]["replicas"] >= 1
    assert {condition(obj, t)["status"] for t in ("Planned", "Deployed", "Available", "WithinBudget")} == {"True"}
    assert obj["status"]["candidates"][0]["feasible"] and obj["status"]["savings"][0]["lever"] == "baseline"
    row = printer_columns(kube, ns, "fraud")
    assert row["Phase"] == "Ready" and row["Instance"] == plan["instanceType"] and row["Precision"] == plan["precision"]
    assert row["Replicas"] >= 1 and row["Cost/1M"] == pytest.approx(plan["costPerMillionRequests"])
    assert {"Planned", "Applied", "ReplicasReady"} <= set(events(kube, ns, "fraud"))


def test_a_gpu_plan_tolerates_the_gpu_taint_and_requests_the_gpu(kube, operator, ns):
    create(kube, ns, doc("gpu", candidates=["g4dn.xlarge"], autoscaling={"warmPool": 0}))
    obj = wait_phase(kube, ns, "gpu", "Ready")
    assert obj["status"]["plan"]["instanceType"] == "g4dn.xlarge"
    deployment = owned(kube, ns, "gpu")["Deployment/gpu"]
    pod_spec = deployment["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec["tolerations"]
    model = next(c for c in pod_spec["containers"] if c["name"] == "model-server")
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert owned(kube, ns, "gpu")["HorizontalPodAutoscaler/gpu"]["spec"]["minReplicas"] == 1  # never 0 on GPU
    serving = f"{OWNER_LABEL}=gpu,app.kubernetes.io/component=serving"
    pods = client.CoreV1Api(kube).list_namespaced_pod(ns, label_selector=serving).items
    assert pods and all(p.spec.node_name and "g4dn" in p.spec.node_name for p in pods)


def test_an_unsatisfiable_spec_gets_a_condition_and_no_objects(kube, operator, ns):
    create(kube, ns, doc("broke", budget={"maxCostPerMillionRequests": 0.0001}))
    obj = wait_phase(kube, ns, "broke", "Failed")
    planned = condition(obj, "Planned")
    assert planned["status"] == "False" and planned["reason"] == "NoFeasiblePlan"
    assert "budget binds" in planned["message"] and "over maxCostPerMillionRequests" in planned["message"]
    assert condition(obj, "WithinBudget")["status"] == "False"
    assert all(c["reason"].startswith("over budget") for c in obj["status"]["candidates"][:3])
    assert owned(kube, ns, "broke") == {}
    assert "NoFeasiblePlan" in wait_for("a warning event", lambda: events(kube, ns, "broke"))


def test_without_evaluation_data_nothing_can_be_profiled_and_it_says_so(kube, operator, namespace):
    create(kube, namespace, doc("blind", model={"uri": "https://models.example.com/other.onnx"}))
    obj = wait_phase(kube, namespace, "blind", "Failed")
    planned = condition(obj, "Planned")
    assert planned["reason"] == "NoCandidateAvailable" and "profiling needs model.evaluation" in planned["message"]
    assert {r["state"] for r in obj["status"]["profiling"]} == {"Failed"}
    assert owned(kube, namespace, "blind") == {}


# ---- change, no change, delete ----------------------------------------------------------------------


def most_a_replica_can_carry(profiles: list[Profile], options: PlanOptions | None = None) -> float:
    """A rate (req/s) above what the planner sizes any replica of any candidate from ``profiles`` to carry.

    The planner caps a replica at ``max_utilization`` (< 1) of the best throughput its service curve
    allows, and at ``front_door_rps`` where the curve was not measured through the serving stack.
    """
    options = options or PlanOptions()
    most = 0.0
    for variant in (v for p in profiles for v in p.variants if v.status == "ok" and v.latency):
        curve = service_curve(variant)
        best = max(b / (ms / 1000.0) for b, ms in zip(curve.batch_sizes, curve.mean_ms, strict=True))
        most = max(most, best if curve.measured_stack else min(best, options.front_door_rps))
    return most


def test_a_traffic_change_replans_without_touching_unrelated_fields(kube, operator, ns):
    create(kube, ns, doc("shift"))
    before_obj = wait_phase(kube, ns, "shift", "Ready")
    before = owned(kube, ns, "shift")
    # Another manager's field on our Deployment, and the replica count the HPA owns, must survive.
    client.AppsV1Api(kube).patch_namespaced_deployment(
        "shift", ns, {"metadata": {"annotations": {"team.example.com/owner": "fraud-team"}}}
    )
    client.AppsV1Api(kube).patch_namespaced_deployment_scale("shift", ns, {"spec": {"replicas": 3}})
    before = owned(kube, ns, "shift")
    # (peak replicas + 1) times what any replica can carry needs more replicas on any machine. A fixed figure
    # does not: the stand-in profiles are benched here, and on a fast bench 2 replicas carry 24 k req/s.
    peak = (before_obj["status"]["plan"]["replicas"]["peak"] + 1) * most_a_replica_can_carry(stand_in_profiles())
    traffic = {"averageRps": math.ceil(peak / 3), "peakRps": math.ceil(peak)}
    custom(kube).patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "shift", {"spec": {"traffic": traffic}})
    after_obj = wait_phase(kube, ns, "shift", "Ready", generation=2)
    after = owned(kube, ns, "shift")
    assert after_obj["status"]["plan"]["replicas"]["peak"] > before_obj["status"]["plan"]["replicas"]["peak"]
    assert (
        after["HorizontalPodAutoscaler/shift"]["spec"]["maxReplicas"]
        > before["HorizontalPodAutoscaler/shift"]["spec"]["maxReplicas"]
    )
    deployment = after["Deployment/shift"]
    assert deployment["metadata"]["annotations"]["team.example.com/owner"] == "fraud-team"
    assert deployment["spec"]["replicas"] == 3
    # Objects the traffic does not shape were not written at all.
    for unchanged in ("Service/shift", "PodDisruptionBudget/shift", "Service/shift-redis", "Deployment/shift-redis"):
        assert versions(after)[unchanged] == versions(before)[unchanged], unchanged


def test_turning_the_cache_off_removes_the_managed_redis(kube, operator, ns):
    create(kube, ns, doc("nocache"))
    wait_phase(kube, ns, "nocache", "Ready")
    assert "Deployment/nocache-redis" in owned(kube, ns, "nocache")
    custom(kube).patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "nocache", {"spec": {"cache": {"exact": {"enabled": False}}}}
    )
    wait_phase(kube, ns, "nocache", "Ready", generation=2)
    remaining = wait_for(
        "the managed Redis gone",
        lambda: (lambda o: "Deployment/nocache-redis" not in o and o)(owned(kube, ns, "nocache")),
        timeout=30,
    )
    assert "Service/nocache-redis" not in remaining and "Deployment/nocache" in remaining
    config = json.loads(remaining["ConfigMap/nocache-sidecar"]["data"]["sidecar.json"])
    assert config["redis_url"] == ""


def test_reconciling_an_unchanged_spec_writes_nothing(kube, operator, ns):
    create(kube, ns, doc("steady", autoscaling={"warmPool": 1}))  # one pod: Ready is the final state
    wait_phase(kube, ns, "steady", "Ready")
    time.sleep(1)  # let the availability update land
    before, body = versions(owned(kube, ns, "steady")), read(kube, ns, "steady")
    outcome = reconcile(kube, body, OperatorConfig())
    assert outcome.status_written is False
    assert len(outcome.applied) == 8
    assert versions(owned(kube, ns, "steady")) == before  # the cache key Secret included: made once
    # The sidecar's HMAC key: random, made by the operator, read by the pod through secretKeyRef.
    key = client.CoreV1Api(kube).read_namespaced_secret("steady-cache-key", ns).data["hmac-key"]
    assert len(base64.b64decode(key)) >= 32
    assert read(kube, ns, "steady")["metadata"]["resourceVersion"] == body["metadata"]["resourceVersion"]


def test_delete_garbage_collects_everything_owned(kube, operator, ns):
    create(kube, ns, doc("gone"))
    wait_phase(kube, ns, "gone", "Ready")
    assert len(owned(kube, ns, "gone")) == 8
    custom(kube).delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "gone")
    # The garbage collector (kube-controller-manager) does the work; it may first need to discover the CRD.
    wait_for("every owned object deleted", lambda: owned(kube, ns, "gone") == {}, timeout=120)


# ---- RBAC, restart, malformed objects -----------------------------------------------------------------


def access(
    kube: Any, verb: str, resource: str, group: str = "", namespace: str = "default", subresource: str = ""
) -> bool:
    review = client.AuthorizationV1Api(kube).create_subject_access_review(
        {
            "spec": {
                "user": f"system:serviceaccount:{OPERATOR_NAMESPACE}:{SERVICE_ACCOUNT}",
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{OPERATOR_NAMESPACE}",
                    "system:authenticated",
                ],
                "resourceAttributes": {
                    "verb": verb,
                    "resource": resource,
                    "group": group,
                    "namespace": namespace,
                    "subresource": subresource,
                },
            }
        }
    )
    return bool(review.status.allowed)


def test_the_charts_rbac_is_enough_and_no_broader(kube, helm, operator):
    # Enough: every other test in this module drives the operator with only these permissions.
    assert access(kube, "patch", "deployments", "apps") and access(
        kube, "patch", "inferencedeployments", "leanserve.dev", subresource="status"
    )
    # Secrets: it makes each deployment's cache key and never reads one back.
    assert access(kube, "create", "secrets") and access(kube, "patch", "secrets")
    # No broader: no reading secrets, no pods or exec, no deleting what it does not prune, no RBAC, no nodes.
    forbidden = [
        ("get", "secrets", ""),
        ("list", "secrets", ""),
        ("watch", "secrets", ""),
        ("delete", "secrets", ""),
        ("create", "pods", ""),
        ("delete", "configmaps", ""),
        ("delete", "horizontalpodautoscalers", "autoscaling"),
        ("delete", "jobs", "batch"),
        ("get", "pods", ""),
        ("create", "pods/exec", ""),
        ("create", "clusterrolebindings", "rbac.authorization.k8s.io"),
        ("escalate", "clusterroles", "rbac.authorization.k8s.io"),
        ("patch", "nodes", ""),
        ("delete", "inferencedeployments", "leanserve.dev"),
        ("update", "customresourcedefinitions", "apiextensions.k8s.io"),
    ]
    for verb, resource, group in forbidden:
        sub = ""
        if "/" in resource:
            resource, sub = resource.split("/")
        assert not access(kube, verb, resource, group, subresource=sub), f"{verb} {resource} should be denied"
    from tests.operator_harness import render_chart

    (role,) = [d for d in render_chart(helm) if d["kind"] == "ClusterRole"]
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        assert "secrets" not in rule["resources"] or set(rule["verbs"]) == {"create", "patch"}, rule
        assert "delete" not in rule["verbs"] or set(rule["resources"]) <= {"deployments", "services"}, rule
    binding = next(d for d in render_chart(helm) if d["kind"] == "ClusterRoleBinding")
    assert binding["roleRef"]["name"] != "cluster-admin"


def test_an_operator_restart_resumes_without_duplicating_anything(kube, operator, ns):
    create(kube, ns, doc("again", autoscaling={"warmPool": 1}))  # one pod: Ready is the final state
    wait_phase(kube, ns, "again", "Ready")
    time.sleep(1)
    before = versions(owned(kube, ns, "again"))
    status_before = read(kube, ns, "again")["status"]
    replica_sets = client.AppsV1Api(kube).list_namespaced_replica_set(ns, label_selector=f"{OWNER_LABEL}=again").items
    operator.restart()
    operator.wait_for_log("Resuming is processed", timeout=60)
    time.sleep(2)
    assert versions(owned(kube, ns, "again")) == before
    assert read(kube, ns, "again")["status"] == status_before
    after_sets = client.AppsV1Api(kube).list_namespaced_replica_set(ns, label_selector=f"{OWNER_LABEL}=again").items
    assert [r.metadata.uid for r in after_sets] == [r.metadata.uid for r in replica_sets]


def test_a_malformed_object_gets_a_condition_not_a_crash_loop(kube, operator, ns):
    """An object stored under an older, looser schema (installed for the occasion, then restored)."""
    crd_path = REPO / "crds" / "inferencedeployments.leanserve.dev.yaml"
    crd = client.ApiextensionsV1Api(kube).read_custom_resource_definition("inferencedeployments.leanserve.dev")
    loose = kube.sanitize_for_serialization(crd)
    version = loose["spec"]["versions"][0]
    version["schema"]["openAPIV3Schema"]["properties"]["spec"] = {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    loose["spec"]["versions"] = [version]
    request(
        kube,
        "PUT",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/inferencedeployments.leanserve.dev",
        body=loose,
    )
    try:
        body = doc("old")
        body["spec"]["traffic"] = {"averageRps": -5}
        body["spec"]["sla"] = {"latency": {"percentile": 150, "targetMs": 100}}
        wait_for("the loose schema to be served", lambda: _try_create(kube, ns, body), timeout=30)
    finally:
        install_crd(kube, crd_path)
    obj = wait_phase(kube, ns, "old", "Failed")
    planned = condition(obj, "Planned")
    assert planned["reason"] == "InvalidSpec"
    # Field paths and values, as `leanserve validate` prints them (unknown fields are pruned by the server on read).
    assert "spec.traffic.averageRps" in planned["message"] and "(value: -5)" in planned["message"]
    assert "spec.sla.latency.percentile" in planned["message"]
    assert owned(kube, ns, "old") == {}
    needle = f"event=invalid_spec name={ns}/old"
    attempts = operator.text().count(needle)
    assert attempts >= 1
    time.sleep(5)
    assert operator.alive()
    assert operator.text().count(needle) == attempts  # kopf was told: permanent, no retry loop


def _try_create(kube: Any, ns: str, body: dict[str, Any]) -> bool:
    try:
        create(kube, ns, copy.deepcopy(body))
        return True
    except ApiException as exc:
        if exc.status == 422:
            return False
        raise
