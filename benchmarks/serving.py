"""Serving benchmark: the plain per-request model server against the sidecar + model server.

All runs happen in one process, on one machine, in one go, so the ratios are
comparable even on a noisy machine. Each setup runs with each ONNX Runtime
thread setting and is compared at its best, and the servers' CPU time per
request is read from /proc: on a machine whose cores the load generator shares,
CPU per request is what decides a replica's capacity. The load generator is `hey` (Debian's
package), closed loop at a fixed concurrency; the cache-hit latency is measured
with one connection so that it shows the cost of a hit, not queueing.

    .venv/bin/python benchmarks/serving.py [--seconds 10] [--concurrency 32]

Prints a table and, on its last line, one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from leanserve_serving.cpus import cpu_limit  # noqa: E402
from tests.onnx_models import make_mlp  # noqa: E402
from tests.serving_harness import Process, metric, mlp_request, model_server, sidecar, start_redis  # noqa: E402


def hey(url: str, body: Path, seconds: float, concurrency: int) -> dict[str, float]:
    """Run hey against ``url``; return req/s, p50/p95/p99 (ms) and the share of non-200 answers."""
    exe = shutil.which("hey")
    if exe is None:
        raise SystemExit("hey is not installed: apt-get install hey (make test installs it)")
    argv = [exe, "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST", "-T", "application/json"]
    out = subprocess.run([*argv, "-D", str(body), url], capture_output=True, text=True, check=True).stdout
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


def cpu_seconds(procs: list[Process]) -> float:
    """User + system CPU time used so far by the given server processes (from /proc)."""
    total = 0
    for p in procs:
        assert p.proc is not None
        fields = Path(f"/proc/{p.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def measured(url: str, body: Path, seconds: float, concurrency: int, servers: list[Process]) -> dict[str, float]:
    """A hey run plus the servers' CPU time per request (what a replica's cost is made of)."""
    hey(url, body, 2, concurrency)  # warm-up
    before = cpu_seconds(servers)
    figures = hey(url, body, seconds, concurrency)
    used = cpu_seconds(servers) - before
    figures["server_cpu_us_per_request"] = used / max(1.0, figures["rps"] * seconds) * 1e6
    return figures


#: ONNX Runtime thread settings tried for the model server; each setup is reported at its best.
THREAD_SETTINGS = {
    "1 thread": {"LEANSERVE_THREADS": "1", "LEANSERVE_SPIN": "false"},
    "all cores, spinning": {"LEANSERVE_THREADS": "0", "LEANSERVE_SPIN": "true"},
    "all cores, no spinning": {"LEANSERVE_THREADS": "0", "LEANSERVE_SPIN": "false"},
}


def run_model(name: str, sizes: tuple[int, ...], work: Path, seconds: float, concurrency: int) -> dict[str, object]:
    path = make_mlp(work / f"{name}.onnx", sizes=sizes)
    body = work / f"{name}.json"
    body.write_text(json.dumps(mlp_request([0.25] * sizes[0])))
    infer = f"/v2/models/{name}/infer"
    runs: list[dict[str, object]] = []
    procs: list[Process] = []
    try:
        for label, env in THREAD_SETTINGS.items():
            print(f"[{name}] plain per-request server (baseline), {label} ...", file=sys.stderr)
            baseline = model_server(path, name, work, **env).start()
            procs.append(baseline)
            runs.append(
                {
                    "setup": "baseline",
                    "threads": label,
                    **measured(baseline.url + infer, body, seconds, concurrency, [baseline]),
                }
            )
            baseline.stop()

            print(f"[{name}] sidecar (batching) + model server, {label} ...", file=sys.stderr)
            upstream = model_server(path, name, work, **env).start()
            car = sidecar(upstream.url, work, max_batch_size=32, max_wait_ms=2, upstream_concurrency=2).start()
            procs += [upstream, car]
            rows0, batches0 = batch_stats(car.url, name)
            figures = measured(car.url + infer, body, seconds, concurrency, [upstream, car])
            rows1, batches1 = batch_stats(car.url, name)
            figures["avg_batch"] = (rows1 - rows0) / max(1.0, batches1 - batches0)
            runs.append({"setup": "sidecar", "threads": label, **figures})
            car.stop()
            upstream.stop()

        best = {
            setup: max((r for r in runs if r["setup"] == setup), key=lambda r: float(r["rps"]))  # type: ignore[arg-type]
            for setup in ("baseline", "sidecar")
        }
        print(f"[{name}] sidecar with exact-cache hits ...", file=sys.stderr)
        upstream = model_server(path, name, work, **THREAD_SETTINGS[str(best["sidecar"]["threads"])]).start()
        redis = start_redis(work)
        cached = sidecar(upstream.url, work, redis_url=f"redis://127.0.0.1:{redis.port}/0").start()
        procs += [upstream, redis, cached]
        hey(cached.url + infer, body, 1, 1)  # fills the cache
        hits = measured(cached.url + infer, body, seconds, concurrency, [cached])
        hits["p50_single_ms"] = hey(cached.url + infer, body, min(seconds, 5), 1)["p50_ms"]
        hits["hit_ratio"] = metric(cached.url, "leanserve_cache_hits_total", 'kind="exact"') / max(
            1.0, metric(cached.url, "leanserve_requests_total", f'code="200",model="{name}"')
        )
    finally:
        for p in procs:
            p.stop()
    return {
        "model": name,
        "sizes": list(sizes),
        "runs": runs,
        "best_baseline": best["baseline"],
        "best_sidecar": best["sidecar"],
        "cache_hits": hits,
        "throughput_ratio": float(best["sidecar"]["rps"]) / float(best["baseline"]["rps"]),  # type: ignore[arg-type]
        "server_cpu_ratio": float(best["baseline"]["server_cpu_us_per_request"])  # type: ignore[arg-type]
        / float(best["sidecar"]["server_cpu_us_per_request"]),
    }


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
    print(
        f"\nserving benchmark, hey -c {args.concurrency}, {args.seconds:g} s per run, {cpu_limit()} CPUs "
        "(the quota, else the cores in sight) shared by the load generator and the servers\n"
    )
    head = f"{'model':<9} {'setup':<9} {'ORT threads':<23} {'req/s':>7} {'p50':>6} {'p95':>6} {'p99':>6} {'cpu/req':>8}"
    print(head + "  notes")
    for r in results:
        for run in r["runs"]:  # type: ignore[union-attr]
            notes = f"avg batch {run['avg_batch']:.1f}" if run["setup"] == "sidecar" else ""
            cpu = run["server_cpu_us_per_request"]
            print(
                f"{r['model']:<9} {run['setup']:<9} {run['threads']:<23} {run['rps']:>7.0f} {run['p50_ms']:>6.1f} "
                f"{run['p95_ms']:>6.1f} {run['p99_ms']:>6.1f} {cpu:>6.0f}us  {notes}"
            )
        h = r["cache_hits"]
        print(
            f"{r['model']:<9} {'cache':<9} {'(exact hits)':<23} {h['rps']:>7.0f} {h['p50_ms']:>6.1f} "
            f"{h['p95_ms']:>6.1f} {h['p99_ms']:>6.1f} {h['server_cpu_us_per_request']:>6.0f}us  "
            f"hit p50 {h['p50_single_ms']:.2f} ms on 1 connection, hit ratio {h['hit_ratio']:.2f}"
        )
        print(
            f"{r['model']:<9} best sidecar / best baseline: {r['throughput_ratio']:.2f}x req/s, "
            f"{r['server_cpu_ratio']:.2f}x less server CPU per request\n"
        )
    print(f"(took {time.monotonic() - started:.0f} s)")
    print(
        json.dumps(
            {"benchmark": "serving", "concurrency": args.concurrency, "seconds": args.seconds, "results": results},
            default=float,
        )
    )


if __name__ == "__main__":
    main()
