"""The InferenceDeployment API and node pools, against the real control plane.

These talk to a real kube-apiserver (with etcd, controller-manager, scheduler
and kwok nodes) started by the ``control_plane`` fixture. kwok plays the
kubelet: pods bound to its nodes are marked Running, no container runs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from leanserve.api.resource import GROUP, PLURAL, VERSION
from tests.conftest import EXAMPLES, controlplane, load_example
from tests.invalid_specs import INVALID_CASES

pytestmark = pytest.mark.cluster

SERVER_CASES = [c for c in INVALID_CASES if c.server]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def create_infd(kube: Any, namespace: str, doc: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(doc)
    body["metadata"]["namespace"] = namespace
    return client.CustomObjectsApi(kube).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body, field_validation="Strict"
    )


def test_crd_is_established_with_the_generated_schema(kube):
    crd = client.ApiextensionsV1Api(kube).read_custom_resource_definition("inferencedeployments.leanserve.dev")
    assert crd.spec.names.short_names == ["infd"]
    conditions = {c.type: c.status for c in crd.status.conditions}
    assert conditions["Established"] == "True"
    assert conditions.get("NonStructuralSchema", "False") == "False"


def test_server_reports_its_real_version(kube):
    info = client.VersionApi(kube).get_code()
    assert info.git_version.startswith("v1.3"), info.git_version
    assert info.major == "1"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_is_accepted_and_defaulted(kube, namespace, path):
    created = create_infd(kube, namespace, load_example(path))
    spec = created["spec"]
    assert created["metadata"]["generation"] == 1
    # Structural defaults were applied by the server.
    assert spec["cache"]["semantic"]["embeddingModel"] == "all-MiniLM-L6-v2"
    assert spec["autoscaling"]["scaleDownStabilizationSeconds"] in (300, 600)
    assert "budget" in spec and "batching" in spec


def test_enough_cases_reach_the_server():
    assert len(SERVER_CASES) >= 12


@pytest.mark.parametrize("case", SERVER_CASES, ids=[c.id for c in SERVER_CASES])
def test_invalid_spec_is_rejected_by_the_api_server(kube, namespace, minimal_doc, case):
    with pytest.raises(ApiException) as info:
        create_infd(kube, namespace, case.apply(minimal_doc))
    assert info.value.status in (400, 422), info.value.body
    message = info.value.body
    assert case.path in message, f"{case.id}: the server's message does not name {case.path}:\n{message}"


def test_status_is_a_subresource(kube, namespace, minimal_doc):
    api = client.CustomObjectsApi(kube)
    name = minimal_doc["metadata"]["name"]
    created = create_infd(kube, namespace, minimal_doc)
    assert created["metadata"]["generation"] == 1

    status = {"status": {"phase": "Planning", "observedGeneration": 1}}
    patched = api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, status)
    assert patched["status"]["phase"] == "Planning"
    assert patched["metadata"]["generation"] == 1, "a status write must not bump the generation"

    # Status sent through the main resource is ignored.
    api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"status": {"phase": "Failed"}})
    assert api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)["status"]["phase"] == "Planning"

    spec_change = {"spec": {"traffic": {"averageRps": 200}}}
    changed = api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, spec_change)
    assert changed["metadata"]["generation"] == 2, "a spec change must bump the generation"


def test_printer_columns_in_the_servers_table(kube, namespace, minimal_doc):
    api = client.CustomObjectsApi(kube)
    name = minimal_doc["metadata"]["name"]
    create_infd(kube, namespace, minimal_doc)
    status = {
        "status": {
            "phase": "Ready",
            "replicas": 3,
            "plan": {"instanceType": "g4dn.xlarge", "precision": "int8", "costPerMillionRequests": 2.5},
            "observed": {"p95Ms": 41.5},
        }
    }
    api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, status)
    response = api.list_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        _preload_content=False,
        _headers={"Accept": "application/json;as=Table;g=meta.k8s.io;v=v1"},
    )
    table = json.loads(response.data)
    assert table["kind"] == "Table"
    columns = [c["name"] for c in table["columnDefinitions"]]
    for expected in ("Name", "Phase", "Instance", "Precision", "Replicas", "Cost/1M", "P95", "Age"):
        assert expected in columns
    [row] = table["rows"]
    cells = dict(zip(columns, row["cells"], strict=True))
    assert cells["Name"] == name
    assert (cells["Phase"], cells["Instance"], cells["Precision"]) == ("Ready", "g4dn.xlarge", "int8")
    assert cells["Replicas"] == 3
    assert cells["Cost/1M"] == 2.5
    assert cells["P95"] == 41.5


def gpu_deployment(name: str) -> dict[str, Any]:
    """A Deployment asking for one GPU on g4dn.xlarge, tolerating the GPU taint."""
    return yaml.safe_load(f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      nodeSelector: {{node.kubernetes.io/instance-type: g4dn.xlarge}}
      tolerations: [{{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}}]
      containers:
        - name: model
          image: leanserve/serving-gpu:test
          resources:
            requests: {{cpu: "1", memory: 2Gi}}
            limits: {{nvidia.com/gpu: "1", memory: 2Gi}}
""")


def pods_of(kube: Any, namespace: str, app: str) -> list[Any]:
    return client.CoreV1Api(kube).list_namespaced_pod(namespace, label_selector=f"app={app}").items


def test_gpu_deployment_runs_on_the_gpu_pool(kube, namespace):
    client.AppsV1Api(kube).create_namespaced_deployment(namespace, gpu_deployment("gpu-model"))
    pods = wait_for(
        "a Running pod",
        lambda: [p for p in pods_of(kube, namespace, "gpu-model") if p.status.phase == "Running"],
        timeout=60,
    )
    node = client.CoreV1Api(kube).read_node(pods[0].spec.node_name)
    assert node.metadata.labels["node.kubernetes.io/instance-type"] == "g4dn.xlarge"
    assert node.status.allocatable["nvidia.com/gpu"] == "1"


@contextlib.contextmanager
def without_gpu_pool(plane: controlplane.ControlPlane) -> Iterator[None]:
    plane.remove_pool(controlplane.GPU_POOL)
    try:
        yield
    finally:
        plane.ensure_pools(gpu_pool=True)


def test_gpu_deployment_is_unschedulable_without_the_gpu_pool(kube, namespace, control_plane):
    with without_gpu_pool(control_plane):
        wait_for(
            "GPU nodes gone",
            lambda: (
                not client.CoreV1Api(kube)
                .list_node(label_selector="node.kubernetes.io/instance-type=g4dn.xlarge")
                .items
            ),
        )
        client.AppsV1Api(kube).create_namespaced_deployment(namespace, gpu_deployment("gpu-orphan"))

        def unschedulable() -> Any:
            for pod in pods_of(kube, namespace, "gpu-orphan"):
                for cond in pod.status.conditions or []:
                    if cond.type == "PodScheduled" and cond.status == "False" and cond.reason == "Unschedulable":
                        return pod, cond
            return None

        pod, cond = wait_for("an Unschedulable condition", unschedulable, timeout=60)
        assert pod.status.phase == "Pending"
        assert pod.spec.node_name is None
        # The scheduler's reason is what the operator will report for GPU-to-CPU fallback.
        assert "node(s) didn't match Pod's node affinity/selector" in cond.message or "nodes are available" in (
            cond.message
        )


def test_hpa_v2_and_job_are_accepted(kube, namespace):
    hpa = yaml.safe_load("""
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: model}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: model}
  minReplicas: 2
  maxReplicas: 10
  metrics:
    - type: Resource
      resource: {name: cpu, target: {type: Utilization, averageUtilization: 70}}
  behavior:
    scaleUp: {stabilizationWindowSeconds: 0, policies: [{type: Percent, value: 100, periodSeconds: 15}]}
    scaleDown: {stabilizationWindowSeconds: 300}
""")
    created = client.AutoscalingV2Api(kube).create_namespaced_horizontal_pod_autoscaler(namespace, hpa)
    assert created.spec.min_replicas == 2
    assert created.spec.behavior.scale_down.stabilization_window_seconds == 300

    job = yaml.safe_load("""
apiVersion: batch/v1
kind: Job
metadata: {name: bench-m5-2xlarge}
spec:
  backoffLimit: 2
  ttlSecondsAfterFinished: 600
  template:
    spec:
      restartPolicy: Never
      nodeSelector: {node.kubernetes.io/instance-type: m5.2xlarge}
      containers: [{name: bench, image: leanserve/serving:test, args: [bench]}]
""")
    batch = client.BatchV1Api(kube)
    batch.create_namespaced_job(namespace, job)
    assert batch.read_namespaced_job("bench-m5-2xlarge", namespace).spec.ttl_seconds_after_finished == 600
    # The Job controller (controller-manager) creates its pod and kwok runs it on the m5 pool.
    pods = wait_for(
        "the Job's pod Running",
        lambda: [
            p
            for p in client.CoreV1Api(kube)
            .list_namespaced_pod(namespace, label_selector="job-name=bench-m5-2xlarge")
            .items
            if p.status.phase == "Running"
        ],
        timeout=60,
    )
    assert pods[0].spec.node_name.startswith("kwok-m5-2xlarge-")
