"""The timing flags ``leanserve bench`` and the profiling Job's container share, with one set of defaults.

Light on purpose (no ONNX Runtime import): the CLI registers these flags at start-up.
"""

from __future__ import annotations

import argparse
from typing import Any

MAX_BATCH = 1024
SECONDS_PER_POINT = 0.3
STACK_SECONDS = 0.6


def add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    """``--max-batch``, ``--seconds-per-point`` and ``--stack-seconds``."""
    parser.add_argument(
        "--max-batch", type=int, default=MAX_BATCH, help=f"largest batch size tried (default {MAX_BATCH})"
    )
    parser.add_argument(
        "--seconds-per-point",
        type=float,
        default=SECONDS_PER_POINT,
        help=f"timing budget per batch size (default {SECONDS_PER_POINT:g})",
    )
    parser.add_argument(
        "--stack-seconds",
        type=float,
        default=STACK_SECONDS,
        help=(
            f"load per batch size through the serving stack, sidecar + model server "
            f"(default {STACK_SECONDS:g}; 0 skips it)"
        ),
    )


def timing_options(args: argparse.Namespace) -> dict[str, Any]:
    """The BenchOptions fields those flags set."""
    return {
        "max_batch": args.max_batch,
        "seconds_per_point": args.seconds_per_point,
        "stack_seconds": args.stack_seconds,
    }
