"""``leanserve crds``: write (or check) the CRD generated from the models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leanserve.api.crd import CRD_FILENAME, crd_yaml, write_crds


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("crds", help="generate the CRD YAML from the API models")
    p.add_argument("--out", type=Path, default=Path("crds"), help="folder to write into (default: crds)")
    p.add_argument("--check", action="store_true", help="exit 1 if the file on disk is stale, write nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = args.out / CRD_FILENAME
    if args.check:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != crd_yaml():
            print(f"{path} is stale: run `make crds`", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    print(f"wrote {write_crds(args.out)}")
    return 0
