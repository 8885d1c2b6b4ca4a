"""``leanserve validate FILE...``: check InferenceDeployment files before applying them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from leanserve.api.validation import DocumentResult, validate_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="check InferenceDeployment YAML files against the API",
        description=(
            "Check InferenceDeployment YAML files with the same models the CRD is generated from. "
            "Prints one line per error (field path, value, reason); exits 1 if any file is invalid."
        ),
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    p.set_defaults(func=run)


def _text(result: DocumentResult) -> str:
    label = f"{result.source} ({result.name})" if result.name else result.source
    if result.skipped:
        return f"{label}: skipped, {result.skipped}"
    if result.valid:
        return f"{label}: valid"
    lines = [f"{label}: invalid, {len(result.errors)} error(s)"]
    lines += [f"  {e.format()}" for e in result.errors]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    results = [r for path in args.files for r in validate_file(path)]
    if args.output == "json":
        print(
            json.dumps(
                [
                    {
                        "source": r.source,
                        "name": r.name,
                        "valid": r.valid,
                        "skipped": r.skipped,
                        "errors": [e.to_json() for e in r.errors],
                    }
                    for r in results
                ],
                indent=2,
                default=str,
            )
        )
    else:
        for r in results:
            print(_text(r))
    return 0 if all(r.valid for r in results) else 1
