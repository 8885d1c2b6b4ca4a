"""``leanserve serve --model FILE [--sidecar]``: the serving stack locally, without a cluster.

Starts the model server and the sidecar in front of it as two processes (as in a
pod: two containers); ``--sidecar`` turns on its batching. Ctrl-C stops both. Like a kubelet, it restarts
the model server when it exits (with a growing pause), so the sidecar's 503s end by themselves; after five
quick failures in a row it gives up and exits 1.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve an ONNX model locally: model server behind the sidecar")
    p.add_argument("--model", type=Path, required=True, help="ONNX model file")
    p.add_argument("--name", default="model", help="model name in the v2 URLs (default: model)")
    p.add_argument("--port", type=int, default=8080, help="the front door's port (default: 8080)")
    p.add_argument("--sidecar", action="store_true", help="batch in the sidecar (it always fronts the model server)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--redis-url", default="", help="redis:// URL for the response cache (default: no cache)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from leanserve.local_stack import Supervision, serving_stack
    from leanserve.planner.latency import Policy

    if not args.model.is_file():
        print(f"error: model file not found: {args.model}", file=sys.stderr)
        return 2
    policy = Policy(args.max_batch_size, args.max_wait_ms) if args.sidecar else Policy(1, 0.0)
    # Ctrl-C and SIGTERM both stop the children. SIGINT explicitly: a shell starts a background job
    # (`leanserve serve &`, nohup, a CI runner) with SIGINT ignored, and Python then leaves it ignored, so the
    # children would drain on a group Ctrl-C while serve, deaf to it, restarted them.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    gave_up: list[str] = []
    failed = threading.Event()
    supervision = Supervision(on_give_up=lambda reason: (gave_up.append(reason), failed.set()))
    try:
        stack = serving_stack(
            args.model,
            args.name,
            policy,
            port=args.port,
            redis_url=args.redis_url,
            quiet=False,
            supervision=supervision,
        )
        with stack as url:
            cache = ", exact cache" if args.redis_url else ""
            print(f"serving '{args.name}' at {url} (sidecar: batching up to {policy.max_batch}{cache})")
            print(f"metrics at {url.split('/v2/')[0]}/metrics; Ctrl-C stops")
            sys.stdout.flush()
            while not failed.wait(1):  # a timeout, so Ctrl-C is seen at once
                pass
        print(f"error: {gave_up[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
