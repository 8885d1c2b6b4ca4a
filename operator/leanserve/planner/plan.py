"""plan_deployment: every candidate (instance type x precision x batching policy) sized, priced,
checked against the SLA, the accuracy gate, the budget and memory, ranked; plus the savings waterfall.

Pure: profiles, prices and the spec in, a PlanResult out. What a configuration can do is simulated
once per EvaluationMemo, which the caller holds when it plans again (the operator keeps one).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np

from leanserve.api.spec import InferenceDeploymentSpec
from leanserve.planner import allocation
from leanserve.planner.allocation import Resources
from leanserve.planner.latency import Policy, ServiceCurve, max_rate, simulate
from leanserve.planner.prices import InstanceType, PriceTable
from leanserve.planner.unavailable import Unavailable
from leanserve_serving.profile import Profile, QuantRecipe, VariantProfile

HOURS_PER_MONTH = 730.0

#: The batching policies searched when batching is auto (max batch, max wait in ms); (1, 0) is "off".
AUTO_POLICIES: tuple[Policy, ...] = (
    Policy(1, 0.0),
    *tuple(Policy(b, w) for b in (4, 8, 16, 32, 64, 128) for w in (2.0, 10.0)),
)

#: Bench variant -> the spec's precision names.
PRECISION_OF = {"fp32": "fp32", "int8-dynamic": "int8", "int8-static": "int8", "fp16": "fp16"}


#: The utilization PlanOptions.front_door_rps was calibrated at (its default max_utilization).
CALIBRATED_UTILIZATION = 0.8


@dataclass(frozen=True)
class PlanOptions:
    overhead_ms: float = 1.0
    """Per-request time outside the model (HTTP, JSON, queueing in the sidecar), added to predictions for
    profiles whose bench did not run the serving stack (those that did carry the measured figures)."""
    max_utilization: float = CALIBRATED_UTILIZATION
    front_door_rps: float = 1500.0
    """Ceiling of one replica's sidecar (HTTP + JSON in one Python process), whatever the model's speed, for
    profiles without a stack run (a stack run measures the ceiling with the rest).
    Calibrated here: benchmarks/planner_accuracy.py measured 1.25-1.8 k req/s for the whole stack under
    Poisson load on 2 cores shared with the load generator (closed-loop hey on 32 kept-alive
    connections reaches 9-10 k, see benchmarks/serving.py). Raise it for dedicated cores."""
    observed_hit_rate: float | None = None
    """Replaces the spec's expected cache hit rate once one is observed."""
    unavailable: dict[str, Unavailable] = field(default_factory=dict)
    """Instance types to leave out, with why (what profiling found)."""
    requests: int = 3000


@dataclass
class Candidate:
    instance_type: str
    variant: str
    policy: Policy
    price_per_hour: float
    """USD per hour of one replica: its pod's share of the node times the node's price (planner.allocation)."""
    is_gpu: bool
    quality_drop: float
    node_price_per_hour: float = 0.0
    """USD per hour of a whole node of the type (what a replica costs when it has a node to itself)."""
    pod: Resources | None = None
    """One replica's requests: the vCPUs its profile was measured with, and both containers' memory."""
    replicas_per_node: int = 0
    """How many replicas one node holds (0: the pod does not fit the node's allocatable resources)."""
    capacity_rps: float = 0.0
    latency_ms: float = float("nan")
    mean_batch: float = 1.0
    replicas_hourly: list[int] = field(default_factory=list)
    monthly_cost: float = float("inf")
    cost_per_million: float = float("inf")
    reason: str = ""
    replicas_min: int = 0
    """The autoscaler's floor: the warm pool, at least one."""
    replicas_max: int = 0
    """The autoscaler's ceiling: maxReplicas, else the peak sizing plus a quarter; within the monthly budget."""
    memory_mb: float | None = None
    """The variant's resident memory as the bench measured it (what the model server's memory is sized by)."""
    recipe: QuantRecipe | None = field(default=None, repr=False, compare=False)
    """How the INT8 variant was built (the accuracy-aware search's recipe), for whoever builds it to serve."""
    curve: ServiceCurve | None = field(default=None, repr=False, compare=False)
    """The service times the candidate was simulated with (for charts of latency against load)."""

    @property
    def precision(self) -> str:
        return PRECISION_OF[self.variant]

    @property
    def feasible(self) -> bool:
        return not self.reason

    @property
    def replicas_peak(self) -> int:
        return max(self.replicas_hourly) if self.replicas_hourly else 0

    @property
    def replicas_average(self) -> float:
        return float(np.mean(self.replicas_hourly)) if self.replicas_hourly else 0.0

    @property
    def pod_vcpus(self) -> int | None:
        return self.pod.millicpu // 1000 if self.pod else None

    @property
    def nodes_peak(self) -> int:
        """Whole nodes the peak's replicas pack onto."""
        return allocation.nodes_for(self.replicas_peak, self.replicas_per_node)

    def label(self) -> str:
        batching = (
            "no batching"
            if self.policy.max_batch == 1
            else f"batch<={self.policy.max_batch}/{self.policy.max_wait_ms:g}ms"
        )
        size = f" {self.pod.millicpu / 1000:g} vCPU" if self.pod and not self.is_gpu else ""
        return f"{self.instance_type}{size} {self.variant} {batching}"


@dataclass
class SavingsStep:
    lever: str
    cost_per_million: float
    description: str


@dataclass
class PlanResult:
    winner: Candidate | None
    candidates: list[Candidate]
    """Every candidate considered, feasible ones first, cheapest first."""
    waterfall: list[SavingsStep]
    infeasible: str = ""
    """When there is no winner: which constraint binds and by how much."""
    hourly_rps: list[float] = field(default_factory=list)
    hit_rate: float = 0.0


def traffic_shape(spec: InferenceDeploymentSpec) -> list[float]:
    """Requests per second for each of the 24 hours: the declared profile, or a daily wave.

    The default wave peaks at 14:00 UTC with exactly peakRps and averages exactly
    averageRps: a raised cosine, sharpened (squared, cubed, ...) until its trough
    stays at or above zero for the given peak-to-average ratio.
    """
    t = spec.traffic
    if t.daily_profile is not None:
        return [f * t.average_rps for f in t.daily_profile]
    peak, average = t.effective_peak_rps(), t.average_rps
    hours = np.arange(24)
    for sharpness in range(1, 64):
        g = ((1 + np.cos(2 * np.pi * (hours - 14) / 24)) / 2) ** sharpness
        if g.mean() <= average / peak or peak == average:
            break
    amplitude = (peak - average) / (1 - g.mean()) if peak > average else 0.0
    floor = peak - amplitude
    return [float(max(0.0, floor + amplitude * x)) for x in g]


def service_curve(variant: VariantProfile) -> ServiceCurve:
    """The service time of a batch by size: through the whole serving stack where the bench measured it,
    else the model's own time (plus, at sizes beyond the stack run, the stack's cost at its largest size)."""
    points = sorted(variant.latency, key=lambda p: p.batch_size)
    model_ms = [p.batch_size / p.throughput_rps * 1000 for p in points]
    stack = variant.stack
    if stack is None or all(p.stack_ms is None for p in points):
        return ServiceCurve(tuple(p.batch_size for p in points), tuple(model_ms))
    means, extra = [], 0.0
    for p, alone in zip(points, model_ms, strict=True):
        if p.stack_ms is not None:
            extra = max(0.0, p.stack_ms - alone)
            means.append(p.stack_ms)
        else:
            means.append(alone + extra)
    return ServiceCurve(tuple(p.batch_size for p in points), tuple(means), tuple(stack.jitter), tuple(stack.outside_ms))


def _policies(spec: InferenceDeploymentSpec, largest_measured: int) -> list[Policy]:
    b = spec.batching
    if b.mode == "off":
        return [Policy(1, 0.0)]
    if b.mode == "fixed":
        return [Policy(int(b.max_batch_size or 1), float(b.max_wait_ms or 0.0))]
    cap = min(b.max_batch_size or largest_measured, largest_measured)
    return [p for p in AUTO_POLICIES if p.max_batch <= cap]


def _size(rates: list[float], capacity: float, warm_pool: int, always_on_peak: bool) -> list[int]:
    if capacity <= 0:
        return []
    if always_on_peak:
        return [max(warm_pool, math.ceil(max(rates) / capacity))] * len(rates)
    return [max(warm_pool, math.ceil(r / capacity)) for r in rates]


def _price(c: Candidate, replicas: list[int], average_rps: float) -> tuple[float, float]:
    monthly = sum(replicas) / len(replicas) * c.price_per_hour * HOURS_PER_MONTH
    requests_per_month = average_rps * 3600 * HOURS_PER_MONTH
    return monthly, monthly / (requests_per_month / 1e6)


def plan_deployment(
    spec: InferenceDeploymentSpec,
    profiles: list[Profile],
    prices: PriceTable,
    options: PlanOptions | None = None,
    memo: EvaluationMemo | None = None,
) -> PlanResult:
    """The cheapest candidate that meets every constraint, the ranked table, and the savings waterfall.

    ``memo`` carries simulations over from earlier plans (a fresh one when not given).
    """
    options = options or PlanOptions()
    memo = EvaluationMemo() if memo is None else memo
    by_type: dict[str, list[Profile]] = {}
    for p in profiles:
        by_type.setdefault(p.instance_type, []).append(p)
    names = spec.candidates or [t.name for t in prices.instance_types]
    rejected: list[Candidate] = []
    pending: list[tuple[Candidate, ServiceCurve]] = []
    wanted = spec.precision
    for name in names:
        itype: InstanceType | None = prices.get(name)
        stub = Candidate(
            instance_type=name,
            variant="fp32",
            policy=Policy(1, 0.0),
            price_per_hour=itype.on_demand_usd_per_hour if itype else 0.0,
            is_gpu=bool(itype and itype.is_gpu),
            quality_drop=0.0,
            node_price_per_hour=itype.on_demand_usd_per_hour if itype else 0.0,
        )
        if itype is None:
            rejected.append(replace(stub, reason="not in the price table"))
            continue
        if name in options.unavailable:
            rejected.append(replace(stub, reason=options.unavailable[name].reason))
            continue
        if name not in by_type:
            rejected.append(replace(stub, reason="no profile measured on this type"))
            continue
        for profile in by_type[name]:
            for v in profile.variants:
                if v.status != "ok" or not v.latency:
                    continue
                if wanted != "auto" and PRECISION_OF[v.name] != wanted:
                    continue
                base = _sized(stub, itype, profile, v, spec.cache.semantic.enabled)
                if v.name != "fp32" and (v.quality_drop or 0.0) > spec.sla.max_accuracy_drop:
                    gate = f"accuracy gate: drop {v.quality_drop:.4f} > {spec.sla.max_accuracy_drop:g}"
                    rejected.append(replace(base, reason=gate))
                    continue
                if v.recipe is not None and v.recipe.excluded_count != len(v.recipe.nodes_excluded):
                    partial = (
                        "recipe incomplete: the profile lists only some of the nodes its INT8 variant keeps in fp32"
                    )
                    rejected.append(replace(base, reason=partial))
                    continue
                curve = service_curve(v)
                for policy in _policies(spec, max(curve.batch_sizes)):
                    pending.append((replace(base, policy=policy, curve=curve), curve))
    rates = traffic_shape(spec)
    hit = options.observed_hit_rate
    if hit is None:
        hit = spec.cache.exact.expected_hit_rate if spec.cache.exact.enabled else 0.0
    served = [r * (1 - hit) for r in rates]
    percentile, target = spec.sla.latency.percentile, spec.sla.latency.target_ms
    evaluated: list[Candidate] = []
    for (cand, _), (cap, lat, mb) in zip(pending, memo.evaluate(pending, percentile, target, options), strict=True):
        cand.capacity_rps, cand.latency_ms, cand.mean_batch = cap, lat, mb
        evaluated.append(cand)
    warm = spec.autoscaling.warm_pool
    for cand in evaluated:
        if cand.capacity_rps <= 0:
            cand.reason = f"SLA: p{percentile:g} {cand.latency_ms:.1f} ms > {target:g} ms even at low load"
            continue
        cand.replicas_hourly = _size(served, cand.capacity_rps, max(warm, 1), False)
        cand.monthly_cost, cand.cost_per_million = _price(cand, cand.replicas_hourly, spec.traffic.average_rps)
        cand.replicas_min, cand.replicas_max = replica_bounds(spec, cand)
        cand.reason = cand.reason or _budget_reason(spec, cand)
    ranked = sorted(evaluated, key=rank_key) + rejected
    winner = ranked[0] if ranked and ranked[0].feasible else None
    result = PlanResult(winner, ranked, [], hourly_rps=rates, hit_rate=hit)
    if winner is None:
        result.infeasible = _why_infeasible(spec, ranked)
    else:
        result.waterfall = savings_waterfall(spec, evaluated, winner, rates, hit, warm)
    return result


def _sized(
    stub: Candidate, itype: InstanceType, profile: Profile, variant: VariantProfile, semantic_cache: bool
) -> Candidate:
    """A candidate of ``variant`` with its replica's pod and price: the pod takes the vCPUs the profile was
    measured with (never a size nobody measured), or the whole node when that is all of it; a GPU replica
    takes its node. A pod that does not fit the node is kept, priced as a whole node, with the reason."""
    pod = allocation.replica_pod(profile.threads, variant.rss_mb, semantic_cache, itype)
    per_node = allocation.replicas_per_node(pod, itype)
    sized = replace(
        stub,
        variant=variant.name,
        quality_drop=variant.quality_drop or 0.0,
        memory_mb=variant.rss_mb,
        recipe=variant.recipe,
        pod=pod,
        replicas_per_node=per_node,
        price_per_hour=allocation.replica_price(pod, itype) if per_node else itype.on_demand_usd_per_hour,
    )
    if per_node == 0:
        node = allocation.allocatable(itype)
        short = "memory" if pod.memory_mib > node.memory_mib else "cpu"
        sized.reason = (
            f"{short}: the pod ({pod.millicpu / 1000:g} vCPU, {pod.memory_mib} MiB) does not fit what "
            f"{itype.name} allocates to pods ({node.millicpu / 1000:g} vCPU, {node.memory_mib} MiB)"
        )
    return sized


def rank_key(c: Candidate) -> tuple[bool, float, float, float]:
    """Feasible first, then cheaper; between equal costs, the smaller accuracy drop, then the lower latency."""
    return (not c.feasible, round(c.cost_per_million, 9), c.quality_drop, c.latency_ms)


def replica_bounds(spec: InferenceDeploymentSpec, cand: Candidate) -> tuple[int, int]:
    """(min, max) replicas of the autoscaler for a sized candidate.

    min is the warm pool, at least 1 (an HPA's minReplicas 0 needs an alpha
    feature; on GPU types a cold start takes minutes). max is maxReplicas when
    set, otherwise the peak sizing plus a quarter for headroom; either way no
    more than the monthly budget pays for if it ran all month, and never below min.
    """
    low = max(spec.autoscaling.warm_pool, 1)
    high = spec.autoscaling.max_replicas or max(cand.replicas_peak, math.ceil(cand.replicas_peak * 1.25))
    if spec.budget.max_monthly_cost is not None and cand.price_per_hour > 0:
        affordable = int(spec.budget.max_monthly_cost // (cand.price_per_hour * HOURS_PER_MONTH))
        high = min(high, affordable)
    return low, max(high, low)


class EvaluationMemo:
    """(curve, policy, SLA, options) -> (capacity, latency at that capacity, mean batch), simulated once.

    What a configuration can do does not depend on the traffic, so an operator
    re-planning after a traffic change, or planning many deployments of the same
    model, simulates each configuration once. An object the caller holds (not a
    module global) so that the planner stays pure and a test starts from nothing.
    Bounded: the oldest entries go first.
    """

    def __init__(self, max_entries: int = 50_000) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, tuple[float, float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def evaluate(
        self, pending: list[tuple[Candidate, ServiceCurve]], percentile: float, target: float, options: PlanOptions
    ) -> list[tuple[float, float, float]]:
        """Capacity per replica, the latency predicted there and the mean batch, for each pending configuration."""
        settings = (
            percentile,
            target,
            options.overhead_ms,
            options.max_utilization,
            options.requests,
            options.front_door_rps,
        )
        keys = [(curve, cand.policy, *settings) for cand, curve in pending]
        missing = list(dict.fromkeys(k for k in keys if k not in self._entries))
        if missing:
            for key, figures in zip(missing, _simulate(missing, percentile, target, options), strict=True):
                self._entries[key] = figures
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return [self._entries[k] for k in keys]


def _simulate(
    keys: list[tuple], percentile: float, target: float, options: PlanOptions
) -> list[tuple[float, float, float]]:
    curves = [k[0] for k in keys]
    policies = [k[1] for k in keys]
    capacity = max_rate(
        curves,
        policies,
        percentile,
        target,
        options.overhead_ms,
        max_utilization=options.max_utilization,
        requests=options.requests,
    )
    # The front door's ceiling is inside curves measured through the stack; the others get the constant.
    # The constant was calibrated for the default utilization: a replica planned to run cooler (after SLA
    # misses) gets a lower ceiling in proportion.
    door = options.front_door_rps * options.max_utilization / CALIBRATED_UTILIZATION
    ceiling = np.array([np.inf if c.measured_stack else door for c in curves])
    capacity = np.minimum(capacity, ceiling)
    # The latency predicted at the rate each replica is planned to carry (a trickle where none is possible).
    probe = np.where(capacity > 0, capacity, 1e-3)
    latency, batch = simulate(curves, policies, probe, percentile, options.overhead_ms, options.requests)
    return [(float(c), float(lt), float(b)) for c, lt, b in zip(capacity, latency, batch, strict=True)]


def _budget_reason(spec: InferenceDeploymentSpec, c: Candidate) -> str:
    b = spec.budget
    max_replicas = spec.autoscaling.max_replicas
    if max_replicas is not None and c.replicas_peak > max_replicas:
        return f"needs {c.replicas_peak} replicas at peak > maxReplicas {max_replicas}"
    if b.max_cost_per_million_requests is not None and c.cost_per_million > b.max_cost_per_million_requests:
        return f"over budget: ${c.cost_per_million:.2f}/1M > ${b.max_cost_per_million_requests:g}/1M"
    if b.max_monthly_cost is not None and c.monthly_cost > b.max_monthly_cost:
        return f"over budget: ${c.monthly_cost:.0f}/month > ${b.max_monthly_cost:g}/month"
    return ""


def _why_infeasible(spec: InferenceDeploymentSpec, ranked: list[Candidate]) -> str:
    if not ranked:
        return "no candidates: the spec names no instance type with a price"
    priced = [c for c in ranked if math.isfinite(c.cost_per_million)]
    if priced:
        best = min(priced, key=lambda c: c.cost_per_million)
        b = spec.budget
        if b.max_cost_per_million_requests is not None and best.cost_per_million > b.max_cost_per_million_requests:
            over = best.cost_per_million / b.max_cost_per_million_requests - 1
            return (
                f"no feasible plan: budget binds: the cheapest candidate meeting the SLA ({best.label()}) "
                f"costs ${best.cost_per_million:.2f}/1M, {over:.0%} over maxCostPerMillionRequests"
            )
        if b.max_monthly_cost is not None and best.monthly_cost > b.max_monthly_cost:
            over = best.monthly_cost / b.max_monthly_cost - 1
            return (
                f"no feasible plan: budget binds: the cheapest candidate meeting the SLA ({best.label()}) "
                f"costs ${best.monthly_cost:.0f}/month, {over:.0%} over maxMonthlyCost"
            )
        return f"no feasible plan: {best.reason} ({best.label()})"
    sla = [c for c in ranked if c.reason.startswith("SLA")]
    if sla:
        best = min(sla, key=lambda c: c.latency_ms)
        target = spec.sla.latency.target_ms
        return (
            f"no feasible plan: the latency SLA binds: the fastest candidate ({best.label()}) predicts "
            f"{best.latency_ms:.1f} ms, {best.latency_ms / target - 1:.0%} over {target:g} ms"
        )
    reasons = sorted({c.reason.split(":")[0] for c in ranked})
    return "no feasible plan: every candidate was rejected (" + ", ".join(reasons) + ")"


def savings_waterfall(
    spec: InferenceDeploymentSpec,
    evaluated: list[Candidate],
    winner: Candidate,
    rates: list[float],
    hit: float,
    warm: int,
) -> list[SavingsStep]:
    """Cost per 1M from the naive baseline through each lever in turn to the plan.

    Baseline: what a team runs before optimizing: the default CPU type (the first CPU type considered),
    fp32, no batching, no cache, one replica per node (the largest pod measured on that type, paying the
    whole node), always on and sized for peak. Then the plan's own choices, one lever at a time, so that
    the steps add up to the plan: its precision, its batching (both on the baseline's node), the cache,
    hourly autoscaling, and last right-sizing (the plan's pod size and instance type, priced by the pod's
    share of its node), whose value shows once replicas follow the traffic hour by hour. A lever the
    plan's choice makes dearer at its step (a smaller pod sized always-on for peak) shows as a rise.
    """
    avg = spec.traffic.average_rps
    usable = [c for c in evaluated if c.capacity_rps > 0]

    def cost(c: Candidate, with_cache: bool, autoscale: bool, whole_node: bool) -> float:
        served = [r * (1 - hit) for r in rates] if with_cache else rates
        replicas = _size(served, c.capacity_rps, max(warm, 1), not autoscale)
        price = c.node_price_per_hour if whole_node else c.price_per_hour
        return _price(replace(c, price_per_hour=price), replicas, avg)[1]

    def naive(c: Candidate) -> float:
        return cost(c, False, False, True)

    cpu = [c for c in usable if not c.is_gpu]
    base_type = (cpu or usable)[0].instance_type
    on_type = [c for c in usable if c.instance_type == base_type]
    largest = max(c.pod.millicpu if c.pod else 0 for c in on_type)
    on_base = [c for c in on_type if (c.pod.millicpu if c.pod else 0) == largest]
    unbatched = [c for c in on_base if c.policy.max_batch == 1]
    baseline = next((c for c in unbatched if c.variant == "fp32"), None) or min(unbatched or on_base, key=naive)
    node = f"{base_type}, one replica per node"
    steps = [SavingsStep("baseline", naive(baseline), f"{node}, fp32, no batching, no cache, always on for peak")]
    quant = next((c for c in unbatched if c.variant == winner.variant), None) or min(unbatched or [baseline], key=naive)
    steps.append(SavingsStep("quantization", naive(quant), f"{quant.variant}, {node}"))
    same_variant = [c for c in on_base if c.variant == quant.variant] or [quant]
    batched = next((c for c in same_variant if c.policy == winner.policy), None) or min(same_variant, key=naive)
    steps.append(SavingsStep("batching", naive(batched), f"{batched.label()}, one replica per node"))
    steps.append(
        SavingsStep("caching", cost(batched, True, False, True), f"{hit:.0%} of requests answered from the cache")
    )
    hourly = cost(batched, True, True, True)
    steps.append(SavingsStep("autoscaling", hourly, f"hourly replicas, warm pool {warm}, one replica per node"))
    steps.append(SavingsStep("right-sizing", winner.cost_per_million, _sizing(winner)))
    steps.append(SavingsStep("plan", winner.cost_per_million, winner.label()))
    return steps


def _sizing(c: Candidate) -> str:
    """How a right-sized replica is priced, in words."""
    if c.pod is None or c.replicas_per_node == 0:
        return c.label()
    share = c.price_per_hour / c.node_price_per_hour if c.node_price_per_hour else 1.0
    return (
        f"{c.label()}: a pod of {c.pod.millicpu / 1000:g} vCPU and {c.pod.memory_mib} MiB pays {share:.0%} "
        f"of the node ({c.replicas_per_node} per node)"
    )
