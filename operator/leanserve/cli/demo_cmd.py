"""``leanserve demo``: the main job on an embedded default, no cluster needed.

Validates the shipped examples, then runs the whole pipeline on this machine:
build the reference text classifier, profile it (leanserve bench), plan the
campaign scenario, start the planned serving stack, load it at the planned rate
and compare predicted with measured figures. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from leanserve.api.resource import InferenceDeployment
from leanserve.api.validation import validate_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job locally on the shipped examples")
    p.add_argument("--examples", type=Path, default=Path("examples"), help="folder of InferenceDeployment YAML")
    p.add_argument("--work", type=Path, default=Path(".cache/demo"), help="where models, profiles and the report go")
    p.add_argument("--load-seconds", type=float, default=15.0)
    p.set_defaults(func=run)


def _row(d: InferenceDeployment) -> list[str]:
    s = d.spec
    latency = s.sla.latency
    budget = s.budget
    limits = [
        f"${budget.max_cost_per_million_requests:g}/1M" if budget.max_cost_per_million_requests else "",
        f"${budget.max_monthly_cost:g}/mo" if budget.max_monthly_cost else "",
    ]
    caches = [k for k, on in (("exact", s.cache.exact.enabled), ("semantic", s.cache.semantic.enabled)) if on]
    return [
        d.metadata.name,
        f"{s.model.format} {s.model.uri.split('://', 1)[0]}://",
        f"p{latency.percentile:g} < {latency.target_ms:g} ms",
        f"{s.sla.max_accuracy_drop:.1%}",
        f"{s.traffic.average_rps:g} / {s.traffic.effective_peak_rps():g}",
        " ".join(x for x in limits if x) or "-",
        ", ".join(s.candidates) or "(price table)",
        s.precision,
        ", ".join(caches) or "off",
        str(s.autoscaling.warm_pool),
    ]


def run(args: argparse.Namespace) -> int:
    from rich.table import Table  # the tables need the operator extra; --version and validate do not

    from leanserve.cli.console import wide_console

    console = wide_console()
    files = sorted(args.examples.glob("*.yaml"))
    if not files:
        console.print(f"[red]no examples found in {args.examples}[/red] (run from the repository root)")
        return 1
    console.print(f"validating {len(files)} example(s) in {args.examples}/ against the InferenceDeployment API")
    table = Table(title="InferenceDeployments (the planner issue turns these into plans)")
    for col in (
        "name",
        "model",
        "SLA",
        "max acc. drop",
        "avg / peak rps",
        "budget",
        "candidates",
        "precision",
        "cache",
        "warm pool",
    ):
        table.add_column(col)
    invalid = 0
    for path in files:
        for result in validate_file(path):
            if result.resource is not None:
                table.add_row(*_row(result.resource))
            elif not result.skipped:
                invalid += 1
                for err in result.errors:
                    console.print(f"[red]{result.source}: {err.format()}[/red]")
    console.print(table)
    if invalid:
        console.print(f"[red]{invalid} example(s) invalid[/red]")
        return 1
    from leanserve.demo import run_demo

    figures = run_demo(args.work, lambda line: console.print(line, highlight=False, markup=False), args.load_seconds)
    print(json.dumps({"examples_valid": len(files), **figures}))
    return 0
