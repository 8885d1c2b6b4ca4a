"""What the operator runs with: images, prices, planner options, and the planner's memo.

Named OperatorConfig, not OperatorSettings: kopf has an OperatorSettings of its
own, and the startup handler holds both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from leanserve import __version__
from leanserve.controller.builders import BuildSettings
from leanserve.planner.plan import EvaluationMemo, PlanOptions
from leanserve.planner.prices import PriceTable, load_prices


@dataclass(frozen=True)
class OperatorConfig:
    """The operator's configuration (from the environment by default) and the state it keeps across reconciles.

    ``memo`` is the one piece of state: simulations of what each configuration can
    do, kept so that re-planning a model does not simulate again (a cache: plans
    are the same with or without it).
    """

    build: BuildSettings = field(default_factory=BuildSettings)
    prices: PriceTable = field(default_factory=load_prices)
    plan_options: PlanOptions = field(default_factory=PlanOptions)
    image_version: str = __version__
    memo: EvaluationMemo = field(default_factory=EvaluationMemo, compare=False, repr=False)
    prometheus_url: str | None = None
    """Where the observer reads what deployments actually do; None: nothing is observed (Observed=False)."""

    @classmethod
    def from_environment(cls, custom_metrics: bool = False) -> OperatorConfig:
        """LEANSERVE_SERVING_IMAGE, LEANSERVE_GPU_IMAGE, LEANSERVE_REDIS_IMAGE, LEANSERVE_PRICES (a file),
        LEANSERVE_PROMETHEUS_URL."""
        env = os.environ
        defaults = BuildSettings()
        build = BuildSettings(
            image=env.get("LEANSERVE_SERVING_IMAGE", defaults.image),
            gpu_image=env.get("LEANSERVE_GPU_IMAGE", defaults.gpu_image),
            redis_image=env.get("LEANSERVE_REDIS_IMAGE", defaults.redis_image),
            custom_metrics=custom_metrics,
        )
        prices_file = env.get("LEANSERVE_PRICES")
        prices = load_prices(Path(prices_file) if prices_file else None)
        return cls(build=build, prices=prices, prometheus_url=env.get("LEANSERVE_PROMETHEUS_URL") or None)
