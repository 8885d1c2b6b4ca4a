"""The ``leanserve`` command: one CLI, one subcommand per job.

Subcommands are thin: they parse arguments, call the core, and print. Later
issues add ``bench``, ``plan``, ``serve`` and ``operator`` here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from leanserve import __version__
from leanserve.cli import bench_cmd, crds_cmd, demo_cmd, operator_cmd, plan_cmd, serve_cmd, validate_cmd


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="leanserve",
        description="Cost-aware model serving on Kubernetes: the cheapest configuration that meets the SLA.",
    )
    parser.add_argument("--version", action="version", version=f"leanserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (validate_cmd, crds_cmd, demo_cmd, serve_cmd, bench_cmd, plan_cmd, operator_cmd):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``leanserve`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
