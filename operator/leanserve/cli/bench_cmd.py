"""``leanserve bench MODEL --eval DATA``: profile a model's variants on this machine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from leanserve_serving.bench.flags import add_timing_arguments, timing_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="profile fp32/int8/fp16 variants: accuracy, latency, throughput, memory")
    p.add_argument("model", type=Path, help="ONNX model file")
    p.add_argument("--eval", dest="evaluation", type=Path, required=True, help="evaluation data (.npz or .jsonl)")
    p.add_argument("--metric", choices=("accuracy", "top1", "mse", "cosine"), default="accuracy")
    p.add_argument("--instance-type", default="local", help="the instance type this machine stands for")
    p.add_argument("--variants", default="fp32,int8-dynamic,int8-static,fp16", help="comma-separated")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default: the CPU limit)")
    add_timing_arguments(p)
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        help="accuracy gate: an INT8 variant over it is replaced by the fastest recipe found within it "
        "(per-channel, calibration, nodes kept in fp32); default: no search",
    )
    p.add_argument(
        "--quantization-search-seconds",
        type=float,
        help="time budget of that search per INT8 variant (default 300)",
    )
    p.add_argument("--out", type=Path, help="write the full profile (JSON) here")
    compact_help = "write the compact profile (<= 4 KiB) here, e.g. /dev/termination-log"
    p.add_argument("--compact-out", type=Path, help=compact_help)
    p.set_defaults(func=run)


#: The summary table's columns, and the format of each figure of a summary row in them.
COLUMNS = (
    ("variant", "variant", ""),
    ("status", "status", ""),
    (None, "quality", ".4f"),  # headed by the profile's metric
    ("drop", "drop", "+.4f"),
    ("p50 b=1 ms", "p50_b1_ms", ".3f"),
    ("best batch", "best_batch", "d"),
    ("best rows/s", "best_rps", ".0f"),
    ("x fp32 best", "vs_fp32_best", ".2f"),
    ("x fp32 b=1", "vs_fp32_b1", ".1f"),
    ("load s", "load_s", ".3f"),
    ("RSS MB", "rss_mb", ".0f"),
)


def _fmt(value: float | str | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _writable(path: Path) -> str | None:
    """Why ``path`` cannot be written (None when it can), its parent folder created if missing.

    Checked before the bench, which takes minutes: a typo in ``--out`` must not cost the profile.
    Probes by opening, not by ``os.access``, which a root user or a read-only mount answers wrongly.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with path.open("a"):  # append: an existing file (e.g. /dev/termination-log) is not truncated
                pass
        else:
            with path.open("x"):
                pass
            path.unlink()
    except OSError as exc:
        return f"cannot write {path}: {exc.strerror or exc}"
    return None


def _search_budget(args: argparse.Namespace) -> dict[str, float]:
    """The search budget, where given (BenchOptions holds the default: the flag stays light to register)."""
    seconds = args.quantization_search_seconds
    return {} if seconds is None else {"quantization_search_s": seconds}


def run(args: argparse.Namespace) -> int:
    from rich.table import Table  # the tables need the operator extra; --version and validate do not

    from leanserve.cli.console import wide_console
    from leanserve_serving.bench.run import BenchError, BenchOptions, run_bench
    from leanserve_serving.profile import summary_rows

    console = wide_console(stderr=True)
    for out in (args.out, args.compact_out):
        if out is not None and (problem := _writable(out)):
            console.print(f"[red]error:[/red] {problem}", soft_wrap=True)
            return 2
    options = BenchOptions(
        model=args.model,
        evaluation=args.evaluation,
        instance_type=args.instance_type,
        metric=args.metric,
        variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
        threads=args.threads,
        max_accuracy_drop=args.max_accuracy_drop,
        **_search_budget(args),
        **timing_options(args),
    )
    try:
        with console.status("profiling") as status:
            profile = run_bench(options, progress=lambda msg: (status.update(msg), console.log(msg)))
    except BenchError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    hw = profile.hardware
    where = f"{hw.cpu_model}, {hw.vcpus} vCPU, {profile.threads} threads"
    table = Table(title=f"{profile.model_name} on {profile.instance_type} ({where})")
    for heading, _, _ in COLUMNS:
        table.add_column(heading or profile.metric)
    rows = summary_rows(profile)
    for r in rows:
        table.add_row(*(_fmt(r[key], spec) for _, key, spec in COLUMNS))
    console.print(table)
    if args.out:
        args.out.write_text(profile.model_dump_json(indent=2))
        console.print(f"full profile: {args.out}")
    compact = profile.to_compact()
    if args.compact_out:
        args.compact_out.write_text(compact)
    figures = {"model": profile.model_name, "digest": profile.model_digest, "compact_bytes": len(compact)}
    print(json.dumps({**figures, "variants": rows}))
    sys.stdout.flush()
    return 0
