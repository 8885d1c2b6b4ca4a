"""The profiling Job's container: fetch the model and its evaluation data, bench them here, report.

    python -m leanserve_serving.bench_job --uri URI --evaluation URI --instance-type TYPE \
        [--metric accuracy] [--sha256 HEX] [--format onnx|pytorch] [--termination-log PATH]

The operator creates one such Job per candidate instance type. The compact
profile (at most 4 KiB) goes to the container's termination message, where the
operator reads it from the pod's status; a failure writes ``bench failed: ...``
there instead and exits 1 (the Job's backoff retries it, then the reason reaches
the candidate's row).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from leanserve_serving.bench.flags import add_timing_arguments, timing_options
from leanserve_serving.fetch import FetchError, fetch_evaluation, fetch_model

FAILED_PREFIX = "bench failed: "


def run(args: argparse.Namespace) -> str:
    """The compact profile, or raises with a reason a user can act on."""
    from leanserve_serving.bench.run import BenchError, BenchOptions, run_bench
    from leanserve_serving.config import parse_pad_inputs

    with tempfile.TemporaryDirectory(prefix="leanserve-bench-") as tmp:
        work = Path(tmp)
        model = fetch_model(args.uri, work, args.model_format, args.sha256)
        evaluation = fetch_evaluation(args.evaluation, work)
        try:
            options = BenchOptions(
                model,
                evaluation,
                instance_type=args.instance_type,
                metric=args.metric,
                max_accuracy_drop=args.max_accuracy_drop,
                quantization_search_s=args.quantization_search_seconds,
                pad_inputs=parse_pad_inputs(args.pad_inputs) if args.pad_inputs else {},
                **timing_options(args),
            )
            profile = run_bench(options, progress=lambda m: print(m, flush=True))
        except BenchError as exc:
            raise FetchError(str(exc)) from None
    return profile.to_compact()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leanserve_serving.bench_job", description=__doc__.split("\n")[0])
    parser.add_argument("--uri", required=True)
    parser.add_argument("--evaluation", required=True)
    parser.add_argument("--instance-type", required=True)
    parser.add_argument("--metric", default="accuracy", choices=["accuracy", "top1", "mse", "cosine"])
    parser.add_argument("--sha256", default=None)
    parser.add_argument("--format", dest="model_format", default="onnx", choices=["onnx", "pytorch"])
    add_timing_arguments(parser)
    parser.add_argument(
        "--max-accuracy-drop", type=float, default=None, help="the accuracy gate INT8 variants are searched to keep"
    )
    parser.add_argument("--quantization-search-seconds", type=float, default=300.0)
    parser.add_argument("--pad-inputs", default="", help="ragged batching in the stack run: input_ids=0,...")
    parser.add_argument("--termination-log", type=Path, default=Path("/dev/termination-log"))
    args = parser.parse_args(argv)
    try:
        message, code = run(args), 0
    except (FetchError, OSError, ValueError) as exc:
        message, code = FAILED_PREFIX + str(exc)[:3000], 1
        print(message, file=sys.stderr)
    try:
        args.termination_log.write_text(message)
    except OSError as exc:
        print(f"could not write {args.termination_log}: {exc}", file=sys.stderr)
    if code == 0:
        print(f"profile written to {args.termination_log} ({len(message)} bytes)")
    return code


if __name__ == "__main__":
    sys.exit(main())
