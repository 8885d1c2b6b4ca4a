"""The H200 profiles (benchmarks/gpu_stack.py on the device machine) load as profiles, are labelled with the
hardware they were measured on, and the planner over them and this machine's CPU profiles says where the GPU
pays (no GPU needed: a real planner run over the committed fixtures)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from leanserve_serving.profile import Profile

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "profiles"


def crossover_module():
    spec = importlib.util.spec_from_file_location("gpu_crossover", REPO / "benchmarks" / "gpu_crossover.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["text-nvidia-h200.json", "tabular-stack-nvidia-h200.json"])
def test_h200_stack_profiles_are_labelled_with_their_hardware_and_carry_stack_figures(name):
    profile = Profile.model_validate_json((FIXTURES / name).read_text())
    assert profile.instance_type == "nvidia-h200"  # never a cloud type it was not measured on
    assert profile.hardware.gpu == "NVIDIA H200"
    ok = {v.name: v for v in profile.variants if v.status == "ok"}
    assert {"fp32", "fp16"} <= set(ok)
    for v in ok.values():
        assert v.stack is not None and any(p.stack_ms for p in v.latency)  # served through sidecar + model server
        assert v.gpu_memory_mb and v.gpu_memory_mb > 0
    assert abs(ok["fp16"].quality_drop) < 0.01


def test_cpu_and_gpu_profiles_of_one_model_share_its_digest():
    for cpu, gpu in (
        ("text-local.json", "text-nvidia-h200.json"),
        ("tabular-local.json", "tabular-stack-nvidia-h200.json"),
    ):
        a, b = (Profile.model_validate_json((FIXTURES / f).read_text()) for f in (cpu, gpu))
        assert a.model_digest == b.model_digest
        assert a.instance_type == "local"


def test_planner_prices_the_h200_share_and_finds_no_crossover_up_to_a_billion_a_day():
    """As measured (the Python/JSON front door caps a GPU replica near the CPU's rows/s), one H200 at 1/8 of an
    8x H200 instance never costs less per 1M than this machine's CPU between 10 M and 1 B requests a day; with the
    front door lifted (session.run speed) the gap narrows as traffic grows (GPU cost falls, a fixed replica)."""
    gx = crossover_module()
    prices = gx.prices_with_h200()
    assert prices.get("nvidia-h200").is_gpu
    for model in ("text", "tabular"):
        measured = gx.sweep(model, "measured", prices)
        assert gx.crossover(measured) is None
        top = measured[-1]
        assert top["nvidia-h200"]["usd_per_1m"] > top["local"]["usd_per_1m"]
        raw = gx.sweep(model, "raw", prices)
        gpu_costs = [r["nvidia-h200"]["usd_per_1m"] for r in raw]
        assert gpu_costs == sorted(gpu_costs, reverse=True)


def test_a_cheap_enough_gpu_crosses_over_inside_the_sweep():
    """The crossover search works: at a price where the GPU wins at high traffic, it is found, and below it the
    CPU is cheaper."""
    gx = crossover_module()
    prices = gx.prices_with_h200(usd_per_hour=8 * 0.3)  # 0.30 USD per GPU-hour: what-if, not a real price
    rows = gx.sweep("text", "raw", prices)
    at = gx.crossover(rows)
    assert at is not None and 1e7 < at <= 1e9
    below = [r for r in rows if r["requests_per_day"] < at]
    assert below and all(r["nvidia-h200"]["usd_per_1m"] >= r["local"]["usd_per_1m"] for r in below)


def test_leanserve_plan_over_the_cpu_and_gpu_profiles_prices_both_as_the_crossover_script_does(tmp_path):
    """The CLI a user runs (`leanserve plan --prices docs/gpu/prices-h200.yaml`) at the top of the sweep: both
    instance types are feasible, the CPU wins, and the figures are the sweep's (one planner, one price)."""
    import json
    import shutil
    import subprocess
    import sys

    from leanserve.planner.prices import load_prices

    gx = crossover_module()
    table = load_prices(REPO / "docs" / "gpu" / "prices-h200.yaml")
    assert table.get("nvidia-h200").on_demand_usd_per_hour == pytest.approx(gx.H200_PRICE["usd_per_hour"] / 8)
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    for name in ("text-local.json", "text-nvidia-h200.json"):
        shutil.copy(FIXTURES / name, profiles / name)
    leanserve = Path(sys.executable).parent / "leanserve"
    spec, prices = REPO / "docs" / "gpu" / "text-1b-per-day.yaml", REPO / "docs" / "gpu" / "prices-h200.yaml"
    out = subprocess.run(
        [str(leanserve), "plan", "-f", str(spec), "--profiles", str(profiles), "--prices", str(prices), "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout)
    assert result["plan"]["instanceType"] == "local"
    gpu = [c for c in result["candidates"] if c["instanceType"] == "nvidia-h200" and c["feasible"]]
    assert gpu, "the H200 is a feasible candidate"
    cheapest_gpu = min(c["costPerMillionRequests"] for c in gpu)
    assert cheapest_gpu > result["plan"]["costPerMillionRequests"]
    top = gx.sweep("text", "measured", gx.prices_with_h200(), per_day=[1e9])[0]
    assert top["local"]["usd_per_1m"] == pytest.approx(result["plan"]["costPerMillionRequests"], rel=0.01)
    assert top["nvidia-h200"]["usd_per_1m"] == pytest.approx(cheapest_gpu, rel=0.01)
