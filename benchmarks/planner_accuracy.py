"""Planner accuracy: predicted against measured, on the real serving stack under open-loop load.

For each reference model: profile it here (leanserve bench), plan it (p95 < 100 ms,
the `local` type), start the planned model server + sidecar, and offer load with
hey at fixed rates. Reports (1) the predicted maximum sustainable rate at the SLA
(no headroom) against the highest offered rate that met it, searched in 5 % steps,
and (2) the predicted p95 at half that rate and at the rate the plan gives each
replica (its headroom included) against the measured ones. Goal: within 15 %.

    .venv/bin/python benchmarks/planner_accuracy.py [--seconds 6]

The load comes from hack/loadgen (Poisson arrivals, built with Go on first use),
or from hey where Go is missing. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from leanserve.api.resource import InferenceDeployment
from leanserve.demo import request_body
from leanserve.loadgen import load_test, poisson_loadgen
from leanserve.local_stack import serving_stack
from leanserve.planner.latency import max_rate, simulate
from leanserve.planner.plan import PlanOptions, plan_deployment, service_curve
from leanserve.planner.prices import load_prices
from leanserve_serving.bench.evaldata import read_npz
from leanserve_serving.bench.run import BenchOptions, run_bench
from leanserve_serving.bench.variants import build_variants
from leanserve_serving.local import split_cpus
from leanserve_serving.reference_models import make_tabular, make_text_classifier

SPEC = """
apiVersion: leanserve.dev/v1alpha1
kind: InferenceDeployment
metadata: {name: accuracy}
spec:
  model: {uri: "file:///m.onnx", evaluation: {uri: "file:///e.npz"}}
  sla: {latency: {percentile: 95, targetMs: 100}, maxAccuracyDrop: 0.01}
  traffic: {averageRps: 100, peakRps: 300}
  candidates: [local]
"""

#: The serving processes get every CPU but one, the load generator that one (as clients elsewhere would be).
SERVER_CPUS, CLIENT_CPUS = split_cpus()
STEP = 0.05  # the measured capacity is searched in steps of 5 % of the prediction
PREDICTION_REQUESTS = 20_000  # a longer simulation than planning uses, to see queues build near saturation


def meets(run: dict[str, float], target: float) -> bool:
    return run["measured_p95_ms"] <= target and run["served_rps"] >= 0.97 * run["offered_rps"] and run["errors"] == 0


def measure_model(name: str, make, work: Path, seconds: float) -> dict[str, object]:  # noqa: ANN001
    ref = make(work / name)
    print(f"[{name}] profiling (model alone, then through the serving stack) ...", file=sys.stderr)
    options = BenchOptions(
        model=ref.model,
        evaluation=ref.evaluation,
        instance_type="local",
        max_batch=64,
        seconds_per_point=0.2,
        cpus=SERVER_CPUS,
        client_cpus=CLIENT_CPUS,
    )
    profile = run_bench(options)
    spec = InferenceDeployment.model_validate(yaml.safe_load(SPEC)).spec
    plan_options = PlanOptions()
    result = plan_deployment(spec, [profile], load_prices(), plan_options)
    w = result.winner
    assert w is not None, result.infeasible
    target = spec.sla.latency.target_ms
    curve = service_curve(profile.variant(w.variant))  # type: ignore[arg-type]
    # The planner sizes with w.capacity_rps (its headroom included); the accuracy question is the rate at
    # which the SLA actually breaks, so predict that without the headroom, with a long simulation.
    [predicted_max] = max_rate(
        [curve],
        [w.policy],
        percentile=95,
        target_ms=target,
        overhead_ms=plan_options.overhead_ms,
        iterations=14,
        requests=PREDICTION_REQUESTS,
        max_utilization=1.0,
    )

    def predict(rate: float) -> float:
        lat, _ = simulate([curve], [w.policy], np.array([rate]), 95, plan_options.overhead_ms, PREDICTION_REQUESTS)
        return float(lat[0])

    [built] = build_variants(ref.model, read_npz(ref.evaluation), work / name, False, [w.variant])
    body = request_body(ref.model, ref.evaluation, work / name / "request.json")
    runs: list[dict[str, float]] = []
    print(
        f"[{name}] plan {w.label()}: predicted max {predicted_max:.0f} req/s at the SLA, planned "
        f"{w.capacity_rps:.0f} req/s per replica; loading ...",
        file=sys.stderr,
    )
    with serving_stack(built.path, name, w.policy, cpus=SERVER_CPUS) as url:  # type: ignore[arg-type]

        def run(rate: float) -> dict[str, float]:
            m = load_test(url, body, rate, seconds, CLIENT_CPUS)
            r = {
                "offered_rps": round(rate, 1),
                "served_rps": round(m.achieved_rps, 1),
                "predicted_p95_ms": round(predict(rate), 2),
                "measured_p95_ms": round(m.p95_ms, 2),
                "errors": m.errors,
            }
            runs.append(r)
            print(
                f"[{name}]   offered {r['offered_rps']:8.1f} served {r['served_rps']:8.1f} p95 predicted "
                f"{r['predicted_p95_ms']:7.1f} measured {r['measured_p95_ms']:7.1f} ms",
                file=sys.stderr,
            )
            return r

        load_test(url, body, max(1.0, predicted_max * 0.1), 2, CLIENT_CPUS)  # warm-up
        half = run(predicted_max * 0.5)
        planned = run(w.capacity_rps)
        # The measured capacity: the highest rate, in steps of 5 % of the prediction, that meets the SLA.
        factor = 1.0
        if meets(run(predicted_max), target):
            while factor < 1.6 and meets(run(predicted_max * (factor + STEP)), target):
                factor += STEP
        else:
            factor -= STEP
            while factor > 0.3 and not meets(run(predicted_max * factor), target):
                factor -= STEP
        measured_max = predicted_max * factor

    return {
        "model": name,
        "plan": w.label(),
        "planned_capacity_rps": round(w.capacity_rps, 1),
        "predicted_max_rps": round(predicted_max, 1),
        "measured_max_rps": round(measured_max, 1),
        "capacity_error": error(measured_max, predicted_max),
        "p95_at_half": p95_figures(half),
        "p95_at_planned": p95_figures(planned),
        "runs": runs,
    }


def error(measured: float, predicted: float) -> float:
    """predicted / measured - 1, rounded (NaN where nothing was measured)."""
    return round(predicted / measured - 1, 3) if measured else float("nan")


def p95_figures(run: dict[str, float]) -> dict[str, float]:
    """One run's p95, predicted against measured."""
    predicted, measured = run["predicted_p95_ms"], run["measured_p95_ms"]
    return {
        "rate": run["offered_rps"],
        "predicted_ms": predicted,
        "measured_ms": measured,
        "error": error(measured, predicted),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--models", default="tabular,text", help="which reference models (comma-separated)")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        makers = {"tabular": make_tabular, "text": make_text_classifier}
        results = [measure_model(m, makers[m], Path(tmp), args.seconds) for m in args.models.split(",")]
    generator = "hack/loadgen, Poisson arrivals" if poisson_loadgen() else "hey, rate-limited workers (bursty)"
    where = f"serving on CPUs {sorted(SERVER_CPUS)}, load from CPU {sorted(CLIENT_CPUS)}" if SERVER_CPUS else "one CPU"
    print(
        f"\nplanner accuracy: p95 < 100 ms, open-loop load ({generator}; {where}), {args.seconds:g} s per rate; "
        "error = predicted / measured - 1\n"
    )
    for r in results:
        print(
            f"{r['model']}: plan {r['plan']} (planned {r['planned_capacity_rps']:.0f} req/s per replica, "
            "the planner's headroom included)"
        )
        print(
            f"  max sustainable rate at the SLA: predicted {r['predicted_max_rps']:.0f} req/s, measured "
            f"{r['measured_max_rps']:.0f} req/s (error {r['capacity_error']:+.0%}; 5 % steps)"
        )
        for key, what in (("p95_at_half", "half the predicted max"), ("p95_at_planned", "the planned rate")):
            h = r[key]
            print(
                f"  p95 at {what} ({h['rate']:.0f} req/s): predicted {h['predicted_ms']:.1f} ms, measured "
                f"{h['measured_ms']:.1f} ms (error {h['error']:+.0%})"
            )
    print(f"(took {time.monotonic() - started:.0f} s)")
    print(json.dumps({"benchmark": "planner_accuracy", "results": results}))


if __name__ == "__main__":
    main()
