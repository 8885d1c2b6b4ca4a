"""``leanserve serve --model FILE [--sidecar]``: the serving stack locally, without a cluster.

Starts the model server and, with ``--sidecar``, the batching/caching sidecar in
front of it, as two processes (as in a pod: two containers), and stops both on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve an ONNX model locally (model server, optionally the sidecar)")
    p.add_argument("--model", type=Path, required=True, help="ONNX model file")
    p.add_argument("--name", default="model", help="model name in the v2 URLs (default: model)")
    p.add_argument("--port", type=int, default=8080, help="the front door's port (default: 8080)")
    p.add_argument("--sidecar", action="store_true", help="put the batching, caching sidecar in front")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--redis-url", default="", help="redis:// URL for the response cache (default: no cache)")
    p.set_defaults(func=run)


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[2]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def run(args: argparse.Namespace) -> int:
    if not args.model.is_file():
        print(f"error: model file not found: {args.model}", file=sys.stderr)
        return 2
    model_port = args.port + 1 if args.sidecar else args.port
    procs = [subprocess.Popen([sys.executable, "-m", "leanserve_serving.model_server", "--model", str(args.model),
                               "--name", args.name, "--host", "127.0.0.1", "--port", str(model_port)])]  # fmt: skip
    try:
        _wait(f"http://127.0.0.1:{model_port}/v2/health/ready", procs[0])
        if args.sidecar:
            env = {**os.environ, "LEANSERVE_REDIS_URL": args.redis_url}
            procs.append(subprocess.Popen([
                sys.executable, "-m", "leanserve_serving.sidecar", "--upstream", f"http://127.0.0.1:{model_port}",
                "--host", "127.0.0.1", "--port", str(args.port), "--max-batch-size", str(args.max_batch_size),
                "--max-wait-ms", str(args.max_wait_ms),
            ], env=env))  # fmt: skip
            _wait(f"http://127.0.0.1:{args.port}/v2/health/ready", procs[1])
        front = f"http://127.0.0.1:{args.port}"
        print(
            f"serving '{args.name}' at {front}/v2/models/{args.name}/infer"
            + (" (sidecar: batching" + (", cache" if args.redis_url else "") + ")" if args.sidecar else "")
        )
        print(f"metrics at {front}/metrics; Ctrl-C stops")
        procs[0].wait()
        return procs[0].returncode or 0
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
