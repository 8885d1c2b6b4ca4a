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
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
import yaml

from leanserve.api.resource import InferenceDeployment
from leanserve.campaign import write_campaign
from leanserve.loadgen import LoadResult, load_test, poisson_loadgen
from leanserve.local_stack import local_redis, serving_stack
from leanserve.observer import Observation, ObserverUnavailable, observe_deployment
from leanserve.observer.local import PrometheusNotStarted, ScrapeTarget, find_prometheus, local_prometheus
from leanserve.observer.queries import MIN_WINDOW_S
from leanserve.planner.charts import waterfall_bars
from leanserve.planner.latency import simulate
from leanserve.planner.plan import PlanOptions, PlanResult, SavingsStep, plan_deployment, service_curve
from leanserve.planner.prices import load_prices
from leanserve.planner.report import write_report
from leanserve_serving.local import CPUs, split_cpus

if TYPE_CHECKING:
    from leanserve_serving.bench.run import BenchOptions
    from leanserve_serving.profile import Profile

CAMPAIGN = """
apiVersion: leanserve.dev/v1alpha1
kind: InferenceDeployment
metadata: {name: campaign}
spec:
  model: {uri: "file:///models/text.onnx", evaluation: {uri: "file:///models/text-eval.npz", metric: accuracy}}
  sla: {latency: {percentile: 95, targetMs: 100}, maxAccuracyDrop: 0.01}
  traffic: {averageRps: 115.7, peakRps: 347}
  candidates: [local]
  batching: {padInputs: {input_ids: 0, attention_mask: 0}}
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


def _warm_up(url: str, bodies: Path, requests: int = WARMUP_REQUESTS) -> None:
    """A few requests before the window (their answers do not matter: the load test counts errors): the
    bodies file's last line (one body per line; the load starts from the first)."""
    data = bodies.read_bytes().strip().splitlines()[-1]
    for _ in range(requests):
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        except OSError:
            return


def observed_load_test(
    url: str,
    bodies: Path,
    rate: float,
    seconds: float,
    name: str,
    say: Say,
    *,
    prometheus: str | None,
    client_cpus: CPUs = None,
) -> ObservedLoad:
    """Offer ``rate`` req/s of ``bodies`` (one request body per line, sent in turn) to the sidecar at ``url``
    for ``seconds``, observed as ``demo/name``.

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
        _warm_up(url, bodies)
        if server is not None and not server.wait_for_scrape(NAMESPACE, name, time.time(), FIRST_SCRAPE_WAIT_S):
            say(f"    observer: no scrape of the sidecar within {FIRST_SCRAPE_WAIT_S:g} s; loading anyway")
        start = time.time()
        if poisson_loadgen() is not None:
            measured = load_test(url, None, rate, seconds, client_cpus, bodies=bodies)
        else:  # hey sends one body: the first
            one = bodies.with_suffix(".first.json")
            one.write_bytes(bodies.read_bytes().strip().splitlines()[0])
            say("    load generator: hey, one request body (no Go here to build hack/loadgen; bursty, no repeats)")
            measured = load_test(url, one, rate, seconds, client_cpus)
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
    hit_error = f"{hit / planned_hit_rate - 1:+.0%}" if hit is not None and planned_hit_rate else "-"
    lines.append(f"    {'cache hit rate':28}{planned_hit_rate:>11.1%}{'-':>11}{_cell(hit, '.1%'):>11}{hit_error:>10}")
    if seen is not None:
        lines.append(
            f"    observed ({load.observer}, the load's {seen.window_s:.1f} s): {seen.requests:.0f} requests, "
            f"p50 {_cell(seen.p50_ms, '.1f')} ms, p99 {_cell(seen.p99_ms, '.1f')} ms, errors {seen.error_rate:.1%}, "
            f"mean batch {_cell(seen.mean_batch, '.1f')}, replicas {seen.replicas:.2f}"
        )
    else:
        lines.append(f"    observer: {load.observer}")
    return lines


#: Ragged batching for the text model: requests as long as their reviews, padded in a batch to its longest.
PAD_INPUTS = {"input_ids": 0, "attention_mask": 0}
#: The accuracy-aware INT8 search's time budget in the demo (the spec's default is longer).
SEARCH_SECONDS = 150.0


def lever_shares(steps: list[SavingsStep]) -> dict[str, float]:
    """Each lever's saving as a fraction of the baseline's cost: what the waterfall's bars say in %; a lever
    that added cost is negative."""
    bars = waterfall_bars(steps)
    return {b.lever: round(b.saving_pct / 100, 4) for b in bars if b.kind == "lever"}


def waterfall_lines(steps: list[SavingsStep], width: int = 40) -> list[str]:
    """The waterfall as text: each bar's cost, its saving in $ and % of the baseline, and a bar of ``#``."""
    bars = waterfall_bars(steps)
    base = bars[0].cost if bars else 0.0
    lines = []
    for bar in bars:
        if bar.kind == "plan":
            label = f"{base / bar.cost:.1f}x cheaper" if bar.cost > 0 else "-"
        elif bar.kind == "baseline":
            label = ""
        else:
            label = f"{-bar.saving:+.4f} $ ({-bar.saving_pct / 100:+.0%})"
        hashes = "#" * max(1, round(bar.cost / base * width)) if base > 0 else ""
        lines.append(f"    {bar.lever:13} ${bar.cost:8.4f}/1M {label:>22}  {hashes}")
    return lines


def _bench(options: BenchOptions, say: Say, label: str) -> Profile:
    from leanserve_serving.bench.run import run_bench

    profile = run_bench(options, progress=lambda m: say(f"    [{label}] {m}"))
    for v in profile.variants:
        best = v.best()
        if best:
            recipe = f", {v.recipe.outcome}: {len(v.recipe.nodes_excluded)} node(s) kept fp32" if v.recipe else ""
            say(
                f"    [{label}] {v.name:13} accuracy {v.quality:.4f} (drop {v.quality_drop:+.4f}{recipe}), "
                f"b=1 {v.latency[0].throughput_rps:.1f} rows/s, best {best.throughput_rps:.1f} rows/s at batch "
                f"{best.batch_size}"
            )
        else:
            say(f"    [{label}] {v.name:13} {v.status}: {v.reason}")
    return profile


def run_demo(work: Path, say: Say, load_seconds: float = 20.0) -> dict[str, Any]:
    """Run every step; return the figures (also printed by the caller as one JSON line)."""
    from leanserve_serving.bench.evaldata import read_npz
    from leanserve_serving.bench.recipes import build_planned_variant
    from leanserve_serving.bench.run import BenchOptions
    from leanserve_serving.cpus import cpu_limit
    from leanserve_serving.reference_models import make_text_classifier, token_lengths

    started = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    say("1/6 building the reference text classifier (MiniLM encoder + a head trained on synthetic reviews)")
    ref = make_text_classifier(work / "models")
    lengths = token_lengths(ref.evaluation)
    say(
        f"    trained: accuracy {ref.accuracy:.4f}; reviews of {lengths.min()}-{lengths.max()} tokens "
        f"(median {np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f})"
    )
    server_cpus, client_cpus = split_cpus()
    pod_vcpus = len(server_cpus) if server_cpus else cpu_limit()
    say(
        f"2/6 profiling a {pod_vcpus}-vCPU pod: fp32 and int8-dynamic, searched to keep the 1-point gate "
        f"(leanserve bench, through the serving stack with ragged batching)"
    )
    if server_cpus:
        say(
            f"    the serving processes run on CPU(s) {sorted(server_cpus)}, the load generator on "
            f"{sorted(client_cpus or ())} (in a cluster, clients are elsewhere)"
        )
    common = {
        "model": ref.model,
        "evaluation": ref.evaluation,
        "instance_type": "local",
        "variants": ("fp32", "int8-dynamic"),
        "max_batch": 8,
        "seconds_per_point": 0.3,
        "max_accuracy_drop": 0.01,
        "quantization_search_s": SEARCH_SECONDS,
        "pad_inputs": PAD_INPUTS,
    }
    profiles = [_bench(BenchOptions(**common, cpus=server_cpus, client_cpus=client_cpus), say, f"{pod_vcpus} vCPU")]
    if server_cpus is not None and cpu_limit() > pod_vcpus:
        say(
            f"3/6 profiling the whole node ({cpu_limit()} vCPUs, the naive team's replica): the model alone "
            "(the stack's client would share its cores)"
        )
        found = {v.name: v.recipe for v in profiles[0].variants if v.recipe is not None}
        whole = BenchOptions(**common, stack_seconds=0.0, recipes=found)
        profiles.append(_bench(whole, say, f"{cpu_limit()} vCPU"))
    else:
        say("3/6 one pod size only: this machine has no cores to spare for a second size")
    (work / "profiles").mkdir(exist_ok=True)
    for profile in profiles:
        (work / "profiles" / f"text-local-{profile.threads}vcpu.json").write_text(profile.model_dump_json(indent=2))

    say("4/6 planning the campaign: 10 M requests/day, peak 3x, p95 < 100 ms, accuracy drop <= 1 point")
    campaign = InferenceDeployment.model_validate(yaml.safe_load(CAMPAIGN))
    spec = campaign.spec
    options = PlanOptions()
    result: PlanResult = plan_deployment(spec, profiles, load_prices(), options)
    report = write_report(result, spec, work / "report", options)
    if result.winner is None:
        raise RuntimeError(result.infeasible)
    w = result.winner
    say(
        f"    plan: {w.label()}: {w.capacity_rps:.1f} req/s per replica, predicted p95 {w.latency_ms:.1f} ms, "
        f"{min(w.replicas_hourly)}..{w.replicas_peak} replicas on {w.nodes_peak} node(s) at peak, "
        f"${w.cost_per_million:.4f} per 1M requests"
    )
    for line in waterfall_lines(result.waterfall):
        say(line)
    for step in result.waterfall:
        say(f"    {step.lever:13} {step.description}")

    say("5/6 starting the planned replica: model server + batching sidecar (ragged batching) + exact cache")
    planned, variant = next(
        (p, v) for p in profiles if (v := p.variant(w.variant)) is not None and service_curve(v) == w.curve
    )
    # The replica runs on the CPUs its profile was measured on: the pod's, or the whole machine's.
    replica_cpus = server_cpus if planned.threads == pod_vcpus else None
    served_model = build_planned_variant(
        ref.model, read_npz(ref.evaluation), w.variant, variant.recipe, work / "variants"
    )
    # The rate one replica's model carries at the daily peak under this plan (after cache hits), and what
    # clients send for it: the campaign's requests, 18 % of them repeats the cache answers.
    model_rate = max(result.hourly_rps) * (1 - result.hit_rate) / w.replicas_peak
    predicted_p95 = float(simulate([w.curve], [w.policy], np.array([model_rate]), 95, options.overhead_ms)[0][0])
    with local_redis(cpus=replica_cpus) as redis_url:
        rate = model_rate / (1 - result.hit_rate) if redis_url else model_rate
        if redis_url:
            say(f"    cache: a redis-server of its own ({redis_url}); the load repeats 18 % of its requests")
        else:
            say("    cache: off (redis-server is not installed): the load is the model's share only")
        bodies = write_campaign(work / "campaign.jsonl", int(rate * load_seconds * 1.2) + 100)
        with serving_stack(
            served_model, "text", w.policy, cpus=replica_cpus, redis_url=redis_url or "", pad_inputs=PAD_INPUTS
        ) as url:
            say(
                f"6/6 loading it with the campaign's requests at its planned peak, {rate:.1f} req/s "
                f"({model_rate:.1f} req/s reach the model), for {load_seconds:g} s"
            )
            observed = observed_load_test(
                url,
                bodies,
                rate,
                load_seconds,
                campaign.metadata.name,
                say,
                prometheus=find_prometheus(),
                client_cpus=client_cpus,
            )
    measured = observed.measured
    error = measured.p95_ms / predicted_p95 - 1 if predicted_p95 else float("nan")
    sla_met = measured.p95_ms <= spec.sla.latency.target_ms and measured.errors == 0
    say(
        f"    predicted p95 {predicted_p95:.1f} ms, measured p95 {measured.p95_ms:.1f} ms ({error:+.0%}); "
        f"offered {measured.offered_rps:.1f} req/s, served {measured.achieved_rps:.1f} req/s, "
        f"errors {measured.errors:.1%}; SLA {'met' if sla_met else 'MISSED'}"
    )
    baseline = result.waterfall[0].cost_per_million
    say(
        f"    cost per 1M requests (the plan, over the day's traffic): ${w.cost_per_million:.4f} against "
        f"${baseline:.4f} for the naive baseline: {baseline / w.cost_per_million:.1f}x cheaper"
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
    return {
        "model": "text (MiniLM + head), reviews of realistic length",
        "accuracy_fp32": ref.accuracy,
        "review_tokens": {"median": float(np.median(lengths)), "p90": float(np.percentile(lengths, 90))},
        "plan": w.label(),
        "precision": w.variant,
        "accuracy_drop": round(w.quality_drop, 4),
        "int8_recipe": variant.recipe.compact() if variant.recipe else None,
        "pod": {"cpu_m": w.pod.millicpu if w.pod else None, "memory_mib": w.pod.memory_mib if w.pod else None},
        "max_batch": w.policy.max_batch,
        "max_wait_ms": w.policy.max_wait_ms,
        "predicted_capacity_rps": round(w.capacity_rps, 1),
        "offered_rps": round(rate, 1),
        "model_rps": round(model_rate, 1),
        "measured_served_rps": round(measured.achieved_rps, 1),
        "predicted_p95_ms": round(predicted_p95, 2),
        "measured_p95_ms": round(measured.p95_ms, 2),
        "p95_error": round(error, 3),
        "sla_met": sla_met,
        "cost_per_million": round(w.cost_per_million, 4),
        "baseline_cost_per_million": round(baseline, 4),
        "cost_cut": round(baseline / w.cost_per_million, 2),
        "lever_shares": lever_shares(result.waterfall),
        "waterfall": {s.lever: round(s.cost_per_million, 4) for s in result.waterfall},
        "replicas": {"min": min(w.replicas_hourly), "peak": w.replicas_peak, "nodes_peak": w.nodes_peak},
        **observer_figures(observed, w.price_per_hour),
        "pod_vcpus": pod_vcpus,
        "seconds": round(time.monotonic() - started, 1),
        "report": str(work / "report"),
    }
