"""The plan report: the waterfall's floating bars, the latency-against-load sweep, and report.md with its PNG
charts written from a real plan over the committed CPU profiles (tests/fixtures/profiles/*-local.json)."""

from __future__ import annotations

import struct
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from leanserve.api.spec import InferenceDeploymentSpec
from leanserve.planner.charts import (
    JOINT_LEVER,
    bar_label,
    latency_sweep,
    leading_candidates,
    waterfall_bars,
)
from leanserve.planner.plan import PlanOptions, PlanResult, SavingsStep, plan_deployment
from leanserve.planner.prices import load_prices
from leanserve.planner.report import CHARTS_NEED, write_report
from leanserve_serving.profile import Profile

FIXTURES = Path(__file__).parent / "fixtures" / "profiles"
FAST = PlanOptions(requests=1500)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: (fixture, SLA target ms, average req/s, peak req/s, cache hit rate): scenarios where every lever matters
#: (tabular, at a traffic that needs several replicas) and where some save nothing (text, one replica).
SCENARIOS = {
    "tabular": ("tabular-local.json", 25.0, 20000, 60000, 0.2),
    "text": ("text-local.json", 100.0, 200, 600, 0.1),
}


def fixture_spec(target_ms: float, average: float, peak: float, hit: float, **budget: float) -> InferenceDeploymentSpec:
    return InferenceDeploymentSpec.model_validate(
        {
            "model": {"uri": "file:///m.onnx", "evaluation": {"uri": "file:///e.npz"}},
            "sla": {"latency": {"percentile": 95, "targetMs": target_ms}, "maxAccuracyDrop": 0.02},
            "traffic": {"averageRps": average, "peakRps": peak},
            "candidates": ["local"],
            "cache": {"exact": {"expectedHitRate": hit}},
            "budget": budget,
        }
    )


def fixture_plan(name: str, **budget: float) -> tuple[PlanResult, InferenceDeploymentSpec]:
    fixture, *scenario = SCENARIOS[name]
    spec = fixture_spec(*scenario, **budget)
    profile = Profile.model_validate_json((FIXTURES / fixture).read_text())
    return plan_deployment(spec, [profile], load_prices(), FAST), spec


@pytest.fixture(scope="module")
def tabular() -> tuple[PlanResult, InferenceDeploymentSpec]:
    return fixture_plan("tabular")


def steps(*levers: tuple[str, float]) -> list[SavingsStep]:
    return [SavingsStep(lever, cost, f"{lever} step") for lever, cost in levers]


# ---- the waterfall's floating bars ----------------------------------------------------------------------------


def test_each_lever_floats_from_the_previous_cost_and_the_savings_add_up_to_the_whole_cut():
    waterfall = steps(
        ("baseline", 1.0),
        ("quantization", 0.6),
        ("batching", 0.6),  # saved nothing
        ("right-sizing", 0.4),
        ("caching", 0.45),  # cost more
        ("pod size", 0.3),  # a lever the report has never heard of
        ("plan", 0.3),
    )
    bars = waterfall_bars(waterfall)
    assert [b.lever for b in bars] == [s.lever for s in waterfall]
    assert [b.kind for b in bars] == ["baseline", *["lever"] * 5, "plan"]
    assert (bars[0].bottom, bars[0].top, bars[-1].bottom, bars[-1].top) == (0.0, 1.0, 0.0, 0.3)
    for before, bar in zip(waterfall, bars[1:-1], strict=False):  # each lever spans the cost before and after it
        assert {bar.bottom, bar.top} == {before.cost_per_million, bar.cost}
        assert bar.saving == pytest.approx(before.cost_per_million - bar.cost)
        assert bar.saving_pct == pytest.approx(bar.saving / 1.0 * 100)
    levers = bars[1:-1]
    assert sum(b.saving for b in levers) == pytest.approx(1.0 - 0.3) == pytest.approx(bars[-1].saving)
    assert bars[-1].saving_pct == pytest.approx(70.0)
    assert [b.saving_pct for b in levers] == pytest.approx([40.0, 0.0, 20.0, -5.0, 15.0])


def test_a_lever_that_saved_nothing_says_0_and_one_that_cost_more_goes_up():
    bars = waterfall_bars(
        steps(("baseline", 1.0), ("quantization", 0.6), ("batching", 0.6), ("caching", 0.65), ("plan", 0.65))
    )
    zero, up = bars[2], bars[3]
    assert zero.saved_nothing and zero.bottom == zero.top == 0.6 and bar_label(zero) == "0"
    assert not up.saved_nothing and up.saving < 0 and (up.bottom, up.top) == (0.6, 0.65)
    assert bar_label(up) == "+$0.05\n+5 %"
    assert bar_label(bars[1]) == "-$0.40\n-40 %"


def test_the_plan_bar_says_the_whole_cut_as_a_factor_and_a_percentage():
    bars = waterfall_bars(steps(("baseline", 0.8), ("quantization", 0.15), ("plan", 0.15)))
    assert bar_label(bars[-1]) == "$0.15\n5.3x cheaper, -81 %"
    assert bar_label(bars[0]) == "$0.80"


def test_a_plan_away_from_the_last_lever_gets_a_joint_choice_bar_so_the_bars_meet():
    bars = waterfall_bars(steps(("baseline", 1.0), ("quantization", 0.5), ("plan", 0.4)))
    assert [b.lever for b in bars] == ["baseline", "quantization", JOINT_LEVER, "plan"]
    assert (bars[2].bottom, bars[2].top) == (0.4, 0.5)
    assert sum(b.saving for b in bars[1:-1]) == pytest.approx(0.6)
    assert waterfall_bars(steps(("baseline", 1.0), ("plan", 1.0)))[-1].saving == 0.0
    assert waterfall_bars([]) == []


def test_the_bars_of_a_real_plan_run_from_its_baseline_to_its_winner(tabular):
    result, _ = tabular
    bars = waterfall_bars(result.waterfall)
    assert bars[0].top == result.waterfall[0].cost_per_million
    assert bars[-1].top == pytest.approx(result.winner.cost_per_million)
    assert sum(b.saving for b in bars if b.kind == "lever") == pytest.approx(bars[-1].saving)
    levers = [b for b in bars if b.kind == "lever"]
    for before, bar in zip([bars[0], *levers], levers, strict=False):  # each starts where the one before ended
        assert {bar.bottom, bar.top} == {before.cost, bar.cost}


# ---- latency against load -------------------------------------------------------------------------------------


def test_leading_candidates_start_with_the_winner_and_are_distinct_feasible_configurations(tabular):
    result, _ = tabular
    leaders = leading_candidates(result, count=4)
    assert leaders[0] is result.winner and 1 < len(leaders) <= 4
    keys = {(c.instance_type, c.variant, c.policy) for c in leaders}
    assert len(keys) == len(leaders)
    assert all(c.feasible and c.curve is not None for c in leaders)


def test_without_batching_predicted_latency_never_falls_as_load_rises_and_capacity_meets_the_sla(tabular):
    result, spec = tabular
    unbatched = next(c for c in result.candidates if c.feasible and c.policy.max_batch == 1)
    [sweep] = latency_sweep([unbatched], spec.sla.latency.percentile, FAST)
    rates = np.array(sweep.rates)
    assert np.all(np.diff(rates) > 0) and unbatched.capacity_rps in sweep.rates
    assert rates[0] < 0.1 * unbatched.capacity_rps and rates[-1] > unbatched.capacity_rps
    assert np.all(np.diff(sweep.latency_ms) >= -1e-9), sweep.latency_ms
    assert sweep.capacity_latency_ms <= spec.sla.latency.target_ms
    assert sweep.latency_ms[-1] > sweep.capacity_latency_ms  # beyond capacity the queue shows


def test_each_sweep_passes_through_the_point_the_planner_sized_at(tabular):
    result, spec = tabular
    for sweep in latency_sweep(leading_candidates(result), spec.sla.latency.percentile, FAST):
        assert sweep.capacity_latency_ms == pytest.approx(sweep.candidate.latency_ms)
        assert sweep.capacity_latency_ms <= spec.sla.latency.target_ms


def test_a_rejected_candidate_has_no_curve_to_sweep(tabular):
    result, spec = tabular
    rejected = replace(result.winner, curve=None, capacity_rps=0.0, reason="accuracy gate: drop 0.03 > 0.02")
    with pytest.raises(ValueError, match=r"candidates\[0\]"):
        latency_sweep([rejected], spec.sla.latency.percentile)


# ---- report.md and its PNG charts -----------------------------------------------------------------------------


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 200
    from matplotlib.image import imread

    assert imread(path).shape[:2] == (height, width)  # decodes to the end


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_write_report_draws_both_charts_from_a_real_plan_and_references_them(name, tmp_path):
    pytest.importorskip("matplotlib")
    result, spec = fixture_plan(name)
    written = write_report(result, spec, tmp_path, FAST)
    names = [p.name for p in written]
    assert names == ["report.md", "waterfall.png", "latency.png", "candidates.png"]
    for png in written[1:]:
        assert_png(png)
    report = written[0].read_text()
    for png in names[1:]:
        assert f"]({png})" in report
    assert CHARTS_NEED not in report
    assert "| lever | $/1M | saving | what |" in report
    for bar in waterfall_bars(result.waterfall):
        assert f"| {bar.lever} | {bar.cost:.4f} |" in report
    assert "in all" in report and "cheaper" in report


def test_without_matplotlib_the_report_is_the_markdown_and_says_how_to_get_charts(tabular, tmp_path, monkeypatch):
    for module in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    result, spec = tabular
    assert write_report(result, spec, tmp_path, FAST) == [tmp_path / "report.md"]
    report = (tmp_path / "report.md").read_text()
    assert CHARTS_NEED in report and ".png" not in report
    assert "| saving |" in report


def test_a_plan_without_a_winner_reports_why_and_draws_no_waterfall(tmp_path):
    pytest.importorskip("matplotlib")
    result, spec = fixture_plan("text", maxCostPerMillionRequests=0.0001)
    assert result.winner is None
    written = write_report(result, spec, tmp_path, FAST)
    assert [p.name for p in written] == ["report.md"]
    assert result.infeasible in (tmp_path / "report.md").read_text()


def test_the_planned_capacity_keeps_the_sla_at_every_lighter_load_too():
    """The tabular profile's service curve is not monotone (batch 64 faster than 32) and has a heavy jitter
    tail: with the planner's default simulation, bisection alone sized its winner where p95 met the SLA while
    lighter loads missed it (55 ms against 25 at 4,000 req/s). max_rate now checks lighter loads too (every
    5 %, every 1 % near the top), so the plan's sweep never goes over the SLA below the rate it is planned at.
    (Between those checks a large-batch policy near saturation can still draw a bad tail: the simulation's
    noise, which a longer simulation would smooth.)"""
    _, *scenario = SCENARIOS["tabular"]
    spec = fixture_spec(*scenario)
    profile = Profile.model_validate_json((FIXTURES / "tabular-local.json").read_text())
    result = plan_deployment(spec, [profile], load_prices(), PlanOptions())
    target = spec.sla.latency.target_ms
    (sweep,) = latency_sweep([result.winner], spec.sla.latency.percentile, PlanOptions(), points=48)
    assert not sweep.misses_below_capacity(target), sweep
