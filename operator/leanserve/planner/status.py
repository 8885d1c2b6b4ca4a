"""A PlanResult in the API's status shapes (plan, ranked candidates, savings), for the CR and for JSON output."""

from __future__ import annotations

from leanserve.api.status import CandidateRow, PlanStatus, ReplicaPlan
from leanserve.api.status import SavingsStep as SavingsRow
from leanserve.planner.plan import Candidate, PlanResult


def _round(x: float, digits: int = 4) -> float | None:
    return None if x != x or x in (float("inf"), float("-inf")) else round(x, digits)


def plan_status(result: PlanResult) -> PlanStatus | None:
    """The winner as status.plan; its replica bounds are the autoscaler's (the planner sets them once)."""
    w = result.winner
    if w is None:
        return None
    batching = w.policy.max_batch > 1
    return PlanStatus(
        instance_type=w.instance_type,
        precision=w.variant,
        max_batch_size=w.policy.max_batch if batching else None,
        max_wait_ms=w.policy.max_wait_ms if batching else None,
        replicas=ReplicaPlan(
            min=w.replicas_min,
            max=w.replicas_max,
            average=_round(w.replicas_average, 2),
            peak=w.replicas_peak,
        ),
        capacity_rps_per_replica=_round(w.capacity_rps, 1),
        predicted_latency_ms=_round(w.latency_ms, 2),
        cost_per_million_requests=_round(w.cost_per_million),
        monthly_cost=_round(w.monthly_cost, 2),
        pod_cpu=f"{w.pod.millicpu}m" if w.pod else None,
        pod_memory=f"{w.pod.memory_mib}Mi" if w.pod else None,
        node_share=_round(w.price_per_hour / w.node_price_per_hour) if w.pod and w.node_price_per_hour else None,
        replicas_per_node=w.replicas_per_node or None,
        nodes_at_peak=w.nodes_peak or None,
    )


def candidate_rows(result: PlanResult, limit: int = 50) -> list[CandidateRow]:
    """The ranked table: the first ``limit`` rows (status objects have a size limit), plus the best row of
    every instance type not among them, so that each type considered shows why it lost."""

    def row(rank: int, c: Candidate) -> CandidateRow:
        batching = c.policy.max_batch > 1
        return CandidateRow(
            rank=rank,
            instance_type=c.instance_type,
            precision=c.variant,
            max_batch_size=c.policy.max_batch if batching else None,
            max_wait_ms=c.policy.max_wait_ms if batching else None,
            feasible=c.feasible,
            predicted_latency_ms=_round(c.latency_ms, 2),
            capacity_rps_per_replica=_round(c.capacity_rps, 1),
            replicas_average=_round(c.replicas_average, 2) if c.replicas_hourly else None,
            replicas_peak=c.replicas_peak if c.replicas_hourly else None,
            cost_per_million_requests=_round(c.cost_per_million),
            monthly_cost=_round(c.monthly_cost, 2),
            accuracy_drop=_round(c.quality_drop),
            reason=c.reason,
        )

    ranked = list(enumerate(result.candidates, start=1))
    shown = ranked[:limit]
    types = {c.instance_type for _, c in shown}
    for rank, c in ranked[limit:]:  # every instance type keeps its best row: a lost type says why it lost
        if c.instance_type not in types:
            shown.append((rank, c))
            types.add(c.instance_type)
    return [row(rank, c) for rank, c in shown]


def savings_rows(result: PlanResult) -> list[SavingsRow]:
    return [
        SavingsRow(lever=s.lever, cost_per_million_requests=round(s.cost_per_million, 4), description=s.description)
        for s in result.waterfall
    ]
