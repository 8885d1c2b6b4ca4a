"""Observation through reconcile, for real: the API server, a real Prometheus scraping a real sidecar.

The InferenceDeployment ``shop/plain`` is planned on the test API server (stand-in profiles, no
kubelet); the sidecar Prometheus scrapes as ``shop/plain`` is tests/test_observer.py's real local
stack. Reconcile reads Prometheus when a reading is due, writes status.observed, and when Prometheus
stops says Observed=False and touches nothing else; when it is back, the figures come back.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from leanserve.api.resource import GROUP, PLURAL, VERSION
from leanserve.api.spec import ModelSpec
from leanserve.controller import profile_store
from leanserve.controller.config import OperatorConfig
from leanserve.controller.reconcile import reconcile
from leanserve.loadgen import load_test
from tests.serving_harness import mlp_request
from tests.stand_in_profiles import stand_in_profiles
from tests.test_observer import NAMESPACE, PLAIN, Stack, rows, stack, wait_for_scrape
from tests.test_operator import SPEC, condition, owned, versions

pytestmark = pytest.mark.cluster

__all__ = ["stack"]  # the fixture, used by name

INTERVAL_S = 10


@pytest.fixture
def shop(kube: Any) -> Any:
    """The namespace the observer's stack labels its series with, holding the stand-in profiles."""
    core = client.CoreV1Api(kube)
    try:
        core.create_namespace({"metadata": {"name": NAMESPACE, "labels": {"leanserve.dev/test": "true"}}})
    except ApiException as exc:
        if exc.status != 409:
            raise
    key = profile_store.model_key(ModelSpec.model_validate(SPEC["model"]))
    for profile in stand_in_profiles():
        profile_store.save(kube, NAMESPACE, key, profile)
    yield kube
    core.delete_namespace(NAMESPACE)


def custom(kube: Any) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube)


def read(kube: Any) -> dict[str, Any]:
    return custom(kube).get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, PLAIN)


def reconcile_when_due(kube: Any, config: OperatorConfig) -> dict[str, Any]:
    """Wait until a reading is due (spec.observe.intervalSeconds after the last), reconcile, read back."""
    last = ((read(kube).get("status") or {}).get("observed") or {}).get("updatedAt")
    if last:
        time.sleep(INTERVAL_S + 1)
    reconcile(kube, read(kube), config)
    return read(kube)


def test_reconcile_observes_then_says_prometheus_is_down_and_recovers(shop: Any, stack: Stack, tmp_path: Any) -> None:
    kube = shop
    spec = copy.deepcopy(SPEC) | {"observe": {"intervalSeconds": INTERVAL_S, "minRequests": 10, "windowSeconds": 120}}
    doc = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceDeployment", "metadata": {"name": PLAIN}, "spec": spec}
    custom(kube).create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, doc)
    config = OperatorConfig(prometheus_url=stack.prometheus.url)
    first = reconcile(kube, read(kube), config)
    assert first.status["plan"] and "observed" not in first.status  # nothing deployed before this pass

    body = tmp_path / "request.json"
    body.write_text(json.dumps(mlp_request(rows(1, seed=11)[0])))
    load_test(stack.infer_url(PLAIN), body, 200, 2, cpus=stack.client_cpus)
    wait_for_scrape(stack.prometheus, PLAIN, after=time.time())

    seen = reconcile_when_due(kube, config)
    observed = seen["status"]["observed"]
    assert condition(seen, "Observed")["status"] == "True", condition(seen, "Observed")
    assert observed["requests"] >= 200 and observed["p95Ms"] > 0 and observed["costPerMillionRequests"] > 0
    assert observed["predicted"]["costPerMillionRequests"] == seen["status"]["plan"]["costPerMillionRequests"]
    print(f"\nobserved: {json.dumps(observed)}")
    plan, before = seen["status"]["plan"], versions(owned(kube, NAMESPACE, PLAIN))

    stack.prometheus.stop()
    try:
        down = reconcile_when_due(kube, config)
    finally:
        stack.prometheus.start()
    cond = condition(down, "Observed")
    assert cond["status"] == "False" and cond["reason"] == "PrometheusUnavailable", cond
    assert "Connection refused" in cond["message"]
    assert down["status"]["plan"] == plan and down["status"]["observed"] == observed  # the last figures stay
    assert versions(owned(kube, NAMESPACE, PLAIN)) == before  # the deployment untouched

    back = reconcile_when_due(kube, config)
    assert condition(back, "Observed")["status"] == "True"
    assert back["status"]["observed"]["updatedAt"] > observed["updatedAt"]
