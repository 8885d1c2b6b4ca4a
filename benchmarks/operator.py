"""Operator benchmark: apply -> all objects, 200 InferenceDeployments reconciled, operator memory.

Runs the real operator (``leanserve operator``, kopf) as the chart's ServiceAccount
against the test control plane (started here when none is running: make
cluster-up reuses it), with stand-in profiles in the cache (kwok nodes cannot be
measured; see tests/stand_in_profiles.py). Targets from the issue: one apply to
all objects created under 2 s; 200 reconciled under 60 s; resident memory under 150 MB.

    .venv/bin/python benchmarks/operator.py [--count 200]

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kubernetes import client  # noqa: E402
from kubernetes import config as kube_config  # noqa: E402

from leanserve.api.resource import GROUP, PLURAL, VERSION  # noqa: E402
from leanserve.api.spec import ModelSpec  # noqa: E402
from leanserve.controller import profile_store  # noqa: E402
from tests.conftest import controlplane, install_crd  # noqa: E402
from tests.operator_harness import OperatorProcess, install_rbac, service_account_kubeconfig  # noqa: E402
from tests.stand_in_profiles import stand_in_profiles  # noqa: E402

MODEL = {"uri": "https://models.example.com/fraud.onnx", "evaluation": {"uri": "https://models.example.com/e.npz"}}
CANDIDATES = ["m5.2xlarge", "c6i.2xlarge", "g4dn.xlarge"]


def body(name: str, i: int) -> dict[str, Any]:
    """The i-th InferenceDeployment: targets from 50 to 140 ms, traffic growing with i."""
    sla = {"latency": {"targetMs": 50 + 10 * (i % 10)}}
    spec = {"model": MODEL, "sla": sla, "traffic": {"averageRps": 100 + 37 * i}, "candidates": CANDIDATES}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceDeployment", "metadata": {"name": name}, "spec": spec}


def reconciled(o: dict[str, Any]) -> bool:
    """Whether the operator wrote a status for generation 1 that has reached Deploying or Ready."""
    status = o.get("status") or {}
    return status.get("observedGeneration") == 1 and status.get("phase") in ("Deploying", "Ready")


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    plane = controlplane.ControlPlane()
    started = plane.up(gpu_pool=True)
    api = kube_config.new_client_from_config(str(plane.kubeconfig))
    install_crd(api, REPO / "crds" / "inferencedeployments.leanserve.dev.yaml")
    install_rbac(api, plane.build() / "helm")
    work = Path(tempfile.mkdtemp(prefix="leanserve-bench-operator-"))
    op = OperatorProcess(service_account_kubeconfig(api, plane.kubeconfig, work / "kubeconfig"), work / "operator.log")
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    for _ in range(180):  # an earlier run's namespace still being deleted would load the operator at start
        if not [n for n in core.list_namespace().items if n.metadata.name.startswith("bench-operator-")]:
            break
        time.sleep(1)
    ns = f"bench-operator-{int(time.time())}"
    core.create_namespace({"metadata": {"name": ns}})
    figures: dict[str, Any] = {"count": args.count}
    try:
        key = profile_store.model_key(ModelSpec.model_validate(MODEL))
        for profile in stand_in_profiles():
            profile_store.save(api, ns, key, profile)
        op.start()
        quiet_since, size = time.monotonic(), 0
        while time.monotonic() - quiet_since < 2:  # idle: done resuming whatever the cluster already holds
            if len(op.text()) != size:
                quiet_since, size = time.monotonic(), len(op.text())
            time.sleep(0.2)
        baseline_rss = rss_mb(op.proc.pid)[0]  # type: ignore[union-attr]

        # 1. One apply -> every object exists (and the status says Deploying or Ready).
        start = time.perf_counter()
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body("first", 0))
        selector = "leanserve.dev/inferencedeployment=first"
        while True:
            listers = (
                client.AppsV1Api(api).list_namespaced_deployment,
                core.list_namespaced_service,
                core.list_namespaced_config_map,
                client.AutoscalingV2Api(api).list_namespaced_horizontal_pod_autoscaler,
                client.PolicyV1Api(api).list_namespaced_pod_disruption_budget,
            )
            n = sum(len(lister(ns, label_selector=selector).items) for lister in listers)
            if n == 7:
                break
            time.sleep(0.02)
        figures["apply_to_all_objects_s"] = round(time.perf_counter() - start, 3)
        print(f"apply -> all 7 objects created: {figures['apply_to_all_objects_s']:.3f} s")

        # 2. N more, created as fast as the API takes them; done when each has a status for generation 1.
        start = time.perf_counter()
        for i in range(args.count):
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body(f"infd-{i:03d}", i))
        created_s = time.perf_counter() - start
        pending = args.count
        while pending:
            items = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
            done = [o for o in items if o["metadata"]["name"].startswith("infd-") and reconciled(o)]
            pending = args.count - len(done)
            if time.perf_counter() - start > 600:
                raise SystemExit(f"{pending} of {args.count} not reconciled after 600 s")
            time.sleep(0.5)
        figures["reconcile_all_s"] = round(time.perf_counter() - start, 2)
        figures["created_s"] = round(created_s, 2)
        figures["per_object_ms"] = round(figures["reconcile_all_s"] / args.count * 1000, 1)
        print(
            f"{args.count} InferenceDeployments: created in {created_s:.1f} s, all reconciled "
            f"(plan applied, status written) after {figures['reconcile_all_s']:.1f} s "
            f"({figures['per_object_ms']:.0f} ms each)"
        )
        time.sleep(10)  # the availability timer and Deployment events keep the operator busy a while
        current, peak = rss_mb(op.proc.pid)  # type: ignore[union-attr]
        figures.update(rss_start_mb=round(baseline_rss, 1), rss_mb=round(current, 1), rss_peak_mb=round(peak, 1))
        print(f"operator resident memory: {baseline_rss:.0f} MB at start, {current:.0f} MB now, {peak:.0f} MB peak")
        errors = op.text().count(" ERROR ")
        figures["operator_errors_logged"] = errors
        print(f"errors in the operator's log: {errors}")
        targets = {"apply_to_all_objects_s": 2.0, "reconcile_all_s": 60.0, "rss_peak_mb": 150.0}
        figures["targets_met"] = {k: figures[k] <= v for k, v in targets.items()}
        verdicts = (f"{k} <= {v}: {'met' if figures['targets_met'][k] else 'MISSED'}" for k, v in targets.items())
        print("targets: " + ", ".join(verdicts))
    finally:
        op.stop()
        core.delete_namespace(ns)
        if started:
            plane.down()
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
