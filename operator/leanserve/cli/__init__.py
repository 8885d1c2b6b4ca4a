"""The ``leanserve`` command: one CLI, one subcommand per job, each in its own ``*_cmd`` module.

- ``validate``: check InferenceDeployment files against the API before applying them;
- ``crds``: write (or check) the CRD YAML generated from the API models;
- ``bench``: profile a model's precision variants on this machine (what the profiling Job runs);
- ``plan``: the cheapest configuration that meets the SLA, from profiles and a price table;
- ``serve``: the serving stack (model server behind the sidecar) as local processes;
- ``demo``: the whole pipeline on this machine, no cluster: bench, plan, serve, load, compare;
- ``operator``: run the kopf operator against a cluster;
- ``status``: predicted against observed cost and latency of one InferenceDeployment.

Each module has ``register(sub)``, which adds its parser and sets ``func``, and
``run(args)``, which returns the exit status. Subcommands are thin: they parse
arguments, call the core (or an adapter) and print. Heavy imports (rich, kopf,
ONNX Runtime) wait inside ``run``, so ``--version``, ``validate`` ``crds`` and ``status``
need only the base install (and ``status`` the kubernetes client) (pydantic, PyYAML).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from leanserve import __version__
from leanserve.cli import bench_cmd, crds_cmd, demo_cmd, operator_cmd, plan_cmd, serve_cmd, status_cmd, validate_cmd


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="leanserve",
        description="Cost-aware model serving on Kubernetes: the cheapest configuration that meets the SLA.",
    )
    parser.add_argument("--version", action="version", version=f"leanserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (validate_cmd, crds_cmd, demo_cmd, serve_cmd, bench_cmd, plan_cmd, operator_cmd, status_cmd):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``leanserve`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
