"""``leanserve plan -f infd.yaml --profiles DIR``: the cheapest configuration that meets the SLA, explained."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from leanserve.api.validation import validate_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="plan a deployment from measured profiles and a price table")
    p.add_argument("-f", "--file", type=Path, required=True, help="an InferenceDeployment YAML file")
    p.add_argument("--profiles", type=Path, required=True, help="folder of profile JSON files (leanserve bench --out)")
    p.add_argument("--prices", type=Path, help="price table YAML (default: the shipped one)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.add_argument("--report", type=Path, help="write a Markdown report (and PNG charts) into this folder")
    p.add_argument("--overhead-ms", type=float, default=1.0, help="per-request time outside the model")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.table import Table  # the tables need the operator extra; --version and validate do not

    from leanserve.cli.console import wide_console
    from leanserve.planner.plan import PlanOptions, plan_deployment
    from leanserve.planner.prices import load_prices
    from leanserve.planner.report import write_report
    from leanserve.planner.status import candidate_rows, plan_status, savings_rows
    from leanserve_serving.profile import Profile  # the bench's output, the planner's input: their contract

    console = wide_console()
    [doc] = validate_file(args.file)[:1]
    if doc.resource is None:
        for e in doc.errors:
            console.print(f"[red]{args.file}: {e.format()}[/red]")
        return 2
    files = sorted(args.profiles.glob("*.json"))
    if not files:
        console.print(f"[red]no profiles (*.json) in {args.profiles}[/red]: run leanserve bench --out first")
        return 2
    profiles = [Profile.model_validate_json(f.read_text()) for f in files]
    spec = doc.resource.spec
    options = PlanOptions(overhead_ms=args.overhead_ms)
    result = plan_deployment(spec, profiles, load_prices(args.prices), options)
    status = {
        "plan": (p.to_api() if (p := plan_status(result)) else None),
        "candidates": [r.to_api() for r in candidate_rows(result)],
        "savings": [s.to_api() for s in savings_rows(result)],
        "infeasible": result.infeasible or None,
    }
    if args.report:
        for path in write_report(result, spec, args.report, options):
            console.print(f"report: {path}")
    if args.output == "json":
        print(json.dumps(status))
        return 0 if result.winner else 1
    percentile = f"p{spec.sla.latency.percentile:g}"
    sla = f"{percentile} < {spec.sla.latency.target_ms:g} ms, accuracy drop <= {spec.sla.max_accuracy_drop:g}"
    table = Table(title=f"{doc.resource.metadata.name}: candidates ({sla})")
    for col in (
        "#",
        "instance",
        "precision",
        "batching",
        f"{percentile} ms",
        "req/s/replica",
        "pod (per node)",
        "replicas avg/peak (nodes)",
        "$/1M",
        "$/month",
        "why not",
    ):
        table.add_column(col)
    for i, c in enumerate(result.candidates[:25], 1):
        batching = "off" if c.policy.max_batch == 1 else f"{c.policy.max_batch}/{c.policy.max_wait_ms:g}ms"
        replicas = f"{c.replicas_average:.1f}/{c.replicas_peak} ({c.nodes_peak})" if c.replicas_hourly else "-"
        pod = f"{c.pod.millicpu / 1000:g} vCPU {c.pod.memory_mib}Mi ({c.replicas_per_node})" if c.pod else "-"
        why_not = (c.reason or "[green]winner[/green]") if i == 1 and c.feasible else c.reason
        row = [
            str(i),
            c.instance_type,
            c.variant,
            batching,
            f"{c.latency_ms:.1f}",
            f"{c.capacity_rps:.0f}",
            pod,
            replicas,
        ]
        table.add_row(*row, f"{c.cost_per_million:.3f}", f"{c.monthly_cost:.0f}", why_not)
    console.print(table)
    if result.winner is None:
        console.print(f"[red]{result.infeasible}[/red]")
    else:
        waterfall = Table(title="savings waterfall (cost per 1M requests)")
        for col in ("lever", "$/1M", "vs baseline", "what"):
            waterfall.add_column(col)
        base = result.waterfall[0].cost_per_million
        for step in result.waterfall:
            cost = step.cost_per_million
            waterfall.add_row(step.lever, f"{cost:.4f}", f"{cost / base:.0%}", step.description)
        console.print(waterfall)
    print(json.dumps({"plan": status["plan"], "infeasible": status["infeasible"], "waterfall": status["savings"]}))
    return 0 if result.winner else 1
