"""The GPU path through the serving stack, on the device machine: profiles, batching efficiency, memory, replicas.

Runs where an NVIDIA GPU and onnxruntime-gpu are (``hack/gpu/run.sh`` installs the carried wheels first):

    PYTHONPATH=/tmp/site:operator:serving_image python3 benchmarks/gpu_stack.py MODELS_DIR OUT_DIR

For each reference model (``tabular.onnx`` and ``text.onnx`` with their ``-eval.npz``, made here by
``reference_models``: the text model needs the MiniLM weights package, so it is built off the device and
carried) it runs ``leanserve bench``'s own ``run_bench`` with the CUDA provider, the stack run included
(sidecar + model server, the model server on CUDA), and writes the profile labelled ``nvidia-h200`` (the GPU
this machine has, never a cloud type). Then:

- batching efficiency: the best served rows/s through sidecar + model server against the best raw
  ``session.run`` rows/s of the same variant at its best batch size (and at the stack's largest batch);
- the TensorRT provider: whether a session can be made with it here, and the error when not;
- replicas sharing the GPU: 1, 2, 4, 8 model servers (each behind its sidecar) on the one GPU, each under the
  same open-loop load; p50/p95 and each server process's GPU memory (nvidia-smi).

Writes JSON only (never pickles) under OUT_DIR, prints a table, ends with one JSON line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from leanserve_serving.bench.evaldata import load_eval_data
from leanserve_serving.bench.run import BenchOptions, run_bench
from leanserve_serving.bench.stack import http_request, open_loop, v2_body
from leanserve_serving.local import model_server, sidecar
from leanserve_serving.model_server import spec_of

INSTANCE = "nvidia-h200"
PLAN = {
    "tabular": {"variants": ("fp32", "fp16", "int8-static"), "max_batch": 65536},
    "text": {"variants": ("fp32", "fp16", "int8-static"), "max_batch": 4096},
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def efficiency(profile: dict) -> list[dict]:
    """Per variant: best raw rows/s (any batch), raw rows/s at the stack's largest batch, best served rows/s."""
    rows = []
    for v in profile["variants"]:
        if v["status"] != "ok":
            rows.append({"variant": v["name"], "status": v["status"], "reason": v["reason"][:200]})
            continue
        raw = max(v["latency"], key=lambda p: p["throughput_rps"])
        served = [(p["batch_size"], p["batch_size"] / p["stack_ms"] * 1000) for p in v["latency"] if p.get("stack_ms")]
        best_b, best_served = max(served, key=lambda s: s[1]) if served else (None, 0.0)
        at_stack = [p for p in v["latency"] if p["batch_size"] == best_b]
        raw_same = at_stack[0]["throughput_rps"] if at_stack else None
        rows.append(
            {
                "variant": v["name"],
                "status": "ok",
                "quality": v["quality"],
                "quality_drop": v["quality_drop"],
                "raw_best_batch": raw["batch_size"],
                "raw_best_rps": round(raw["throughput_rps"]),
                "served_best_batch": best_b,
                "served_best_rps": round(best_served),
                "raw_rps_at_served_batch": round(raw_same) if raw_same else None,
                "efficiency_vs_best_raw": round(best_served / raw["throughput_rps"], 4),
                "efficiency_vs_raw_same_batch": round(best_served / raw_same, 4) if raw_same else None,
                "b1_p95_ms": v["latency"][0]["p95_ms"],
                "gpu_memory_mb": v.get("gpu_memory_mb"),
            }
        )
    return rows


def tensorrt_probe(model: Path) -> dict:
    """Can a session be made with the TensorRT provider here? (It needs libnvinfer, which the image may lack.)"""
    try:
        sess = ort.InferenceSession(str(model), providers=["TensorrtExecutionProvider"])
        return {"ok": "TensorrtExecutionProvider" in sess.get_providers(), "providers": sess.get_providers()}
    except Exception as exc:  # ORT raises its own types; the text is what we report
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}


def gpu_memory_by_pid() -> dict[int, float]:
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    memory = {}
    for line in out.splitlines():
        pid, _, used = line.partition(",")
        with contextlib.suppress(ValueError):
            memory[int(pid)] = float(used)
    return memory


async def load(ports: list[int], requests: list[bytes], rate: float, seconds: float) -> list[list[float]]:
    """Each replica's own open-loop (Poisson) load at ``rate``, all at once."""
    runs = (open_loop(p, r, rate, seconds, seed=i) for i, (p, r) in enumerate(zip(ports, requests, strict=True)))
    return await asyncio.gather(*runs)


def replicas_run(model: Path, evaluation: Path, counts: list[int], rate: float, seconds: float) -> list[dict]:
    """N model servers (each behind a sidecar batching up to 32, 2 ms) on one GPU, each under ``rate`` req/s."""
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    specs = [spec_of(i) for i in sess.get_inputs()]
    del sess
    data = load_eval_data(evaluation, specs, "accuracy")
    body = v2_body(data.inputs, specs)
    request_path = "/v2/models/m/infer"
    results = []
    for n in counts:
        with contextlib.ExitStack() as stack:
            servers = [stack.enter_context(model_server(model, "m")) for _ in range(n)]
            ports = [stack.enter_context(sidecar(s.url, 32, 2.0))[1] for s in servers]
            requests = [http_request(p, request_path, body) for p in ports]

            asyncio.run(load(ports, requests, rate, 0.5))  # warm-up
            latencies = np.concatenate(asyncio.run(load(ports, requests, rate, seconds))) * 1000
            memory = gpu_memory_by_pid()
            per_server = [memory.get(s.proc.pid) for s in servers]
        row = {
            "replicas": n,
            "rate_per_replica": rate,
            "requests": int(latencies.size),
            "p50_ms": round(float(np.percentile(latencies, 50)), 3),
            "p95_ms": round(float(np.percentile(latencies, 95)), 3),
            "p99_ms": round(float(np.percentile(latencies, 99)), 3),
            "gpu_memory_mb_per_server": per_server,
        }
        log(f"replicas {n}: p50 {row['p50_ms']} ms p95 {row['p95_ms']} ms, GPU MB/server {per_server}")
        results.append(row)
    return results


def main() -> None:
    models, out = Path(sys.argv[1]), Path(sys.argv[2])
    only = sys.argv[3].split(",") if len(sys.argv) > 3 else list(PLAN)
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    providers = ort.get_available_providers()
    log(f"onnxruntime {ort.__version__} providers {providers}")
    if "CUDAExecutionProvider" not in providers:
        raise SystemExit("no CUDA provider")
    os.environ.setdefault("LEANSERVE_PROVIDER", "cuda")
    summary: dict = {"onnxruntime": ort.__version__, "providers": providers, "models": {}}
    summary["tensorrt"] = tensorrt_probe(models / "tabular.onnx")
    log(f"tensorrt: {summary['tensorrt']}")
    for name in only:
        plan = PLAN[name]
        started = time.perf_counter()
        profile = run_bench(
            BenchOptions(
                models / f"{name}.onnx",
                models / f"{name}-eval.npz",
                instance_type=INSTANCE,
                gpu=True,
                variants=plan["variants"],
                max_batch=plan["max_batch"],
                seconds_per_point=0.3,
                stack_seconds=0.6,
            ),
            progress=lambda m, n=name: log(f"{n}: {m}"),
        )
        data = json.loads(profile.model_dump_json())
        (out / f"{name}-{INSTANCE}.json").write_text(profile.model_dump_json(indent=2))
        rows = efficiency(data)
        summary["models"][name] = {"seconds": round(time.perf_counter() - started, 1), "variants": rows}
        (out / "gpu-summary.json").write_text(json.dumps(summary, indent=2))
        for row in rows:
            log(f"{name}: {json.dumps(row)}")
    if "--replicas" in sys.argv or len(sys.argv) <= 3:
        summary["replicas"] = {}
        for name in ("text",):
            summary["replicas"][name] = replicas_run(
                models / f"{name}.onnx", models / f"{name}-eval.npz", [1, 2, 4, 8], rate=200.0, seconds=3.0
            )
            (out / "gpu-summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()
