"""Shared fixtures: repository paths and the shipped examples."""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))

sys.path.insert(0, str(REPO / "hack" / "controlplane"))
import controlplane  # noqa: E402  (hack/controlplane is not a package)

#: Filled by the control_plane fixture, printed in the terminal summary.
_CONTROL_PLANE_TIMINGS: dict[str, float] = {}


def load_example(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


#: The smallest valid InferenceDeployment: a model, a latency target, a traffic figure.
MINIMAL_DOC: dict[str, Any] = {
    "apiVersion": "leanserve.dev/v1alpha1",
    "kind": "InferenceDeployment",
    "metadata": {"name": "minimal"},
    "spec": {
        "model": {"uri": "file:///models/m.onnx"},
        "sla": {"latency": {"targetMs": 100}},
        "traffic": {"averageRps": 100},
    },
}


@pytest.fixture
def minimal_doc() -> dict[str, Any]:
    """A fresh copy of :data:`MINIMAL_DOC` that a test may change."""
    return copy.deepcopy(MINIMAL_DOC)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[controlplane.ControlPlane]:
    """A real control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok).

    Reuses one started by `make cluster-up`; otherwise builds (cached) and starts
    one, and stops it at the end of the session. A missing Go toolchain or a
    failed build fails the tests that need it, with the reason; nothing is skipped.
    """
    plane = controlplane.ControlPlane()
    start = time.monotonic()
    try:
        started = plane.up(gpu_pool=True)
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"could not start the test control plane: {exc}", pytrace=False)
    _CONTROL_PLANE_TIMINGS.update(plane.timings, total_s=round(time.monotonic() - start, 1))
    yield plane
    if started and not os.environ.get("LEANSERVE_KEEP_CLUSTER"):
        plane.down()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _CONTROL_PLANE_TIMINGS:
        figures = ", ".join(f"{k}={v}" for k, v in _CONTROL_PLANE_TIMINGS.items())
        terminalreporter.write_line(f"control plane: {figures}")


def install_crd(api: Any, path: Path, timeout: float = 30) -> dict[str, Any]:
    """Create or update the CRD from its YAML file and wait until it is Established."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    body = yaml.safe_load(path.read_text())
    ext = client.ApiextensionsV1Api(api)
    name = body["metadata"]["name"]
    try:
        ext.create_custom_resource_definition(body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        current = ext.read_custom_resource_definition(name)
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        ext.replace_custom_resource_definition(name, body)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        crd = ext.read_custom_resource_definition(name)
        conditions = {c.type: c.status for c in (crd.status.conditions or [])}
        if conditions.get("Established") == "True":
            return api.sanitize_for_serialization(crd)
        time.sleep(0.2)
    raise AssertionError(f"CRD {name} not Established within {timeout} s: {conditions}")


@pytest.fixture(scope="session")
def kube(control_plane: controlplane.ControlPlane) -> Any:
    """A kubernetes ApiClient for the test control plane, with the generated CRD installed."""
    from kubernetes import config

    api = config.new_client_from_config(str(control_plane.kubeconfig))
    install_crd(api, REPO / "crds" / "inferencedeployments.leanserve.dev.yaml")
    return api


@pytest.fixture
def namespace(kube: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards."""
    from kubernetes import client

    core = client.CoreV1Api(kube)
    name = f"t-{abs(hash(request.node.nodeid)) % 10**8}-{int(time.time() * 1000) % 10**6}"
    core.create_namespace({"metadata": {"name": name, "labels": {"leanserve.dev/test": "true"}}})
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="module")
def helm() -> Path:
    """The helm binary built with the control plane."""
    return controlplane.ControlPlane().build() / "helm"


@pytest.fixture(scope="module")
def operator(
    kube: Any, control_plane: controlplane.ControlPlane, helm: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """The real operator (``leanserve operator``) in a subprocess, authenticated as the chart's ServiceAccount."""
    from tests.operator_harness import OperatorProcess, install_rbac, service_account_kubeconfig

    install_rbac(kube, helm)
    work = tmp_path_factory.mktemp("operator")
    proc = OperatorProcess(
        service_account_kubeconfig(kube, control_plane.kubeconfig, work / "kubeconfig"), work / "operator.log"
    )
    proc.start()
    yield proc
    proc.stop()
    print(proc.text()[-3000:])


@pytest.fixture
def started() -> Iterator[list[Any]]:
    """Processes a test starts (``tests.serving_harness.Process``); all killed afterwards, whatever failed."""
    procs: list[Any] = []
    yield procs
    for p in procs:
        p.stop(kill=True)


# The serving tests' processes, one set per module: each module gives its own ``workdir`` and ``models``.
@pytest.fixture(scope="module")
def servers(models: dict[str, Path], workdir: Path) -> Iterator[dict[str, Any]]:
    """A model server (``tests.serving_harness.Process``) per model of the module, stopped after it."""
    from tests.serving_harness import model_server

    procs = {name: model_server(path, name, workdir).start() for name, path in models.items()}
    yield procs
    for p in procs.values():
        p.stop()


@pytest.fixture(scope="module")
def redis(workdir: Path) -> Iterator[Any]:
    """A redis-server of the module's own, on a free loopback port."""
    from tests.serving_harness import start_redis

    proc = start_redis(workdir)
    yield proc
    proc.stop()
