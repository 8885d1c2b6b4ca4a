"""planner.allocation: what a replica's pod costs, as OpenCost allocates a node's price, and how pods pack.

Pure arithmetic, so property tests over instance types and pod sizes, and the reserve checked against
the figures GKE publishes for its allocatable resources.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leanserve.planner import allocation
from leanserve.planner.allocation import Resources
from leanserve.planner.prices import InstanceType, load_prices

PRICES = load_prices()


def cpu_type(vcpus: int, memory_gib: float, price: float = 0.1) -> InstanceType:
    return InstanceType(name="t", vcpus=vcpus, memory_gi_b=memory_gib, on_demand_usd_per_hour=price)


instance_types = st.builds(
    cpu_type,
    vcpus=st.integers(1, 192),
    memory_gib=st.floats(1, 1536, allow_nan=False),
    price=st.floats(0.001, 100, allow_nan=False),
)
pods = st.builds(Resources, millicpu=st.integers(100, 64_000), memory_mib=st.integers(64, 512_000))


def test_the_reserve_is_gkes_published_one():
    """GKE's examples: a 2-vCPU node keeps 70m (6 % + 1 %); 8 GiB keeps 1.8 GiB (25 % of 4, 20 % of 4) and the
    100 MiB eviction threshold; 32 GiB keeps 3.6 GiB (+ 10 % of 8, 6 % of 16). Daemonsets take 100m and 200 MiB."""
    m5_large = allocation.allocatable(PRICES.get("m5.large"))
    assert m5_large == Resources(2000 - 70 - 100, 8192 - math.ceil(1.8 * 1024) - 100 - 200)
    m5_2xlarge = allocation.allocatable(PRICES.get("m5.2xlarge"))
    assert m5_2xlarge.millicpu == 8000 - (60 + 10 + 5 + 5 + 4 * 2.5) - 100
    assert m5_2xlarge.memory_mib == 32768 - math.ceil((1 + 0.8 + 0.8 + 0.96) * 1024) - 300


def test_a_price_table_can_give_a_types_reserve_itself():
    itype = InstanceType.model_validate(
        {
            "name": "x",
            "vcpus": 4,
            "memoryGiB": 16,
            "onDemandUsdPerHour": 1,
            "reservedMillicpu": 0,
            "reservedMemoryMiB": 0,
        }
    )
    assert allocation.allocatable(itype) == Resources(4000, 16384)


def test_a_one_vcpu_replica_on_a_two_vcpu_node_pays_its_share_of_what_the_node_allocates():
    """1000m of m5.large's 1830m allocatable: 54.6 % of $0.096/h; memory (1.5 GiB of 5.9) is the smaller share.
    One fits per node: two would need 2000m."""
    pod = allocation.replica_pod(1, 100.0, False, PRICES.get("m5.large"))
    assert pod == Resources(1000, 1024 + 512)
    assert allocation.replica_price(pod, PRICES.get("m5.large")) == pytest.approx(0.096 * 1000 / 1830)
    assert allocation.replicas_per_node(pod, PRICES.get("m5.large")) == 1
    assert allocation.replicas_per_node(pod, PRICES.get("m5.2xlarge")) == 7


def test_a_profile_measured_on_every_vcpu_is_a_pod_that_takes_the_whole_node():
    itype = PRICES.get("c6i.xlarge")
    pod = allocation.replica_pod(4, None, False, itype)
    assert pod.millicpu == allocation.allocatable(itype).millicpu
    assert allocation.replica_price(pod, itype) == pytest.approx(itype.on_demand_usd_per_hour)
    assert allocation.replicas_per_node(pod, itype) == 1


def test_a_gpu_replica_pays_the_whole_node_and_one_runs_per_node():
    itype = PRICES.get("g4dn.xlarge")
    pod = allocation.replica_pod(1, 500.0, False, itype)
    assert allocation.replica_price(pod, itype) == itype.on_demand_usd_per_hour
    assert allocation.replicas_per_node(pod, itype) == 1


@settings(max_examples=300, deadline=None)
@given(itype=instance_types, pod=pods, more_cpu=st.integers(0, 8000), more_memory=st.integers(0, 64_000))
def test_a_larger_pod_on_the_same_node_never_costs_less(itype, pod, more_cpu, more_memory):
    larger = Resources(pod.millicpu + more_cpu, pod.memory_mib + more_memory)
    assert allocation.replica_price(larger, itype) >= allocation.replica_price(pod, itype)


@settings(max_examples=300, deadline=None)
@given(itype=instance_types, pod=pods)
def test_the_pods_one_node_holds_are_never_charged_more_than_the_node(itype, pod):
    per_node = allocation.replicas_per_node(pod, itype)
    if per_node:
        assert per_node * allocation.replica_price(pod, itype) <= itype.on_demand_usd_per_hour * (1 + 1e-9)
        assert pod.fits(allocation.allocatable(itype))
    else:
        assert not pod.fits(allocation.allocatable(itype))


@settings(max_examples=300, deadline=None)
@given(replicas=st.integers(0, 10_000), per_node=st.integers(1, 256))
def test_nodes_hold_every_replica_and_no_node_is_empty(replicas, per_node):
    nodes = allocation.nodes_for(replicas, per_node)
    assert nodes * per_node >= replicas
    assert (nodes - 1) * per_node < replicas or nodes == 0
