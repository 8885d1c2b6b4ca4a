"""The plan as files a person reads: a Markdown report, and PNG charts when matplotlib is installed.

The charts (:mod:`leanserve.planner.charts`) are drawn first, so that report.md references only the ones
that exist; without matplotlib (the ``report`` extra) the report is the Markdown alone and says how to get
the charts.
"""

from __future__ import annotations

from pathlib import Path

from leanserve.api.spec import InferenceDeploymentSpec
from leanserve.planner.charts import (
    WaterfallBar,
    draw_candidates,
    draw_latency_against_load,
    draw_waterfall,
    latency_sweep,
    leading_candidates,
    percent,
    times_cheaper,
    usd,
    waterfall_bars,
)
from leanserve.planner.plan import PlanOptions, PlanResult

#: What report.md says when matplotlib is missing.
CHARTS_NEED = "Charts need matplotlib: `pip install leanserve[report]`."


def _row(*cells: object) -> str:
    """One row of a Markdown table."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _saving(bar: WaterfallBar) -> str:
    """The waterfall table's saving cell: what the step took off, in $ and in % of the baseline."""
    if bar.kind == "baseline":
        return ""
    if bar.kind == "plan":
        factor = times_cheaper(bar.cost + bar.saving, bar.cost)
        return f"{usd(bar.saving)} ({percent(bar.saving_pct)}) in all" + (f", {factor}" if factor else "")
    return "0" if bar.saved_nothing else f"{usd(bar.saving)} ({percent(bar.saving_pct)})"


def _image(name: str, alt: str, caption: str) -> list[str]:
    """A chart in Markdown: the image and its caption under it."""
    return [f"![{alt}]({name})", "", f"*{caption}*", ""]


def write_report(
    result: PlanResult, spec: InferenceDeploymentSpec, out_dir: Path, options: PlanOptions | None = None
) -> list[Path]:
    """Write report.md and, with matplotlib, waterfall.png, latency.png and candidates.png; return the paths
    written (report.md first).

    ``options`` are the ones the plan was made with: the latency chart simulates with their overhead and
    request count so that its curves pass through the planned points (``PlanOptions()`` when not given).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    sla, traffic = spec.sla.latency, spec.traffic
    bars = waterfall_bars(result.waterfall) if result.winner is not None else []
    leaders = leading_candidates(result)
    feasible = [c for c in result.candidates if c.feasible][:12]
    sweeps = latency_sweep(leaders, sla.percentile, options)
    charts: dict[str, Path] = {}
    try:
        if bars:
            title = f"Savings waterfall: {usd(bars[0].cost)} to {usd(bars[-1].cost)} per 1M requests"
            charts["waterfall"] = draw_waterfall(bars, out_dir / "waterfall.png", title)
        if sweeps:
            charts["latency"] = draw_latency_against_load(
                sweeps, sla.percentile, sla.target_ms, out_dir / "latency.png", result.winner
            )
        if feasible:
            charts["candidates"] = draw_candidates(feasible, out_dir / "candidates.png")
        drawn = True
    except ImportError:  # matplotlib is the optional `report` extra
        drawn = False

    scenario = (
        f"SLA: p{sla.percentile:g} < {sla.target_ms:g} ms; accuracy drop <= {spec.sla.max_accuracy_drop:g}; "
        f"traffic {traffic.average_rps:g} req/s average, {traffic.effective_peak_rps():g} peak; "
        f"cache hit rate {result.hit_rate:.0%}."
    )
    lines = ["# leanserve plan", "", scenario, ""]
    if not drawn:
        lines += [f"_{CHARTS_NEED}_", ""]
    if result.winner is None:
        lines += [f"**{result.infeasible}**", ""]
    else:
        w = result.winner
        plan = (
            f"**Plan: {w.label()}**, {w.capacity_rps:.0f} req/s per replica, predicted p{sla.percentile:g} "
            f"{w.latency_ms:.1f} ms, replicas {min(w.replicas_hourly)}..{w.replicas_peak}, "
            f"${w.cost_per_million:.4f} per 1M requests, ${w.monthly_cost:.0f} per month."
        )
        lines += [plan, ""]
        misses = sweeps[0].misses_below_capacity(sla.target_ms) if sweeps and sweeps[0].candidate is w else []
        if misses:
            rate, worst = max(misses, key=lambda m: m[1])
            lines += [
                f"**Warning:** below its planned rate the plan is predicted to miss the SLA: p{sla.percentile:g} "
                f"{worst:.1f} ms at {rate:.0f} req/s per replica (at {len(misses)} of the rates swept below "
                f"{w.capacity_rps:.0f}). The planner assumes latency grows with load; here it does not.",
                "",
            ]
        lines += ["## Savings waterfall", ""]
        lines += [_row("lever", "$/1M", "saving", "what"), "|---|---:|---:|---|"]
        lines += [_row(b.lever, f"{b.cost:.4f}", _saving(b), b.description) for b in bars]
        lines.append("")
        if "waterfall" in charts:
            lines += _image(
                "waterfall.png",
                "Savings waterfall",
                "Cost per 1M requests from the naive baseline to the plan. Each floating bar is what one lever "
                "took off (green) or added (red), in $ per 1M and in % of the baseline; a grey 0 is a lever "
                "that changed nothing. The last bar is the plan, with the whole cut.",
            )
        if "latency" in charts:
            lines += ["## Latency against load", ""]
            lines += _image(
                "latency.png",
                "Predicted latency against load per replica",
                f"Predicted p{sla.percentile:g} latency of one replica as its load rises, for the plan and the "
                f"next cheapest feasible candidates (the planner's simulator, up to 1.2x each one's capacity). "
                f"Dashed: the SLA ({sla.target_ms:g} ms). Dots: the rate each candidate would be sized to carry; "
                f"star: the plan's operating point ({w.capacity_rps:.0f} req/s, {w.latency_ms:.1f} ms).",
            )
    columns = ("#", "instance", "precision", "batching", "predicted latency ms", "req/s per replica", "$/1M", "why not")
    lines += ["## Candidates", "", _row(*columns), "|---:|---|---|---|---:|---:|---:|---|"]
    for i, c in enumerate(result.candidates, 1):
        batching = "off" if c.policy.max_batch == 1 else f"{c.policy.max_batch} / {c.policy.max_wait_ms:g} ms"
        figures = (f"{c.latency_ms:.1f}", f"{c.capacity_rps:.0f}", f"{c.cost_per_million:.4f}")
        lines.append(_row(i, c.instance_type, c.variant, batching, *figures, c.reason))
    lines.append("")
    if "candidates" in charts:
        lines += _image(
            "candidates.png",
            "Cheapest feasible candidates",
            f"Cost per 1M requests of the {len(feasible)} cheapest candidates that meet every constraint.",
        )
    report = out_dir / "report.md"
    report.write_text("\n".join(lines).rstrip("\n") + "\n")
    return [report, *charts.values()]
