"""The serving stack as local processes, batching by a planner :class:`Policy`, for people without a cluster.

Used by ``leanserve serve``, ``leanserve demo`` and ``benchmarks/planner_accuracy.py``. Why a module of
its own rather than calls to ``leanserve_serving.local``: the processes belong to the serving image, which
never imports the operator, while the operator's callers hold the batching the planner chose as one value,
a :class:`Policy` (the plan's ``policy``); this is the one place where it becomes the sidecar's two
settings, so no caller unpacks it by hand. ``free_port`` and ``wait_ready`` are re-exported for the
serving tests' harness (tests/serving_harness.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from leanserve.planner.latency import Policy
from leanserve_serving import local
from leanserve_serving.local import Supervision, free_port, wait_ready

__all__ = ["Supervision", "free_port", "serving_stack", "wait_ready"]


@contextlib.contextmanager
def serving_stack(
    model: Path,
    name: str,
    policy: Policy,
    *,
    port: int | None = None,
    redis_url: str = "",
    quiet: bool = True,
    cpus: local.CPUs = None,
    supervision: Supervision | None = None,
    pad_inputs: dict[str, float] | None = None,
) -> Iterator[str]:
    """The model server and the sidecar with ``policy``'s batching (on ``cpus``); yields the infer URL.

    With ``supervision``, the model server is restarted when it exits, as a kubelet would."""
    with local.serving_stack(
        model,
        name,
        max_batch=policy.max_batch,
        max_wait_ms=policy.max_wait_ms,
        port=port,
        redis_url=redis_url,
        quiet=quiet,
        cpus=cpus,
        supervision=supervision,
        pad_inputs=pad_inputs,
    ) as url:
        yield url
