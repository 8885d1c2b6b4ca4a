"""The plan's charts: the figures behind them (pure, no matplotlib) and the drawing (matplotlib, optional).

Two charts answer the two questions a reader of a plan asks. *Where did the money go?* The savings
waterfall: floating bars from the naive baseline down, one per lever, to the plan. *How close to the edge
does the plan run?* Predicted latency against load for the plan and its nearest rivals, with the SLA and
the rate each replica is planned to carry.

The figures (:func:`waterfall_bars`, :func:`leading_candidates`, :func:`latency_sweep`) are pure functions
of the plan, tested without matplotlib; the ``draw_*`` functions only lay them out. matplotlib is the
``report`` extra, imported by the drawing alone: an ``ImportError`` from a ``draw_*`` function means it
is not installed. Drawing goes through ``matplotlib.figure.Figure``, never ``pyplot``, so that a report
leaves no global backend or open figures behind in the process that wrote it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from leanserve.planner.latency import simulate
from leanserve.planner.plan import Candidate, PlanOptions, PlanResult, SavingsStep

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: The bar added when the plan's cost is not where the last lever left it (see :func:`waterfall_bars`).
JOINT_LEVER = "joint choice"
JOINT_WHY = (
    "the plan chooses type, precision and batching with every lever in play and within every constraint; "
    "the levers above were chosen one at a time"
)

_BLUE, _GREEN, _RED, _GREY, _NAVY = "#4c72b0", "#55a868", "#c44e52", "#8c8c8c", "#1f3b63"


@dataclass(frozen=True)
class WaterfallBar:
    """One bar of the savings waterfall: where it floats and what its step saved."""

    lever: str
    kind: Literal["baseline", "lever", "plan"]
    bottom: float
    """$ per 1M requests where the bar starts (0 for the baseline and the plan)."""
    top: float
    """$ per 1M requests where the bar ends; a lever's bar spans the costs before and after it."""
    cost: float
    """$ per 1M requests after this step (cumulative)."""
    saving: float
    """$ per 1M requests this step took off (negative: it added); the plan's is the whole cut from the baseline."""
    saving_pct: float
    """``saving`` in % of the baseline's cost."""
    description: str = ""

    @property
    def saved_nothing(self) -> bool:
        """Whether the step left the cost where it was (drawn as a thin bar labelled 0)."""
        return self.kind == "lever" and math.isclose(self.bottom, self.top, rel_tol=1e-9, abs_tol=1e-12)


def waterfall_bars(steps: Sequence[SavingsStep]) -> list[WaterfallBar]:
    """The savings waterfall as floating bars: the baseline from 0, each lever from the cost before it to the
    cost after it, and the plan from 0.

    Positional, not by name: the first step is the baseline, the last the plan, the ones between are levers,
    whatever the planner calls them (the list grows). The levers are applied one at a time, each fixing its
    choice before the next is considered, while the plan chooses everything at once among the candidates
    that meet every constraint; where that lands somewhere else than the last lever, a ``joint choice`` bar
    covers the difference, so that the lever bars join the baseline to the plan and their savings add up to
    the whole cut rather than leave an unexplained gap in the chart.
    """
    if not steps:
        return []
    baseline = steps[0].cost_per_million

    def pct(saving: float) -> float:
        return saving / baseline * 100.0 if baseline else 0.0

    bars = [WaterfallBar(steps[0].lever, "baseline", 0.0, baseline, baseline, 0.0, 0.0, steps[0].description)]
    if len(steps) == 1:
        return bars
    levers = list(steps[1:-1])
    plan = steps[-1]
    before = levers[-1].cost_per_million if levers else baseline
    if not math.isclose(before, plan.cost_per_million, rel_tol=1e-9, abs_tol=1e-12):
        levers.append(SavingsStep(JOINT_LEVER, plan.cost_per_million, JOINT_WHY))
    level = baseline
    for step in levers:
        cost = step.cost_per_million
        low, high = sorted((level, cost))
        bars.append(
            WaterfallBar(step.lever, "lever", low, high, cost, level - cost, pct(level - cost), step.description)
        )
        level = cost
    total = baseline - plan.cost_per_million
    bars.append(
        WaterfallBar(
            plan.lever, "plan", 0.0, plan.cost_per_million, plan.cost_per_million, total, pct(total), plan.description
        )
    )
    return bars


@dataclass(frozen=True)
class LoadSweep:
    """Predicted latency of one candidate's replica as its load rises (the figures of one curve)."""

    candidate: Candidate
    rates: tuple[float, ...]
    """Requests per second per replica, ascending; the candidate's capacity_rps is one of them."""
    latency_ms: tuple[float, ...]
    """Predicted latency (ms) at the SLA's percentile at each rate."""
    capacity_latency_ms: float
    """The latency predicted at capacity_rps (the planner's own latency_ms when simulated with its options)."""

    def misses_below_capacity(self, target_ms: float) -> list[tuple[float, float]]:
        """(rate, latency) where a load lighter than capacity_rps is predicted over ``target_ms``.

        The planner sizes a replica for the highest rate that meets the SLA, which is safe only if latency grows
        with load; batching with a long wait, or a service curve that is not monotone in batch size, can break
        that, and a replica spends most of the day below its peak rate.
        """
        cap = self.candidate.capacity_rps
        return [(r, lat) for r, lat in zip(self.rates, self.latency_ms, strict=True) if r < cap and lat > target_ms]


def leading_candidates(result: PlanResult, count: int = 4) -> list[Candidate]:
    """The winner and the next cheapest feasible candidates, at most ``count``, each a distinct instance type x
    variant x policy with a service curve: the ones a reader compares the plan against."""
    chosen: list[Candidate] = []
    seen: set[tuple[str, str, int, float]] = set()
    ranked = ([result.winner] if result.winner else []) + [c for c in result.candidates if c.feasible]
    for c in ranked:
        key = (c.instance_type, c.variant, c.policy.max_batch, c.policy.max_wait_ms)
        if c.curve is None or c.capacity_rps <= 0 or key in seen:
            continue
        seen.add(key)
        chosen.append(c)
        if len(chosen) == count:
            break
    return chosen


def latency_sweep(
    candidates: Sequence[Candidate],
    percentile: float,
    options: PlanOptions | None = None,
    points: int = 24,
    low: float = 0.05,
    beyond: float = 1.2,
) -> list[LoadSweep]:
    """Predicted latency at ``percentile`` for each candidate at ``points`` rates from ``low`` to ``beyond`` times
    its capacity_rps (and at capacity_rps itself), simulated as the planner simulates (same simulator, service
    curve, overhead, request count and random draws), so that each curve passes through the point the plan
    was sized at. All candidates and rates go through one vectorised simulation.

    Raises ValueError for a candidate without a service curve or capacity (a rejected one): it has no curve
    to draw.
    """
    options = options or PlanOptions()
    for i, c in enumerate(candidates):
        if c.curve is None or c.capacity_rps <= 0:
            raise ValueError(f"candidates[{i}] ({c.label()}): no service curve or capacity to sweep ({c.reason})")
    grids = [
        np.unique(np.append(np.linspace(low * c.capacity_rps, beyond * c.capacity_rps, points), c.capacity_rps))
        for c in candidates
    ]
    if not grids:
        return []
    curves, policies = [], []
    for c, grid in zip(candidates, grids, strict=True):
        curves += [c.curve] * len(grid)
        policies += [c.policy] * len(grid)
    latency, _ = simulate(curves, policies, np.concatenate(grids), percentile, options.overhead_ms, options.requests)
    sweeps, start = [], 0
    for c, grid in zip(candidates, grids, strict=True):
        lat = latency[start : start + len(grid)]
        start += len(grid)
        at_capacity = float(lat[int(np.flatnonzero(grid == c.capacity_rps)[0])])
        sweeps.append(LoadSweep(c, tuple(map(float, grid)), tuple(map(float, lat)), at_capacity))
    return sweeps


# ---- drawing (matplotlib) ----------------------------------------------------------------------------


def usd(x: float) -> str:
    """Dollars to three significant figures, at least to the cent, no trailing zeros beyond: costs per 1M run
    from fractions of a cent up."""
    a = abs(x)
    if a >= 100:
        text = f"{a:,.0f}"
    elif a == 0:
        text = "0"
    else:
        whole, _, cents = f"{a:.{max(2, 2 - math.floor(math.log10(a)))}f}".partition(".")
        text = f"{whole}.{cents.rstrip('0').ljust(2, '0')}"  # $0.05, not $0.0500
    return ("-" if x < 0 else "") + "$" + text


def percent(x: float) -> str:
    """A percentage to the unit, or to a tenth under 1 %."""
    return f"{x:.0f} %" if abs(x) >= 1 or x == 0 else f"{x:.1f} %"


def times_cheaper(baseline: float, plan: float) -> str:
    """The whole cut as a factor ("5.3x cheaper"), the way a reader repeats it."""
    if plan <= 0 or baseline <= 0:
        return "free" if plan <= 0 < baseline else ""
    factor = baseline / plan
    if math.isclose(factor, 1.0, rel_tol=1e-6):
        return "no cheaper"
    if factor < 1:
        return f"{1 / factor:.2g}x dearer"
    return f"{factor:.0f}x cheaper" if factor >= 10 else f"{factor:.2g}x cheaper"


def bar_label(bar: WaterfallBar) -> str:
    """What a bar says: the baseline its cost; a lever its change in $ and in % of the baseline (0 when it
    changed nothing); the plan its cost and the whole cut."""
    if bar.kind == "baseline":
        return usd(bar.cost)
    if bar.kind == "plan":
        factor = times_cheaper(bar.cost + bar.saving, bar.cost)
        return f"{usd(bar.cost)}\n{factor}, {percent(-bar.saving_pct)}" if factor else usd(bar.cost)
    if bar.saved_nothing:
        return "0"
    sign = "+" if bar.saving < 0 else ""
    return f"{sign}{usd(-bar.saving)}\n{sign}{percent(-bar.saving_pct)}"


@contextmanager
def _drawing(path: Path, width: float, height: float) -> Iterator[tuple[Figure, Axes]]:
    """A figure with one axes, saved to ``path`` as PNG on leaving; ImportError without matplotlib.

    matplotlib's object API, not pyplot (no global backend or open figures), and "$" is a dollar, not the
    start of mathtext: two prices in one label would otherwise turn into a formula.
    """
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    with rc_context({"text.parse_math": False}):
        fig = Figure(figsize=(width, height), layout="constrained")
        yield fig, fig.subplots()
        fig.savefig(path, dpi=110)


def draw_waterfall(bars: Sequence[WaterfallBar], path: Path, title: str = "Savings waterfall") -> Path:
    """The savings waterfall as a PNG: floating bars from the baseline down to the plan, each labelled."""
    with _drawing(path, max(7.0, 1.15 * len(bars) + 1.5), 4.8) as (_, ax):
        _draw_waterfall(ax, bars, title)
    return path


def _draw_waterfall(ax: Axes, bars: Sequence[WaterfallBar], title: str) -> None:
    ceiling = max((b.top for b in bars), default=1.0) or 1.0
    thin = ceiling * 0.004  # a lever that saved nothing still shows where it stood
    for x, b in enumerate(bars):
        if b.kind == "baseline":
            color = _BLUE
        elif b.kind == "plan":
            color = _NAVY
        elif b.saved_nothing:
            color = _GREY
        else:
            color = _GREEN if b.saving > 0 else _RED
        height = max(b.top - b.bottom, thin)
        bottom = b.bottom if b.top - b.bottom >= thin else b.bottom - thin / 2
        ax.bar(x, height, bottom=bottom, width=0.6, color=color, edgecolor=color, zorder=2)
        ax.annotate(
            bar_label(b),
            (x, bottom + height),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8.5,
            fontweight="bold" if b.kind == "plan" else "normal",
        )
        if x + 1 < len(bars) and bars[x + 1].kind == "lever":  # the connector: where the next lever starts
            level = b.cost
            ax.plot([x + 0.3, x + 0.7], [level, level], color=_GREY, lw=0.8, ls="--", zorder=1)
    ax.set_xticks(range(len(bars)), [b.lever for b in bars], fontsize=9)
    ax.set_xlim(-0.6, len(bars) - 0.4)
    ax.set_ylim(0, ceiling * 1.22)
    ax.set_ylabel("$ per 1M requests")
    ax.set_title(title)
    ax.grid(axis="y", color="#e5e5e5", zorder=0)
    ax.spines[["top", "right"]].set_visible(False)


def draw_latency_against_load(
    sweeps: Sequence[LoadSweep], percentile: float, target_ms: float, path: Path, winner: Candidate | None = None
) -> Path:
    """Predicted latency against load per replica as a PNG: one curve per candidate, its capacity point marked,
    the SLA as a horizontal line, the winner's planned operating point (``winner``, else the first sweep's)."""
    with _drawing(path, 9.0, 5.8) as (fig, ax):
        _draw_latency(fig, ax, sweeps, percentile, target_ms, winner)
    return path


def _draw_latency(
    fig: Figure, ax: Axes, sweeps: Sequence[LoadSweep], percentile: float, target_ms: float, winner: Candidate | None
) -> None:
    planned = winner or (sweeps[0].candidate if sweeps else None)
    colors = ["#dd8452", "#8172b3", "#937860", "#da8bc3", "#64b5cd", "#ccb974"]
    others = iter(colors * (1 + len(sweeps) // len(colors)))
    top = target_ms * 1.5
    for s in sweeps:
        c = s.candidate
        mine = c is planned
        color = _BLUE if mine else next(others)
        label = f"{c.label()}: {c.capacity_rps:,.0f} req/s, {usd(c.cost_per_million)}/1M" + (" (plan)" if mine else "")
        ax.plot(s.rates, s.latency_ms, color=color, lw=2.4 if mine else 1.3, label=label, zorder=3 if mine else 2)
        ax.plot([c.capacity_rps], [s.capacity_latency_ms], "o", color=color, ms=6, zorder=4)
        top = max(top, s.capacity_latency_ms * 1.2)
    ax.axhline(target_ms, color=_RED, ls="--", lw=1.2, label=f"SLA: p{percentile:g} < {target_ms:g} ms", zorder=1)
    if planned is not None:
        x, y = planned.capacity_rps, planned.latency_ms
        ax.plot([x], [y], "*", color=_NAVY, ms=15, zorder=5)
        ax.axvline(x, color=_NAVY, ls=":", lw=1.0, zorder=1)
        ax.annotate(
            f"planned: {x:,.0f} req/s per replica,\np{percentile:g} {y:.1f} ms",
            (x, y),
            xytext=(-14, -30),  # below and left: the curves run above the point, towards the SLA
            textcoords="offset points",
            ha="right",
            va="top",
            fontsize=9,
            color=_NAVY,
            bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": _NAVY, "lw": 0.6},
        )
    ax.set_xlim(0, max((s.rates[-1] for s in sweeps), default=1.0) * 1.02)
    ax.set_ylim(0, top)
    ax.set_xlabel("requests per second per replica")
    ax.set_ylabel(f"predicted p{percentile:g} latency (ms)")
    rivals = len(sweeps) - 1
    rest = {0: "", 1: " and the next cheapest candidate"}.get(rivals, f" and the next {rivals} cheapest candidates")
    ax.set_title("Latency against load: the plan" + rest)
    ax.grid(color="#e5e5e5", zorder=0)
    ax.spines[["top", "right"]].set_visible(False)
    ax.axhspan(target_ms, top, color=_RED, alpha=0.06, lw=0, zorder=0)  # where the SLA is missed
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)


def draw_candidates(candidates: Sequence[Candidate], path: Path) -> Path:
    """The cheapest feasible candidates' cost per 1M as horizontal bars (cheapest on top), as a PNG."""
    with _drawing(path, 9.0, max(3.0, 0.32 * len(candidates) + 1.2)) as (_, ax):
        _draw_candidates(ax, candidates)
    return path


def _draw_candidates(ax: Axes, candidates: Sequence[Candidate]) -> None:
    labels, costs = [c.label() for c in candidates][::-1], [c.cost_per_million for c in candidates][::-1]
    ax.barh(labels, costs, color=_GREEN)
    ax.set_xlabel("$ per 1M requests")
    ax.set_title("Cheapest feasible candidates")
    ax.tick_params(axis="y", labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)
