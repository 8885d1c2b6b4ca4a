"""Profiles for the simulated (kwok) node pools, standing in for the profiling Jobs of the next issue.

kwok nodes run no containers, so nothing can be measured "on" them. These are
real profiles measured on this machine (the tabular reference model, through
``run_bench``) and on the device machine's H200 (the committed fixture), with
the instance type relabelled to the pool they stand in for. Every profile made
here says so in its ``model_name``.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from leanserve_serving.profile import Profile

GPU_FIXTURE = Path(__file__).parent / "fixtures" / "profiles" / "tabular-nvidia-h200.json"
CPU_POOLS = ("m5.2xlarge", "c6i.2xlarge")
GPU_POOLS = ("g4dn.xlarge",)


@cache
def measured_here() -> Profile:
    """The tabular reference model benched on this machine (short runs: a few seconds)."""
    import tempfile

    from leanserve_serving.bench.run import BenchOptions, run_bench
    from leanserve_serving.reference_models import make_tabular

    work = Path(tempfile.mkdtemp(prefix="leanserve-stand-in-"))
    model = make_tabular(work)
    return run_bench(
        BenchOptions(
            model.model,
            model.evaluation,
            instance_type="local",
            variants=("fp32", "int8-dynamic"),
            seconds_per_point=0.02,
            max_batch=64,
        )
    )


def stand_in(profile: Profile, instance_type: str) -> Profile:
    return profile.model_copy(
        update={"instance_type": instance_type, "model_name": f"stand-in-for-{instance_type}-{profile.model_name}"}
    )


def stand_in_profiles(gpu: bool = True) -> list[Profile]:
    """One profile per kwok pool: this machine's measurement for the CPU pools, the H200's for the GPU pool."""
    cpu = [stand_in(measured_here(), t) for t in CPU_POOLS]
    if not gpu:
        return cpu
    h200 = Profile.model_validate_json(GPU_FIXTURE.read_text())
    return cpu + [stand_in(h200, t) for t in GPU_POOLS]
