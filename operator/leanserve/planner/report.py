"""The plan as files a person reads: a Markdown report, and PNG charts when matplotlib is installed."""

from __future__ import annotations

from pathlib import Path

from leanserve.api.spec import InferenceDeploymentSpec
from leanserve.planner.plan import PlanResult


def _row(*cells: object) -> str:
    """One row of a Markdown table."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write_report(result: PlanResult, spec: InferenceDeploymentSpec, out_dir: Path) -> list[Path]:
    """Write report.md (and waterfall.png, candidates.png with matplotlib); return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.md"]
    sla, traffic = spec.sla.latency, spec.traffic
    scenario = (
        f"SLA: p{sla.percentile:g} < {sla.target_ms:g} ms; accuracy drop <= {spec.sla.max_accuracy_drop:g}; "
        f"traffic {traffic.average_rps:g} req/s average, {traffic.effective_peak_rps():g} peak; "
        f"cache hit rate {result.hit_rate:.0%}."
    )
    lines = ["# leanserve plan", "", scenario, ""]
    if result.winner is None:
        lines += [f"**{result.infeasible}**", ""]
    else:
        w = result.winner
        plan = (
            f"**Plan: {w.label()}**, {w.capacity_rps:.0f} req/s per replica, predicted p{sla.percentile:g} "
            f"{w.latency_ms:.1f} ms, replicas {min(w.replicas_hourly)}..{w.replicas_peak}, "
            f"${w.cost_per_million:.4f} per 1M requests, ${w.monthly_cost:.0f} per month."
        )
        lines += [plan, "", "## Savings waterfall", "", _row("lever", "$/1M", "what"), "|---|---:|---|"]
        lines += [_row(s.lever, f"{s.cost_per_million:.4f}", s.description) for s in result.waterfall]
        lines.append("")
    columns = ("#", "instance", "precision", "batching", "predicted latency ms", "req/s per replica", "$/1M", "why not")
    lines += ["## Candidates", "", _row(*columns), "|---:|---|---|---|---:|---:|---:|---|"]
    for i, c in enumerate(result.candidates, 1):
        batching = "off" if c.policy.max_batch == 1 else f"{c.policy.max_batch} / {c.policy.max_wait_ms:g} ms"
        figures = (f"{c.latency_ms:.1f}", f"{c.capacity_rps:.0f}", f"{c.cost_per_million:.4f}")
        lines.append(_row(i, c.instance_type, c.variant, batching, *figures, c.reason))
    written[0].write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written

    def chart(name: str, title: str, labels: list[str], costs: list[float], horizontal: bool, color: str) -> None:
        fig, ax = plt.subplots(figsize=(8, 4))
        if horizontal:
            ax.barh(labels[::-1], costs[::-1], color=color)
            ax.set_xlabel("USD per 1M requests")
        else:
            ax.bar(labels, costs, color=color)
            ax.set_ylabel("USD per 1M requests")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(out_dir / name)

    if result.waterfall:
        levers, costs = [s.lever for s in result.waterfall], [s.cost_per_million for s in result.waterfall]
        chart("waterfall.png", "Savings waterfall", levers, costs, horizontal=False, color="#4c72b0")
    feasible = [c for c in result.candidates if c.feasible][:12]
    if feasible:
        labels, costs = [c.label() for c in feasible], [c.cost_per_million for c in feasible]
        chart("candidates.png", "Cheapest feasible candidates", labels, costs, horizontal=True, color="#55a868")
    return written
