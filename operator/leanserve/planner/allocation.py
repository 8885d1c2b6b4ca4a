"""What a replica costs: its pod's share of a node, priced the way OpenCost allocates a node's cost.

A replica is a pod with a CPU and a memory request, not a whole instance. OpenCost (the CNCF project
for Kubernetes cost allocation) charges a workload for what it reserves: the larger of its request and
its use, resource by resource. The planner knows requests, not use, and uses the simple form of that
rule: a pod pays the larger of its CPU share and its memory share of the node, times the node's hourly
price. The share is of the node's *allocatable* resources, what pods can request once the kubelet, the
OS and the daemonsets have their reserve, so the node's reserved overhead is paid by the pods on it in
proportion. A GPU pod takes the whole GPU node (the GPU is not shared), so it pays the whole node.

The reserve follows GKE's published formula for allocatable resources (the best documented of the
managed services; EKS and AKS reserve similar amounts), plus a fixed allowance for the daemonsets every
node runs (kube-proxy, the CNI, a metrics agent). A price table can give a type's reserve itself.

Everything here is pure arithmetic: sizes in, shares and prices out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from leanserve.planner.prices import InstanceType

#: GKE's CPU reserve: (cores up to, fraction of those cores) in order: 6 % of the first core, 1 % of the
#: second, 0.5 % of the third and fourth, 0.25 % of every core above four.
CPU_RESERVE_STEPS = ((1, 0.06), (2, 0.01), (4, 0.005), (math.inf, 0.0025))
#: GKE's memory reserve: (GiB up to, fraction of those GiB): 25 % of the first 4 GiB, 20 % of the next 4,
#: 10 % of the next 8, 6 % of the next 112, 2 % above 128 GiB; plus the kubelet's eviction threshold.
MEMORY_RESERVE_STEPS = ((4, 0.25), (8, 0.20), (16, 0.10), (128, 0.06), (math.inf, 0.02))
EVICTION_THRESHOLD_MIB = 100
#: What the node's daemonsets request (kube-proxy, the CNI agent, a metrics agent), on top of the reserve.
DAEMONSET_MILLICPU = 100
DAEMONSET_MEMORY_MIB = 200

#: The sidecar's memory request (MiB); the semantic cache holds an embedder and an index.
SIDECAR_MEMORY_MIB = 512
SIDECAR_SEMANTIC_MEMORY_MIB = 1024
#: The model server's memory request floor (MiB); above it, twice the model's measured resident memory.
MODEL_MEMORY_FLOOR_MIB = 1024


@dataclass(frozen=True)
class Resources:
    """CPU (millicores) and memory (MiB): a pod's requests or a node's allocatable."""

    millicpu: int
    memory_mib: int

    def fits(self, node: Resources) -> bool:
        return self.millicpu <= node.millicpu and self.memory_mib <= node.memory_mib


def _stepped(amount: float, steps: tuple[tuple[float, float], ...]) -> float:
    """The reserve of ``amount`` under a stepped schedule (each step's fraction of the part within it)."""
    reserved, below = 0.0, 0.0
    for upto, fraction in steps:
        part = min(amount, upto) - below
        if part <= 0:
            break
        reserved += part * fraction
        below = upto
    return reserved


def allocatable(itype: InstanceType) -> Resources:
    """What pods can request on a node of ``itype``: its capacity less the system reserve and the daemonsets."""
    if itype.reserved_millicpu is not None:
        reserved_cpu = itype.reserved_millicpu
    else:
        reserved_cpu = math.ceil(_stepped(itype.vcpus, CPU_RESERVE_STEPS) * 1000) + DAEMONSET_MILLICPU
    if itype.reserved_memory_mi_b is not None:
        reserved_mem = itype.reserved_memory_mi_b
    else:
        stepped = _stepped(itype.memory_gi_b, MEMORY_RESERVE_STEPS) * 1024
        reserved_mem = math.ceil(stepped) + EVICTION_THRESHOLD_MIB + DAEMONSET_MEMORY_MIB
    return Resources(max(0, itype.vcpus * 1000 - reserved_cpu), max(0, int(itype.memory_gi_b * 1024) - reserved_mem))


def model_memory_mib(rss_mb: float | None) -> int:
    """The model server's memory request: twice the resident memory the bench measured (ONNX Runtime's
    arena grows with the batch), in 256 MiB steps, at least MODEL_MEMORY_FLOOR_MIB."""
    return max(MODEL_MEMORY_FLOOR_MIB, math.ceil((rss_mb or 0) * 2 / 256) * 256)


def sidecar_millicpu(pod_millicpu: int) -> int:
    """The sidecar's part of a pod's CPU: half a core below 4 vCPUs, one core from 4, as before pod sizes.
    Never less: the front door parses, checks and batches every request under a limit equal to its request;
    a 250m sidecar (a quarter of a 1-vCPU pod) was the one change in the serving pod when the kind e2e's
    rollout under a steady 75 req/s stopped finishing."""
    return 500 if pod_millicpu < 4000 else 1000


def replica_pod(vcpus: int, rss_mb: float | None, semantic_cache: bool, itype: InstanceType) -> Resources:
    """The pod of one replica on ``itype``, measured at ``vcpus``: the model server and the sidecar shared
    them in the bench's stack run, as they share the pod; memory is both containers' requests.

    A profile measured with every vCPU of the type is a pod that takes the whole node: it requests all of
    the node's allocatable CPU (its threads round up to the cores it was measured on), one per node, as
    the operator has always run it. So is a GPU replica: the GPU is not shared.
    """
    sidecar = SIDECAR_SEMANTIC_MEMORY_MIB if semantic_cache else SIDECAR_MEMORY_MIB
    memory = model_memory_mib(rss_mb) + sidecar
    node = allocatable(itype)
    if itype.is_gpu or vcpus * 1000 > node.millicpu:
        return Resources(node.millicpu, memory)
    return Resources(vcpus * 1000, memory)


def node_share(pod: Resources, itype: InstanceType) -> float:
    """The fraction of the node a pod is charged for: the larger of its CPU and memory shares of the
    allocatable resources; a whole GPU node for a GPU pod. Above 1 when the pod does not fit."""
    node = allocatable(itype)
    if node.millicpu <= 0 or node.memory_mib <= 0:
        return math.inf
    share = max(pod.millicpu / node.millicpu, pod.memory_mib / node.memory_mib)
    return max(share, 1.0) if itype.is_gpu else share


def replica_price(pod: Resources, itype: InstanceType) -> float:
    """USD per hour of one replica: its node share times the node's on-demand price (OpenCost's allocation)."""
    return node_share(pod, itype) * itype.on_demand_usd_per_hour


def replicas_per_node(pod: Resources, itype: InstanceType) -> int:
    """How many such pods one node of ``itype`` holds (one per GPU node); 0 when one does not fit."""
    node = allocatable(itype)
    if pod.millicpu <= 0 or pod.memory_mib <= 0:
        return 0
    fit = min(node.millicpu // pod.millicpu, node.memory_mib // pod.memory_mib)
    return min(fit, 1) if itype.is_gpu else fit


def nodes_for(replicas: int, per_node: int) -> int:
    """Whole nodes ``replicas`` pods pack onto at ``per_node`` each (bin packing of equal pods is exact)."""
    return math.ceil(replicas / per_node) if per_node > 0 and replicas > 0 else 0
