"""Where the GPU pays: the planner's cost per 1M requests on this machine's CPU against one H200, 10 M to 1 B a day.

    PYTHONPATH=operator:serving_image .venv/bin/python benchmarks/gpu_crossover.py [--chart docs/gpu-crossover.png]

For each reference model it plans (``plan_deployment``, the function behind ``leanserve plan``) over the measured
profiles in tests/fixtures/profiles: ``{model}-local.json`` (this machine's 2 vCPUs, priced as the shipped table
prices ``local``) and the H200 profile with stack figures (``text-nvidia-h200.json``,
``tabular-stack-nvidia-h200.json``), priced as one GPU's share of an AWS 8x H200 instance (H200_PRICE below, with
its source and date). Two scenarios:

- ``measured``: the profiles as measured, the serving stack (sidecar + model server, HTTP + JSON) included;
- ``raw``: the stack figures left out and the front door ceiling lifted, i.e. as if a replica served at
  ``session.run`` speed: what a faster front door (binary protocol, several sidecars per GPU) could reach.

The crossover is the lowest traffic in the sweep from which on the GPU plan costs less per 1M than the CPU plan
(None when it never does). Prints a table, writes a chart, ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from leanserve.api.spec import InferenceDeploymentSpec
from leanserve.planner.plan import EvaluationMemo, PlanOptions, plan_deployment
from leanserve.planner.prices import InstanceType, PriceTable, load_prices
from leanserve_serving.profile import Profile

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "profiles"
GPU_TYPE = "nvidia-h200"
#: One H200's share (1/8 of the GPUs, vCPUs and memory) of an AWS instance with 8x H200 (p5e.48xlarge: 192 vCPUs,
#: 2048 GiB, 1128 GB HBM3). The price is the sourced one found: AWS's EC2 Capacity Blocks for ML rate, which is
#: below on-demand, so it prices the GPU at its cheapest; a GPU plan that does not pay at this price does not pay
#: on demand either.
H200_PRICE = {
    "instance": "p5e.48xlarge (8x H200)",
    "usd_per_hour": 43.26,
    "gpus": 8,
    "source": "aws.amazon.com/ec2/capacityblocks/pricing/: 'Amazon EC2 Capacity Blocks for ML Pricing', 8 x H200, "
    "US East (Ohio), effective instance hourly rate $43.26 ($5.408 per accelerator-hour), rates in effect until "
    "their scheduled 2025-01-01 update; a reservation rate, lower than on-demand",
    "date": "2024-12 (rates in effect until 2025-01-01)",
}
GPU_PROFILES = {"text": "text-nvidia-h200.json", "tabular": "tabular-stack-nvidia-h200.json"}
SWEEP_PER_DAY = [float(x) for x in np.geomspace(1e7, 1e9, 13)]
SLA_MS = {"text": 100.0, "tabular": 50.0}


def prices_with_h200(usd_per_hour: float = H200_PRICE["usd_per_hour"]) -> PriceTable:
    """The shipped table plus ``nvidia-h200`` (this script's, not the shipped one: that is the chart's copy too)."""
    table = load_prices()
    share = InstanceType(
        name=GPU_TYPE,
        vcpus=192 // 8,
        memory_gi_b=2048 / 8,
        gpus=1,
        gpu_model="NVIDIA H200",
        on_demand_usd_per_hour=usd_per_hour / H200_PRICE["gpus"],
    )
    return table.model_copy(update={"instance_types": [*table.instance_types, share]})


def load_profiles(model: str, fixtures: Path = FIXTURES) -> dict[str, Profile]:
    cpu = Profile.model_validate_json((fixtures / f"{model}-local.json").read_text())
    gpu = Profile.model_validate_json((fixtures / GPU_PROFILES[model]).read_text())
    return {"local": cpu, GPU_TYPE: gpu}


def without_stack(profile: Profile) -> Profile:
    """The profile as if the front door cost nothing: no stack figures (the planner then uses session.run)."""
    variants = [
        v.model_copy(update={"stack": None, "latency": [p.model_copy(update={"stack_ms": None}) for p in v.latency]})
        for v in profile.variants
    ]
    return profile.model_copy(update={"variants": variants})


def spec_for(model: str, requests_per_day: float, instance_type: str) -> InferenceDeploymentSpec:
    average = requests_per_day / 86400
    return InferenceDeploymentSpec.model_validate(
        {
            "model": {
                "uri": f"https://models.example.com/{model}.onnx",
                "format": "onnx",
                "evaluation": {"uri": f"https://models.example.com/{model}-eval.npz", "metric": "accuracy"},
            },
            "sla": {"latency": {"percentile": 95, "targetMs": SLA_MS[model]}, "maxAccuracyDrop": 0.02},
            "traffic": {"averageRps": average, "peakRps": 2 * average},
            "candidates": [instance_type],
            "precision": "auto",
            "batching": {"mode": "auto", "maxBatchSize": 128},
            "autoscaling": {"warmPool": 1, "maxReplicas": 1000},
        }
    )


def sweep(
    model: str, scenario: str, prices: PriceTable, fixtures: Path = FIXTURES, per_day: list[float] = SWEEP_PER_DAY
) -> list[dict]:
    """Cost per 1M (USD) of the cheapest feasible plan on each side at each traffic of the sweep."""
    profiles = load_profiles(model, fixtures)
    options = PlanOptions()
    if scenario == "raw":
        profiles = {k: without_stack(p) for k, p in profiles.items()}
        options = PlanOptions(front_door_rps=1e12, overhead_ms=0.0)
    memo = EvaluationMemo()
    rows = []
    for traffic in per_day:
        row: dict = {"requests_per_day": traffic}
        for side in ("local", GPU_TYPE):
            result = plan_deployment(spec_for(model, traffic, side), [profiles[side]], prices, options, memo)
            w = result.winner
            row[side] = (
                {
                    "usd_per_1m": round(w.cost_per_million, 5),
                    "variant": w.variant,
                    "max_batch": w.policy.max_batch,
                    "replicas_peak": w.replicas_peak,
                    "capacity_rps": round(w.capacity_rps),
                }
                if w
                else {"usd_per_1m": None, "why": result.infeasible}
            )
        rows.append(row)
    return rows


def crossover(rows: list[dict]) -> float | None:
    """The lowest traffic from which on the GPU costs less per 1M than the CPU at every higher traffic swept."""
    found = None
    for row in reversed(rows):
        cpu, gpu = row["local"]["usd_per_1m"], row[GPU_TYPE]["usd_per_1m"]
        if gpu is None or (cpu is not None and gpu >= cpu):
            break
        found = row["requests_per_day"]
    return found


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (model, by_scenario) in zip(axes[0], results.items(), strict=True):
        for scenario, style in (("measured", "-"), ("raw", ":")):
            rows = by_scenario[scenario]["rows"]
            x = [r["requests_per_day"] for r in rows]
            for side, color in (("local", "tab:blue"), (GPU_TYPE, "tab:green")):
                y = [r[side]["usd_per_1m"] or np.nan for r in rows]
                label = f"{'CPU (local, 2 vCPU)' if side == 'local' else 'GPU (1/8 of 8x H200)'}, {scenario}"
                ax.plot(x, y, style, color=color, marker="o", ms=3, label=label)
            at = by_scenario[scenario]["crossover_per_day"]
            if at:
                ax.axvline(at, color="grey", ls=style, lw=0.8)
        ax.set(xscale="log", yscale="log", title=f"{model}: cost per 1M requests", xlabel="requests per day")
        ax.set_ylabel("USD per 1M (planner)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chart", type=Path, default=None, help="write the chart (PNG) here")
    parser.add_argument("--to", type=float, default=1e9, help="sweep up to this many requests a day (from 1e7)")
    args = parser.parse_args()
    points = [float(x) for x in np.geomspace(1e7, args.to, 13 + 6 * round(np.log10(args.to / 1e9)))]
    prices = prices_with_h200()
    results: dict = {}
    for model in GPU_PROFILES:
        results[model] = {}
        for scenario in ("measured", "raw"):
            rows = sweep(model, scenario, prices, per_day=points)
            results[model][scenario] = {"rows": rows, "crossover_per_day": crossover(rows)}
            print(
                f"\n{model}, {scenario} (USD per 1M; CPU = local 2 vCPU"
                f" ${prices.get('local').on_demand_usd_per_hour}/h,"
                f" GPU = 1/8 {H200_PRICE['instance']} ${prices.get(GPU_TYPE).on_demand_usd_per_hour:.2f}/h)"
            )
            print(f"{'req/day':>12} {'CPU $/1M':>10} {'CPU plan':>24} {'GPU $/1M':>10} {'GPU plan':>24}")
            for r in rows:
                cells = []
                for side in ("local", GPU_TYPE):
                    s = r[side]
                    cost = f"{s['usd_per_1m']:.4f}" if s["usd_per_1m"] is not None else "-"
                    plan = f"{s['variant']} b<={s['max_batch']} x{s['replicas_peak']}" if "variant" in s else "none"
                    cells += [f"{cost:>10}", f"{plan:>24}"]
                print(f"{r['requests_per_day']:>12.3g} " + " ".join(cells))
            at = results[model][scenario]["crossover_per_day"]
            print(f"crossover: {f'none in 1e7-{args.to:.0e}/day' if at is None else f'{at:.3g} requests/day'}")
    if args.chart:
        chart(results, args.chart)
        print(f"chart: {args.chart}")
    figures = {f"{m}_{s}_crossover_per_day": results[m][s]["crossover_per_day"] for m in results for s in results[m]}
    for m in results:
        for s in results[m]:
            last = results[m][s]["rows"][-1]
            figures[f"{m}_{s}_usd_per_1m_at_top"] = {k: last[k]["usd_per_1m"] for k in ("local", GPU_TYPE)}
    figures["gpu_price"] = H200_PRICE
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
