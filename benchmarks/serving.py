"""Serving benchmark: the plain per-request model server against the sidecar + model server.

All runs happen in one process, on one machine, in one go, so the ratios are
comparable even on a noisy machine. The load generator is `hey` (Debian's
package), closed loop at a fixed concurrency; the cache-hit latency is measured
with one connection so that it shows the cost of a hit, not queueing.

    .venv/bin/python benchmarks/serving.py [--seconds 10] [--concurrency 32]

Prints a table and, on its last line, one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.onnx_models import make_mlp  # noqa: E402
from tests.serving_harness import metric, mlp_request, model_server, sidecar, start_redis  # noqa: E402


def hey(url: str, body: Path, seconds: float, concurrency: int) -> dict[str, float]:
    """Run hey against ``url``; return req/s, p50/p95/p99 (ms) and the share of non-200 answers."""
    exe = shutil.which("hey")
    if exe is None:
        raise SystemExit("hey is not installed: apt-get install hey (make test installs it)")
    out = subprocess.run(
        [exe, "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST", "-T", "application/json",
         "-D", str(body), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    figures = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in (50, 95, 99):
        found = re.search(rf"\s{pct}% in ([\d.]+) secs", out)
        figures[f"p{pct}_ms"] = float(found.group(1)) * 1000 if found else float("nan")
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}
    total = sum(codes.values())
    figures["errors"] = (total - codes.get(200, 0)) / total if total else 1.0
    return figures


def batch_stats(url: str, model: str) -> tuple[float, float]:
    return (
        metric(url, "leanserve_batch_size_sum", f'model="{model}"'),
        metric(url, "leanserve_batch_size_count", f'model="{model}"'),
    )


def run_model(name: str, sizes: tuple[int, ...], work: Path, seconds: float, concurrency: int) -> dict[str, object]:
    path = make_mlp(work / f"{name}.onnx", sizes=sizes)
    body = work / f"{name}.json"
    body.write_text(json.dumps(mlp_request([0.25] * sizes[0])))
    infer = f"/v2/models/{name}/infer"
    procs = []
    try:
        print(f"[{name}] plain per-request server (the baseline) ...", file=sys.stderr)
        baseline = model_server(path, name, work, LEANSERVE_THREADS="0").start()
        procs.append(baseline)
        hey(baseline.url + infer, body, 2, concurrency)  # warm-up
        base = hey(baseline.url + infer, body, seconds, concurrency)
        baseline.stop()

        print(f"[{name}] sidecar (batching) + model server ...", file=sys.stderr)
        upstream = model_server(path, name, work, LEANSERVE_THREADS="0").start()
        procs.append(upstream)
        car = sidecar(upstream.url, work, max_batch_size=32, max_wait_ms=2, upstream_concurrency=2).start()
        procs.append(car)
        hey(car.url + infer, body, 2, concurrency)
        rows0, batches0 = batch_stats(car.url, name)
        batched = hey(car.url + infer, body, seconds, concurrency)
        rows1, batches1 = batch_stats(car.url, name)
        batched["avg_batch"] = (rows1 - rows0) / max(1.0, batches1 - batches0)
        car.stop()

        print(f"[{name}] sidecar with exact-cache hits ...", file=sys.stderr)
        redis = start_redis(work)
        procs.append(redis)
        cached = sidecar(upstream.url, work, redis_url=f"redis://127.0.0.1:{redis.port}/0").start()
        procs.append(cached)
        hey(cached.url + infer, body, 1, 1)  # fills the cache
        hits = hey(cached.url + infer, body, seconds, concurrency)
        hit_latency = hey(cached.url + infer, body, min(seconds, 5), 1)
        hits["p50_single_ms"] = hit_latency["p50_ms"]
        hits["hit_ratio"] = metric(cached.url, "leanserve_cache_hits_total", 'kind="exact"') / max(
            1.0, metric(cached.url, "leanserve_requests_total", f'code="200",model="{name}"')
        )
    finally:
        for p in procs:
            p.stop()
    return {"model": name, "sizes": list(sizes), "baseline": base, "batched": batched, "cache_hits": hits,
            "throughput_ratio": batched["rps"] / base["rps"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.monotonic()
        results = [
            run_model("mlp", (64, 512, 512, 2), work, args.seconds, args.concurrency),
            # The same shape of model, ~16x the compute per row: where batching is expected to pay.
            run_model("mlp_wide", (64, 2048, 2048, 2), work, args.seconds, args.concurrency),
        ]
    print(f"\nserving benchmark, hey -c {args.concurrency}, {args.seconds:g} s per run, 2-core machine\n")
    print(f"{'model':<10} {'setup':<22} {'req/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7} notes")
    for r in results:
        for label, key in (("baseline (per request)", "baseline"), ("sidecar, batching", "batched"),
                           ("sidecar, cache hits", "cache_hits")):  # fmt: skip
            f = r[key]  # type: ignore[index]
            notes = ""
            if key == "batched":
                notes = f"avg batch {f['avg_batch']:.1f}, {r['throughput_ratio']:.2f}x baseline"
            if key == "cache_hits":
                notes = f"hit p50 {f['p50_single_ms']:.2f} ms (1 connection), hit ratio {f['hit_ratio']:.2f}"
            print(f"{r['model']:<10} {label:<22} {f['rps']:>9.0f} {f['p50_ms']:>8.2f} {f['p95_ms']:>8.2f} "
                  f"{f['p99_ms']:>8.2f} {f['errors']:>7.1%} {notes}")  # fmt: skip
    print(f"(took {time.monotonic() - started:.0f} s)")
    print(json.dumps({"benchmark": "serving", "concurrency": args.concurrency, "seconds": args.seconds,
                      "results": results}, default=float))  # fmt: skip


if __name__ == "__main__":
    main()
