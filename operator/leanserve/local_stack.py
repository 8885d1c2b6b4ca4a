"""The serving stack as local processes, for people without a cluster (leanserve serve, leanserve demo)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from leanserve.planner.latency import Policy
from leanserve_serving import local
from leanserve_serving.local import free_port, wait_ready

__all__ = ["free_port", "serving_stack", "wait_ready"]


@contextlib.contextmanager
def serving_stack(
    model: Path, name: str, policy: Policy, port: int | None = None, redis_url: str = "", quiet: bool = True,
    cpus: local.CPUs = None,
) -> Iterator[str]:  # fmt: skip
    """The model server and the sidecar with ``policy``'s batching (on ``cpus``); yields the infer URL."""
    with local.serving_stack(model, name, policy.max_batch, policy.max_wait_ms, port, redis_url, quiet,
                             cpus) as url:  # fmt: skip
        yield url
