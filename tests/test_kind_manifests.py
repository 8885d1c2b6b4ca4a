"""The kind cluster's Prometheus (hack/kind/manifests/prometheus.yaml): the chart's scrape job, a pod
that fits the GPU-pool worker and the cluster's rules, and objects the API server accepts.

The image's Prometheus running this configuration as this manifest's ServiceAccount is in
tests/test_images.py (it needs the built image and containerd); the cluster itself runs it in tests/e2e.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from leanserve import __version__
from tests.conftest import REPO
from tests.operator_harness import render_chart

# The helm binary and the API server come from the control plane's build (as in tests/test_chart.py).
pytestmark = pytest.mark.cluster

MANIFEST = REPO / "hack" / "kind" / "manifests" / "prometheus.yaml"
#: What the e2e gives the operator (observer.prometheusUrl): the Service's name in its namespace.
PROMETHEUS_URL = "http://prometheus.monitoring.svc:9090"


def manifest_docs(path: Path = MANIFEST) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def prometheus_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(of_kind(docs, "ConfigMap")["data"]["prometheus.yml"])


def test_the_one_job_is_the_charts_scrape_job_every_5_seconds(helm):
    """The job is not a copy to keep in step by hand: the chart's own render, interval 5s, is it."""
    chart = render_chart(
        helm, "--set", "prometheusScrapeConfig.enabled=true", "--set", "prometheusScrapeConfig.interval=5s"
    )
    (configmap,) = [d for d in chart if d["kind"] == "ConfigMap" and "scrape-configs.yaml" in d.get("data", {})]
    (charts_job,) = yaml.safe_load(configmap["data"]["scrape-configs.yaml"])["scrape_configs"]
    config = prometheus_config(manifest_docs())
    assert config["scrape_configs"] == [charts_job]
    assert charts_job["scrape_interval"] == "5s" and charts_job["kubernetes_sd_configs"] == [{"role": "pod"}]
    assert config["global"]["scrape_interval"] == "5s"


def test_the_pod_runs_the_image_make_images_builds_non_root_on_the_gpu_pool_worker():
    docs = manifest_docs()
    namespace = of_kind(docs, "Namespace")["metadata"]["name"]
    assert namespace == "monitoring"
    assert {
        d["metadata"].get("namespace")
        for d in docs
        if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding")
    } == {namespace}
    deployment = of_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"ghcr.io/leanserve/prometheus:{__version__}"  # kind.py loads it (make images)
    assert container["imagePullPolicy"] == "IfNotPresent"
    # kind-config.yaml's GPU-pool worker: its label, and its taint tolerated (the CPU worker is the serving pods').
    kind_config = yaml.safe_load((REPO / "kind-config.yaml").read_text())
    (gpu_worker,) = [n for n in kind_config["nodes"] if n.get("labels", {}).get("leanserve.dev/pool") == "gpu"]
    assert pod["nodeSelector"] == {
        "node.kubernetes.io/instance-type": gpu_worker["labels"]["node.kubernetes.io/instance-type"]
    }
    (join,) = [yaml.safe_load(p) for p in gpu_worker["kubeadmConfigPatches"]]
    (taint,) = join["nodeRegistration"]["taints"]
    assert any(
        t["key"] == taint["key"] and t["effect"] == taint["effect"] and t["operator"] == "Exists"
        for t in pod["tolerations"]
    )
    # The cluster's rules for every pod: non-root (the image's 10001), read-only root, no capabilities.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}
    assert container["readinessProbe"]["httpGet"] == {"path": "/-/ready", "port": "http"}
    # The image's entrypoint reads /etc/prometheus/prometheus.yml and writes /prometheus: the ConfigMap
    # is that file, the TSDB an emptyDir.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/prometheus"]]["configMap"]["name"] == of_kind(docs, "ConfigMap")["metadata"]["name"]
    assert "prometheus.yml" in of_kind(docs, "ConfigMap")["data"]
    assert "emptyDir" in volumes[mounts["/prometheus"]]
    assert pod["serviceAccountName"] == of_kind(docs, "ServiceAccount")["metadata"]["name"]


def test_the_service_is_the_url_the_operator_is_given_and_selects_the_pod():
    docs = manifest_docs()
    service = of_kind(docs, "Service")
    (port,) = service["spec"]["ports"]
    assert (
        f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{port['port']}" == PROMETHEUS_URL
    )
    template = of_kind(docs, "Deployment")["spec"]["template"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    (container,) = template["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    assert {p["containerPort"] for p in container["ports"]} == {9090}  # the image's --web.listen-address=:9090


def test_the_service_account_may_read_pods_and_nothing_else():
    docs = manifest_docs()
    role, binding, account = (of_kind(docs, k) for k in ("ClusterRole", "ClusterRoleBinding", "ServiceAccount"))
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": account["metadata"]["namespace"]}
    ]


def test_the_api_server_accepts_every_object_of_the_manifest(kube, namespace):
    """Server-side dry run of each object (field names, types, defaults, admission), the namespaced ones
    in the test's namespace: `monitoring` is not created (a dry run of the Namespace checks it)."""
    from kubernetes import utils

    docs = manifest_docs()
    assert [d["kind"] for d in docs] == [
        "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "Service"
    ]  # fmt: skip
    for doc in docs:
        if "namespace" in doc["metadata"]:
            doc["metadata"]["namespace"] = namespace
        utils.create_from_dict(kube, doc, namespace=namespace, dry_run="All")  # raises with the API's reason
