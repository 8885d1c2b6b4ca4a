"""The whole pipeline on this machine, no cluster: reference models -> bench -> plan -> serve -> load -> compare.

The scenario is the campaign of DESIGN.md: 10 M requests a day (115.7 req/s on
average, peak 3x), p95 under 100 ms, at most one point of accuracy lost. The
model is the text classifier reference model (tokenizer + MiniLM encoder + a
trained head). The only instance type measured here is this machine, priced as
`local` in the price table.

The load test ends with the observer's figures: when Debian's ``prometheus`` is installed, a local
Prometheus (:mod:`leanserve.observer.local`) scrapes the sidecar every second during the load, labelled
as the deployment ``demo/campaign``, and :func:`leanserve.observer.observe_deployment` reads the load's
window back from it, as the operator reads a cluster's Prometheus. Observed figures go beside the
predicted ones (the plan) and the load generator's own. Without the binary, or with a Prometheus that
fails, the demo goes on and says "not installed" or "unavailable: <reason>".

This module orchestrates the steps and says what happens; the load itself comes
from :mod:`leanserve.loadgen`, the serving processes from :mod:`leanserve.local_stack`.
"""

from __future__ import annotations

import contextlib
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import yaml

from leanserve.api.resource import InferenceDeployment
from leanserve.loadgen import LoadResult, load_test, poisson_loadgen
from leanserve.local_stack import serving_stack
from leanserve.observer import Observation, ObserverUnavailable, observe_deployment
from leanserve.observer.local import PrometheusNotStarted, ScrapeTarget, find_prometheus, local_prometheus
from leanserve.observer.queries import MIN_WINDOW_S
from leanserve.planner.latency import simulate
from leanserve.planner.plan import PlanOptions, PlanResult, plan_deployment, service_curve
from leanserve.planner.prices import load_prices
from leanserve.planner.report import write_report
from leanserve_serving.bench.evaldata import read_npz
from leanserve_serving.local import CPUs, split_cpus

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

#: The namespace the demo's deployment is observed in: the label its scrape target carries, with
#: ``inferencedeployment`` = the deployment's name (``campaign``).
NAMESPACE = "demo"
#: Requests sent before the load's window opens: the sidecar's series are born at their first event, and
#: Prometheus must have scraped them once before the window for its increase() to count the whole load.
WARMUP_REQUESTS = 3
#: How long to wait for the first scrape of the sidecar (Prometheus picks up new targets within ~5 s).
FIRST_SCRAPE_WAIT_S = 15.0
#: How long to wait, after the load, for a scrape that covers its end (one a second).
LAST_SCRAPE_WAIT_S = 5.0
#: How long the observation may take (the observer's own timeout).
OBSERVE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ObservedLoad:
    """A load test and what the observer saw of it."""

    measured: LoadResult
    """The load generator's own figures."""
    observer: str
    """``prometheus`` (``observation`` holds the figures), ``unavailable: <reason>`` or ``not installed``."""
    observation: Observation | None


def _warm_up(url: str, body: Path, requests: int = WARMUP_REQUESTS) -> None:
    """A few requests before the window (their answers do not matter: the load test counts errors)."""
    data = body.read_bytes()
    for _ in range(requests):
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        except OSError:
            return


def observed_load_test(
    url: str,
    body: Path,
    rate: float,
    seconds: float,
    name: str,
    say: Say,
    *,
    prometheus: str | None,
    client_cpus: CPUs = None,
) -> ObservedLoad:
    """Offer ``rate`` req/s of ``body`` to the sidecar at ``url`` for ``seconds``, observed as ``demo/name``.

    ``prometheus`` is the binary (None: not installed, nothing observed). A local Prometheus (on
    ``client_cpus``, beside the load generator) scrapes the sidecar's /metrics every second from before
    the load to after it and is stopped when this returns. The observation's window is the load run: from
    just before the generator starts to just after it ends. Prometheus failing to start, dying or answering
    nonsense makes the observer "unavailable: <reason>", never an exception.
    """
    observer, seen = "not installed", None
    with contextlib.ExitStack() as running:
        server = None
        if prometheus is None:
            say(
                "    observer: prometheus is not installed (Debian package prometheus; "
                "scripts/install-system-deps.sh installs it): nothing observed, the load generator's figures stand"
            )
        else:
            target = ScrapeTarget(urlsplit(url).netloc, {"namespace": NAMESPACE, "inferencedeployment": name})
            try:
                server = running.enter_context(local_prometheus([target], binary=prometheus, cpus=client_cpus))
            except (PrometheusNotStarted, OSError) as exc:
                reason = exc.reason if isinstance(exc, PrometheusNotStarted) else f"prometheus: {exc}"
                observer = f"unavailable: {reason}"
                say(f"    observer: {observer}; the load goes on unobserved")
                for line in getattr(exc, "log", "").strip().splitlines()[-5:]:
                    say(f"      {line}")
            else:
                say(
                    f"    observer: a local Prometheus ({server.url}) scrapes the sidecar's /metrics every second "
                    f"as {NAMESPACE}/{name}"
                )
        _warm_up(url, body)
        if server is not None and not server.wait_for_scrape(NAMESPACE, name, time.time(), FIRST_SCRAPE_WAIT_S):
            say(f"    observer: no scrape of the sidecar within {FIRST_SCRAPE_WAIT_S:g} s; loading anyway")
        start = time.time()
        measured = load_test(url, body, rate, seconds, client_cpus)
        end = time.time()
        if server is not None:
            server.wait_for_scrape(NAMESPACE, name, end, LAST_SCRAPE_WAIT_S)
            window = max(end - start, MIN_WINDOW_S)
            at = datetime.fromtimestamp(end, UTC)
            try:
                seen = observe_deployment(server.url, NAMESPACE, name, window, timeout_s=OBSERVE_TIMEOUT_S, now=at)
                observer = "prometheus"
            except ObserverUnavailable as exc:
                observer = f"unavailable: {exc.reason}"
    return ObservedLoad(measured, observer, seen)


def cost_per_million_at(rps: float, usd_per_hour: float, replicas: float = 1.0) -> float | None:
    """USD per million requests of ``replicas`` at ``usd_per_hour`` each serving ``rps`` in all."""
    return replicas * usd_per_hour / (rps * 3600) * 1e6 if rps > 0 else None


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def observer_figures(load: ObservedLoad, usd_per_hour: float) -> dict[str, Any]:
    """The observer's part of the demo's JSON line (the observed figures are None when nothing was observed)."""
    seen = load.observation
    return {
        "observer": load.observer,
        "observed_rps": _round(seen.rps, 1) if seen else None,
        "observed_p50_ms": _round(seen.p50_ms, 2) if seen else None,
        "observed_p95_ms": _round(seen.p95_ms, 2) if seen else None,
        "observed_p99_ms": _round(seen.p99_ms, 2) if seen else None,
        "observed_cost_per_million": _round(seen.cost_per_million(usd_per_hour), 4) if seen else None,
        "observed_cache_hit_rate": _round(seen.cache_hit_rate, 4) if seen else None,
        "observed_error_rate": _round(seen.error_rate, 4) if seen else None,
        "observed_mean_batch": _round(seen.mean_batch, 2) if seen else None,
        "observed_replicas": _round(seen.replicas, 2) if seen else None,
        "observed_window_s": _round(seen.window_s, 1) if seen else None,
    }


def _cell(x: float | None, form: str) -> str:
    return "-" if x is None else format(x, form)


def comparison_lines(
    load: ObservedLoad, *, rate: float, predicted_p95_ms: float, usd_per_hour: float, planned_hit_rate: float
) -> list[str]:
    """Predicted (the plan), the load generator's measurement and the observer's, side by side."""
    m, seen = load.measured, load.observation
    rows = [
        ("req/s", rate, m.achieved_rps, seen.rps if seen else None, ".1f"),
        ("p95 ms", predicted_p95_ms, m.p95_ms, seen.p95_ms if seen else None, ".1f"),
        (
            f"$/1M requests at ${usd_per_hour:g}/h",
            cost_per_million_at(rate, usd_per_hour),
            cost_per_million_at(m.achieved_rps, usd_per_hour),
            seen.cost_per_million(usd_per_hour) if seen else None,
            ".4f",
        ),
    ]
    lines = [f"    {'this load, one replica':28}{'predicted':>11}{'generator':>11}{'observed':>11}{'obs/pred':>10}"]
    for label, predicted, generator, observed, form in rows:
        error = f"{observed / predicted - 1:+.0%}" if observed is not None and predicted else "-"
        cells = "".join(f"{_cell(x, form):>11}" for x in (predicted, generator, observed))
        lines.append(f"    {label:28}{cells}{error:>10}")
    hit = seen.cache_hit_rate if seen else None
    lines.append(
        f"    {'cache hit rate':28}{'off':>11}{'-':>11}{_cell(hit, '.1%'):>11}"
        f"    (off in the load test; the plan assumes {planned_hit_rate:.0%} in service)"
    )
    if seen is not None:
        lines.append(
            f"    observed ({load.observer}, the load's {seen.window_s:.1f} s): {seen.requests:.0f} requests, "
            f"p50 {_cell(seen.p50_ms, '.1f')} ms, p99 {_cell(seen.p99_ms, '.1f')} ms, errors {seen.error_rate:.1%}, "
            f"mean batch {_cell(seen.mean_batch, '.1f')}, replicas {seen.replicas:.2f}"
        )
    else:
        lines.append(f"    observer: {load.observer}")
    return lines


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
    campaign = InferenceDeployment.model_validate(yaml.safe_load(CAMPAIGN))
    spec = campaign.spec
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
        observed = observed_load_test(
            url,
            body,
            rate,
            load_seconds,
            campaign.metadata.name,
            say,
            prometheus=find_prometheus(),
            client_cpus=client_cpus,
        )
    measured = observed.measured
    error = measured.p95_ms / predicted_p95 - 1 if predicted_p95 else float("nan")
    say(
        f"    predicted p95 {predicted_p95:.1f} ms, measured p95 {measured.p95_ms:.1f} ms ({error:+.0%}); "
        f"offered {measured.offered_rps:.0f} req/s, served {measured.achieved_rps:.0f} req/s, "
        f"errors {measured.errors:.1%}"
    )
    baseline = result.waterfall[0].cost_per_million
    say(
        f"    cost per 1M requests (the plan, over the day's traffic): ${w.cost_per_million:.4f} against "
        f"${baseline:.4f} for the naive baseline ({1 - w.cost_per_million / baseline:.0%} less)"
    )
    say(f"    report: {', '.join(str(p) for p in report)}")
    lines = comparison_lines(
        observed,
        rate=rate,
        predicted_p95_ms=predicted_p95,
        usd_per_hour=w.price_per_hour,
        planned_hit_rate=result.hit_rate,
    )
    for line in lines:
        say(line)
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
        "predicted_load_cost_per_million": _round(cost_per_million_at(rate, w.price_per_hour), 4),
        "measured_cost_per_million": _round(cost_per_million_at(measured.achieved_rps, w.price_per_hour), 4),
        **observer_figures(observed, w.price_per_hour),
        "threads": threads,
        "seconds": round(time.monotonic() - started, 1),
        "report": str(work / "report"),
    }
