"""Planner accuracy: predicted against measured, on the real serving stack under open-loop load.

For each reference model: profile it here (leanserve bench), plan it (p95 < 100 ms,
the `local` type), start the planned model server + sidecar, and offer load with
hey at fixed rates. Reports (1) the predicted maximum sustainable rate at the SLA
against the highest offered rate that met it, and (2) the predicted p95 at half
the predicted capacity against the measured one. Goal: within 15 %.

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
from leanserve.demo import _loadgen, load_test, request_body, serving_stack
from leanserve.planner.latency import simulate
from leanserve.planner.plan import PlanOptions, plan_deployment, service_curve
from leanserve.planner.prices import load_prices
from leanserve_serving.bench.evaldata import read_npz
from leanserve_serving.bench.run import BenchOptions, run_bench
from leanserve_serving.bench.variants import build_variants
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

FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.25)


def measure_model(name: str, make, work: Path, seconds: float) -> dict[str, object]:  # noqa: ANN001
    ref = make(work / name)
    print(f"[{name}] profiling ...", file=sys.stderr)
    profile = run_bench(BenchOptions(ref.model, ref.evaluation, instance_type="local", max_batch=64,
                                     seconds_per_point=0.2))  # fmt: skip
    spec = InferenceDeployment.model_validate(yaml.safe_load(SPEC)).spec
    options = PlanOptions()
    result = plan_deployment(spec, [profile], load_prices(), options)
    w = result.winner
    assert w is not None, result.infeasible
    curve = service_curve(profile.variant(w.variant))  # type: ignore[arg-type]
    [built] = build_variants(ref.model, read_npz(ref.evaluation), work / name, False, [w.variant])
    body = request_body(ref.evaluation, work / name / "request.json")
    runs = []
    print(f"[{name}] plan {w.label()}: capacity {w.capacity_rps:.0f} req/s; loading ...", file=sys.stderr)
    with serving_stack(built.path, name, w.policy) as url:  # type: ignore[arg-type]
        load_test(url, body, max(1.0, w.capacity_rps * 0.1), 2)  # warm-up
        for fraction in FRACTIONS:
            rate = w.capacity_rps * fraction
            predicted = float(simulate([curve], [w.policy], np.array([rate]), 95, options.overhead_ms)[0][0])
            m = load_test(url, body, rate, seconds)
            runs.append({"offered_rps": round(rate, 1), "served_rps": round(m.achieved_rps, 1),
                         "predicted_p95_ms": round(predicted, 2), "measured_p95_ms": round(m.p95_ms, 2),
                         "errors": m.errors})  # fmt: skip
    target = spec.sla.latency.target_ms
    ok = [r for r in runs if r["measured_p95_ms"] <= target and r["served_rps"] >= 0.95 * r["offered_rps"]
          and r["errors"] == 0]  # fmt: skip
    measured_capacity = max((r["offered_rps"] for r in ok), default=0.0)
    half = next(r for r in runs if r["offered_rps"] == round(w.capacity_rps * 0.5, 1))
    return {
        "model": name, "plan": w.label(), "predicted_capacity_rps": round(w.capacity_rps, 1),
        "measured_capacity_rps": measured_capacity,
        "capacity_error": round(measured_capacity / w.capacity_rps - 1, 3) if w.capacity_rps else None,
        "p95_at_half_capacity": {"predicted_ms": half["predicted_p95_ms"], "measured_ms": half["measured_p95_ms"],
                                 "error": round(half["measured_p95_ms"] / half["predicted_p95_ms"] - 1, 3)},
        "runs": runs,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6)
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure_model("tabular", make_tabular, Path(tmp), args.seconds),
                   measure_model("text", make_text_classifier, Path(tmp), args.seconds)]  # fmt: skip
    generator = "hack/loadgen, Poisson arrivals" if _loadgen() else "hey, rate-limited workers (bursty)"
    print(f"\nplanner accuracy: p95 < 100 ms, open-loop load ({generator}), {args.seconds:g} s per rate\n")
    for r in results:
        print(f"{r['model']}: plan {r['plan']}")
        print(f"  max sustainable rate: predicted {r['predicted_capacity_rps']:.0f} req/s, measured "
              f"{r['measured_capacity_rps']:.0f} req/s (error {r['capacity_error']:+.0%}; measured = highest "
              f"offered rate of {FRACTIONS} x predicted that met the SLA)")  # fmt: skip
        h = r["p95_at_half_capacity"]
        print(f"  p95 at half the predicted capacity: predicted {h['predicted_ms']:.1f} ms, measured "
              f"{h['measured_ms']:.1f} ms (error {h['error']:+.0%})")  # fmt: skip
        for run in r["runs"]:
            print(f"    offered {run['offered_rps']:>8.1f}  served {run['served_rps']:>8.1f}  p95 predicted "
                  f"{run['predicted_p95_ms']:>7.1f} ms  measured {run['measured_p95_ms']:>7.1f} ms")  # fmt: skip
    print(f"(took {time.monotonic() - started:.0f} s)")
    print(json.dumps({"benchmark": "planner_accuracy", "results": results}))


if __name__ == "__main__":
    main()
