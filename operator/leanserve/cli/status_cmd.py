"""``leanserve status NAME``: predicted against observed for one InferenceDeployment, with the error.

What ``kubectl get infd`` shows in two columns, laid out whole: the plan in place, what Prometheus
observed over the last window, the error of each prediction, the conditions, and the re-plan (if
drift made one). The table is computed from the object's status by a pure function
(``comparison_rows``); the command only reads the object.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from leanserve.api.resource import GROUP, PLURAL, VERSION


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="predicted against observed cost and latency of an InferenceDeployment")
    p.add_argument("name", help="the InferenceDeployment")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(func=run)


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "-"
    if unit == "$":
        return f"${value:.4f}"
    if unit == "%":
        return f"{value:+.1%}"
    return f"{value:.{digits}f}{unit}"


def comparison_rows(status: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, predicted, observed, error) rows from an InferenceDeployment's status."""
    plan = status.get("plan") or {}
    observed = status.get("observed") or {}
    predicted = observed.get("predicted") or {}
    error = observed.get("error") or {}
    return [
        (
            "latency at the SLA percentile",
            _fmt(predicted.get("latencyMs", plan.get("predictedLatencyMs")), " ms"),
            _fmt(observed.get("latencyMs"), " ms"),
            _fmt(error.get("latency"), "%"),
        ),
        (
            "cost per 1M requests",
            _fmt(predicted.get("costPerMillionRequests", plan.get("costPerMillionRequests")), "$"),
            _fmt(observed.get("costPerMillionRequests"), "$"),
            _fmt(error.get("costPerMillion"), "%"),
        ),
        (
            "capacity per replica (req/s, when saturated)",
            _fmt(predicted.get("capacityRpsPerReplica", plan.get("capacityRpsPerReplica"))),
            _fmt(observed.get("capacityRpsPerReplica")),
            _fmt(error.get("capacity"), "%"),
        ),
        ("request rate (req/s)", "-", _fmt(observed.get("rps")), ""),
        (
            "replicas",
            _fmt((plan.get("replicas") or {}).get("average"), "", 2),
            _fmt(observed.get("replicas"), "", 2),
            "",
        ),
        ("cache hit rate", "-", _fmt(observed.get("cacheHitRate"), "", 3), ""),
        ("mean batch", _fmt(plan.get("maxBatchSize"), " max", 0), _fmt(observed.get("meanBatch"), "", 2), ""),
    ]


def render(obj: dict[str, Any]) -> str:
    """The whole report: plan, the comparison table, conditions, the re-plan in place."""
    meta, status = obj["metadata"], obj.get("status") or {}
    plan = status.get("plan") or {}
    observed = status.get("observed") or {}
    lines = [f"{meta['namespace']}/{meta['name']}: {status.get('phase', 'no status yet')}"]
    if plan:
        batching = (
            f"batch<={plan['maxBatchSize']}/{plan.get('maxWaitMs', 0):g}ms"
            if plan.get("maxBatchSize")
            else "no batching"
        )
        lines.append(f"plan: {plan.get('instanceType')} {plan.get('precision')} {batching}")
    if observed.get("updatedAt"):
        lines.append(f"observed: {observed.get('windowSeconds')} s window to {observed['updatedAt']}")
    rows = [("", "predicted", "observed", "error"), *comparison_rows(status)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for cond in status.get("conditions") or []:
        lines.append(f"{cond['type']}={cond['status']} {cond.get('reason', '')}: {cond.get('message', '')}")
    replan = observed.get("replan")
    if replan:
        lines.append(f"re-planned at {replan.get('at')}: {replan.get('reason')}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    try:
        api = config.new_client_from_config(args.kubeconfig) if args.kubeconfig else config.new_client_from_config()
        obj = client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, args.namespace, PLURAL, args.name
        )
    except ApiException as exc:
        print(f"error: {args.namespace}/{args.name}: {exc.reason} ({exc.status})", file=sys.stderr)
        return 1
    except config.ConfigException as exc:
        print(f"error: no cluster to ask: {exc}", file=sys.stderr)
        return 1
    if args.json:
        status = obj.get("status") or {}
        rows = [
            dict(zip(("figure", "predicted", "observed", "error"), r, strict=True)) for r in comparison_rows(status)
        ]
        print(json.dumps({"name": args.name, "namespace": args.namespace, "phase": status.get("phase"), "rows": rows}))
    else:
        print(render(obj))
    return 0
