"""The whole pipeline on this machine, no cluster: reference models -> bench -> plan -> serve -> load -> compare.

The scenario is the campaign of DESIGN.md: 10 M requests a day (115.7 req/s on
average, peak 3x), p95 under 100 ms, at most one point of accuracy lost. The
model is the text classifier reference model (tokenizer + MiniLM encoder + a
trained head). The only instance type measured here is this machine, priced as
`local` in the price table.

This module orchestrates the steps and says what happens; the load itself comes
from :mod:`leanserve.loadgen`, the serving processes from :mod:`leanserve.local_stack`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from leanserve.api.resource import InferenceDeployment
from leanserve.loadgen import load_test, poisson_loadgen
from leanserve.local_stack import serving_stack
from leanserve.planner.latency import simulate
from leanserve.planner.plan import PlanOptions, PlanResult, plan_deployment, service_curve
from leanserve.planner.prices import load_prices
from leanserve.planner.report import write_report
from leanserve_serving.bench.evaldata import read_npz
from leanserve_serving.local import split_cpus

CAMPAIGN = """
apiVersion: leanserve.dev/v1alpha1
kind: InferenceDeployment
metadata: {name: campaign}
spec:
  model: {uri: "file:///models/text.onnx", evaluation: {uri: "file:///models/text-eval.npz", metric: accuracy}}
  sla: {latency: {percentile: 95, targetMs: 100}, maxAccuracyDrop: 0.01}
  traffic: {averageRps: 115.7, peakRps: 347}
  candidates: [local]
  cache: {exact: {expectedHitRate: 0.18}}
  autoscaling: {warmPool: 1}
"""

Say = Callable[[str], None]


def request_body(model: Path, evaluation: Path, path: Path) -> Path:
    """A v2 request made of the first evaluation row, typed as ``model`` declares its inputs (the bench's
    stack run sends the same), written where the load generator reads it."""
    import onnxruntime as ort

    from leanserve_serving.bench.stack import v2_body
    from leanserve_serving.model_server import spec_of

    specs = [spec_of(i) for i in ort.InferenceSession(str(model)).get_inputs()]
    path.write_bytes(v2_body(read_npz(evaluation).inputs, specs))
    return path


def run_demo(work: Path, say: Say, load_seconds: float = 15.0) -> dict[str, Any]:
    """Run every step; return the figures (also printed by the caller as one JSON line)."""
    from leanserve_serving.bench.run import BenchOptions, run_bench
    from leanserve_serving.bench.variants import build_variants
    from leanserve_serving.cpus import cpu_limit
    from leanserve_serving.reference_models import make_text_classifier

    started = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    say("1/5 building the reference text classifier (MiniLM encoder + a head trained on synthetic reviews)")
    ref = make_text_classifier(work / "models")
    say(f"    trained: accuracy {ref.accuracy:.4f} on {ref.evaluation.name}")

    say("2/5 profiling fp32, int8-dynamic and int8-static on this machine (leanserve bench)")
    server_cpus, client_cpus = split_cpus()
    if server_cpus:
        say(
            f"    the serving processes run on CPU(s) {sorted(server_cpus)}, the load generator on "
            f"{sorted(client_cpus or ())} (in a cluster, clients are elsewhere)"
        )
    options = BenchOptions(
        model=ref.model,
        evaluation=ref.evaluation,
        instance_type="local",
        max_batch=32,
        seconds_per_point=0.2,
        cpus=server_cpus,
        client_cpus=client_cpus,
    )
    profile = run_bench(options, progress=lambda m: say(f"    {m}"))
    (work / "profiles").mkdir(exist_ok=True)
    (work / "profiles" / "text-local.json").write_text(profile.model_dump_json(indent=2))
    for v in profile.variants:
        best = v.best()
        if best:
            speed = f"best {best.throughput_rps:.0f} rows/s at batch {best.batch_size}"
            say(
                f"    {v.name:13} accuracy {v.quality:.4f} (drop {v.quality_drop:+.4f}), "
                f"b=1 p50 {v.latency[0].p50_ms:.2f} ms, {speed}"
            )
        else:
            say(f"    {v.name:13} {v.status}: {v.reason}")

    say("3/5 planning the campaign: 10 M requests/day, peak 3x, p95 < 100 ms, accuracy drop <= 1 point")
    spec = InferenceDeployment.model_validate(yaml.safe_load(CAMPAIGN)).spec
    result: PlanResult = plan_deployment(spec, [profile], load_prices(), PlanOptions())
    report = write_report(result, spec, work / "report")
    if result.winner is None:
        raise RuntimeError(result.infeasible)
    w = result.winner
    say(
        f"    plan: {w.label()}: {w.capacity_rps:.0f} req/s per replica, predicted p95 {w.latency_ms:.1f} ms, "
        f"{min(w.replicas_hourly)}..{w.replicas_peak} replicas, ${w.cost_per_million:.4f} per 1M requests"
    )
    for step in result.waterfall:
        say(f"    {step.lever:13} ${step.cost_per_million:8.4f}/1M  {step.description}")

    say("4/5 starting the planned serving stack: model server + batching sidecar")
    variant_dir = work / "variants"
    variant_dir.mkdir(exist_ok=True)
    [built] = build_variants(ref.model, read_npz(ref.evaluation), variant_dir, False, [w.variant])
    say(
        "    cache: off for the load test (it measures the model path the replicas are sized for; "
        "hits would flatter it)"
    )
    body = request_body(ref.model, ref.evaluation, work / "request.json")
    # The rate one replica carries at the daily peak under this plan (model traffic, after cache hits).
    rate = max(result.hourly_rps) * (1 - result.hit_rate) / w.replicas_peak
    curve = service_curve(profile.variant(w.variant))  # type: ignore[arg-type]
    predicted_p95 = float(simulate([curve], [w.policy], np.array([rate]), 95, PlanOptions().overhead_ms)[0][0])
    with serving_stack(built.path, "text", w.policy, cpus=server_cpus) as url:  # type: ignore[arg-type]
        say(
            f"5/5 loading it at the planned per-replica peak rate, {rate:.0f} req/s, for {load_seconds:g} s; "
            f"the planner's ceiling per replica is {w.capacity_rps:.0f} req/s"
        )
        generator = "hack/loadgen (Poisson arrivals)" if poisson_loadgen() else "hey (bursty; no Go here)"
        say(f"    load generator: {generator}")
        measured = load_test(url, body, rate, load_seconds, client_cpus)
    error = measured.p95_ms / predicted_p95 - 1 if predicted_p95 else float("nan")
    say(
        f"    predicted p95 {predicted_p95:.1f} ms, measured p95 {measured.p95_ms:.1f} ms ({error:+.0%}); "
        f"offered {measured.offered_rps:.0f} req/s, served {measured.achieved_rps:.0f} req/s, "
        f"errors {measured.errors:.1%}"
    )
    baseline = result.waterfall[0].cost_per_million
    say(
        f"    cost per 1M requests: ${w.cost_per_million:.4f} against ${baseline:.4f} for the naive baseline "
        f"({1 - w.cost_per_million / baseline:.0%} less)"
    )
    say(f"    report: {', '.join(str(p) for p in report)}")
    threads = len(server_cpus) if server_cpus else cpu_limit()
    return {
        "model": "text (MiniLM + head)",
        "accuracy_fp32": ref.accuracy,
        "plan": w.label(),
        "precision": w.variant,
        "max_batch": w.policy.max_batch,
        "max_wait_ms": w.policy.max_wait_ms,
        "predicted_capacity_rps": round(w.capacity_rps, 1),
        "offered_rps": round(rate, 1),
        "measured_served_rps": round(measured.achieved_rps, 1),
        "predicted_p95_ms": round(predicted_p95, 2),
        "measured_p95_ms": round(measured.p95_ms, 2),
        "p95_error": round(error, 3),
        "sla_met": measured.p95_ms <= spec.sla.latency.target_ms,
        "cost_per_million": round(w.cost_per_million, 4),
        "baseline_cost_per_million": round(baseline, 4),
        "waterfall": {s.lever: round(s.cost_per_million, 4) for s in result.waterfall},
        "replicas": {"min": min(w.replicas_hourly), "peak": w.replicas_peak},
        "threads": threads,
        "seconds": round(time.monotonic() - started, 1),
        "report": str(work / "report"),
    }
