"""Serving benchmark: a plain one-process server against leanserve (sidecar + model server), side by side.

Every server process runs on one core (the first CPU) and the load generator on another (the last CPU),
so a front door's cost shows as throughput, not as a share of a core the client also wants; all setups run
in one go, so the ratios are comparable even on a noisy machine. Setups, on each model:

- ``plain``: benchmarks/plain_server.py, aiohttp + ONNX Runtime, one JSON parse and one ``session.run`` a
  request (the floor a Python front door must beat; REST JSON only);
- ``off``: leanserve with batching off (max_batch_size 1), over REST JSON, REST binary and gRPC;
- ``batched``: leanserve with batching (max_batch_size 32, max_wait_ms 2), over the same three.

Models: the tiny MLP (64-512-512-2), a wide MLP (64-2048-2048-2) and an image-sized input (1x3x224x224 FP32,
reduced by a global average pool: the transport is the cost). The load generator is in this process: a closed
loop of ``--concurrency`` workers on aiohttp (REST: 32 keep-alive connections, bodies built once) or grpc.aio
(one channel, the generated v2 stubs), on uvloop; it reports req/s and p50/p95/p99 over ``--seconds``
after a warm-up.

    .venv/bin/python benchmarks/serving.py [--seconds 6] [--concurrency 32] [--quick]

Prints a table with the ratios and the issue's goals, and, on its last line, one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from leanserve_serving.local import free_port, pinned, stop_processes  # noqa: E402
from leanserve_serving.proto import grpc_predict_v2_pb2 as pb  # noqa: E402
from leanserve_serving.proto import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402
from tests.onnx_models import make_mlp  # noqa: E402

#: The setups of leanserve: sidecar settings on top of the defaults.
STACKS = {
    "off": {"max_batch_size": 1, "upstream_concurrency": 2},
    "batched": {"max_batch_size": 32, "max_wait_ms": 2, "upstream_concurrency": 2},
}
PROTOCOLS = ("json", "binary", "grpc")


def make_image_reduce(path: Path) -> Path:
    """An image-sized FP32 input (N x 3 x 224 x 224) reduced to N x 3 by a global average pool."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "image_reduce",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def started(argv: list[str], env: dict[str, str], port: int, cpus: frozenset[int]) -> Iterator[str]:
    """A server process on ``cpus``, ready on ``port``; yields its base URL, stops it after."""
    proc = subprocess.Popen(  # type: ignore[call-overload]
        argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **pinned(cpus)
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url + "/v2/health/ready", proc)
        yield url
    finally:
        stop_processes([proc])


@contextlib.contextmanager
def leanserve(model: Path, name: str, cpus: frozenset[int], settings: dict[str, Any]) -> Iterator[tuple[str, int]]:
    """The model server and the sidecar (with ``settings``) on ``cpus``; yields the sidecar's URL and gRPC port."""
    port, front, grpc_port = free_port(), free_port(), free_port()
    flags = ["--model", str(model), "--name", name, "--host", "127.0.0.1", "--port", str(port)]
    server_env = {"LEANSERVE_THREADS": "1", "LEANSERVE_SPIN": "false"}
    car_env = {f"LEANSERVE_{k.upper()}": str(v) for k, v in settings.items()}
    car_env.update(
        LEANSERVE_UPSTREAM=f"http://127.0.0.1:{port}",
        LEANSERVE_HOST="127.0.0.1",
        LEANSERVE_PORT=str(front),
        LEANSERVE_GRPC_PORT=str(grpc_port),
    )
    with (
        started([sys.executable, "-m", "leanserve_serving.model_server", *flags], server_env, port, cpus),
        started([sys.executable, "-m", "leanserve_serving.sidecar"], car_env, front, cpus) as url,
    ):
        yield url, grpc_port


def figures(done: list[tuple[float, bool]], seconds: float) -> dict[str, float]:
    """req/s, p50/p95/p99 (ms) and the share of failed answers of the calls ended in the measured window."""
    latencies = np.array([lat for lat, ok in done if ok]) * 1000
    failed = sum(1 for _, ok in done if not ok)
    out = {"rps": len(latencies) / seconds, "errors": failed / max(1, len(done))}
    for pct in (50, 95, 99):
        out[f"p{pct}_ms"] = float(np.percentile(latencies, pct)) if len(latencies) else float("nan")
    return out


async def closed_loop(call: Callable[[], Awaitable[bool]], workers: int, warmup: float, seconds: float) -> dict:
    """``workers`` callers, each calling again as soon as its answer is in, for ``warmup`` + ``seconds``."""
    start = time.perf_counter()
    begin, end = start + warmup, start + warmup + seconds
    done: list[tuple[float, bool]] = []

    async def worker() -> None:
        while (t0 := time.perf_counter()) < end:
            try:
                ok = await call()
            except Exception:
                ok = False
            t1 = time.perf_counter()
            if begin <= t0 and t1 <= end:
                done.append((t1 - t0, ok))

    await asyncio.gather(*(worker() for _ in range(workers)))
    return figures(done, seconds)


async def rest_load(
    url: str, body: bytes, headers: dict[str, str], workers: int, warmup: float, seconds: float
) -> dict[str, float]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=workers)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call() -> bool:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                return resp.status == 200

        return await closed_loop(call, workers, warmup, seconds)


async def grpc_load(
    port: int, request: pb.ModelInferRequest, workers: int, warmup: float, seconds: float
) -> dict[str, float]:
    import grpc

    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def call() -> bool:
            await stub.ModelInfer(request, timeout=10)
            return True

        return await closed_loop(call, workers, warmup, seconds)


def bodies(name: str, x: np.ndarray) -> dict[str, tuple[bytes, dict[str, str]]]:
    """The REST bodies of one request for ``x`` (JSON, and binary with the binary answer asked), built once."""
    tensor = {"name": "input", "datatype": "FP32", "shape": list(x.shape)}
    as_json = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
    raw = x.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return {
        "json": (as_json, {"Content-Type": "application/json"}),
        "binary": (
            header + raw,
            {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
        ),
    }


def grpc_request(name: str, x: np.ndarray) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=name,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[x.astype("<f4").tobytes()],
    )


def run_model(
    name: str, path: Path, x: np.ndarray, args: argparse.Namespace, cpus: tuple[frozenset[int], ...]
) -> list[dict[str, Any]]:
    """Every setup and protocol on one model; the runs as a list of dicts."""
    serving, client = cpus
    infer = f"/v2/models/{name}/infer"
    rest = bodies(name, x)
    load = dict(workers=args.concurrency, warmup=args.warmup, seconds=args.seconds)
    runs: list[dict[str, Any]] = []

    def measure(setup: str, protocol: str, coro: Awaitable[dict]) -> None:
        print(f"[{name}] {setup} {protocol} ...", file=sys.stderr, flush=True)
        os.sched_setaffinity(0, client)
        try:
            result = asyncio.run(coro)  # type: ignore[arg-type]
        finally:
            os.sched_setaffinity(0, serving | client)
        runs.append({"model": name, "setup": setup, "protocol": protocol, **result})

    port = free_port()
    plain = [sys.executable, str(REPO / "benchmarks" / "plain_server.py"), str(path), name, str(port)]
    with started(plain, {}, port, serving) as url:
        measure("plain", "json", rest_load(url + infer, *rest["json"], **load))
    for setup, settings in STACKS.items():
        with leanserve(path, name, serving, settings) as (url, grpc_port):
            for protocol in PROTOCOLS:
                if protocol == "grpc":
                    coro = grpc_load(grpc_port, grpc_request(name, x), **load)
                else:
                    coro = rest_load(url + infer, *rest[protocol], **load)
                measure(setup, protocol, coro)
    return runs


def ratio(runs: list[dict], a: tuple[str, str, str], b: tuple[str, str, str]) -> float:
    def rps(key: tuple[str, str, str]) -> float:
        return next(float(r["rps"]) for r in runs if (r["model"], r["setup"], r["protocol"]) == key)

    return rps(a) / max(rps(b), 1e-9)


def goals(runs: list[dict]) -> list[dict[str, Any]]:
    """The issue's goals: (what, measured ratio, target)."""
    out = [
        ("batched JSON / plain, tiny MLP", ratio(runs, ("mlp", "batched", "json"), ("mlp", "plain", "json")), 1.2),
        (
            "batched JSON / plain, wide MLP",
            ratio(runs, ("mlp_wide", "batched", "json"), ("mlp_wide", "plain", "json")),
            2.0,
        ),
        ("batching off JSON / plain, tiny MLP", ratio(runs, ("mlp", "off", "json"), ("mlp", "plain", "json")), 0.7),
        (
            "batching off JSON / plain, wide MLP",
            ratio(runs, ("mlp_wide", "off", "json"), ("mlp_wide", "plain", "json")),
            0.7,
        ),
    ]
    for setup in STACKS:
        out.append(
            (f"{setup} binary / JSON, image", ratio(runs, ("image", setup, "binary"), ("image", setup, "json")), 5.0)
        )
    for model in ("mlp", "mlp_wide", "image"):
        for setup in STACKS:
            out.append(
                (
                    f"{setup} gRPC / REST binary, {model}",
                    ratio(runs, (model, setup, "grpc"), (model, setup, "binary")),
                    1.0,
                )
            )
    return [
        {"goal": what, "ratio": round(value, 3), "target": target, "met": value >= target}
        for what, value, target in out
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6, help="measured seconds per run (after the warm-up)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="1.5 s runs (about a minute in all)")
    args = parser.parse_args()
    args.warmup = 1.0
    if args.quick:
        args.seconds, args.warmup = 1.5, 0.5
    import uvloop

    uvloop.install()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs two CPUs: one for the servers, one for the load generator")
    serving, client = frozenset(cpus[:1]), frozenset(cpus[-1:])
    started_at = time.monotonic()
    rng = np.random.default_rng(0)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = [
            ("mlp", make_mlp(work / "mlp.onnx", sizes=(64, 512, 512, 2)), (1, 64)),
            ("mlp_wide", make_mlp(work / "mlp_wide.onnx", sizes=(64, 2048, 2048, 2)), (1, 64)),
            ("image", make_image_reduce(work / "image.onnx"), (1, 3, 224, 224)),
        ]
        for name, path, shape in models:
            x = rng.random(shape, dtype=np.float32)
            runs += run_model(name, path, x, args, (serving, client))
    print(
        f"\nserving benchmark: servers on CPU {min(serving)}, load generator on CPU {min(client)}, "
        f"{args.concurrency} workers, {args.seconds:g} s per run after {args.warmup:g} s warm-up\n"
    )
    print(
        f"{'model':<9} {'setup':<8} {'protocol':<7} {'req/s':>7} {'x plain':>8} "
        f"{'p50':>7} {'p95':>7} {'p99':>7} {'err':>5}"
    )
    for r in runs:
        plain = next(p["rps"] for p in runs if p["model"] == r["model"] and p["setup"] == "plain")
        print(
            f"{r['model']:<9} {r['setup']:<8} {r['protocol']:<7} {r['rps']:>7.0f} {r['rps'] / plain:>7.2f}x "
            f"{r['p50_ms']:>7.1f} {r['p95_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['errors']:>5.1%}"
        )
    checked = goals(runs)
    print("\ngoals (req/s ratios):")
    for g in checked:
        print(f"  {g['goal']:<40} {g['ratio']:>6.2f}x  (goal >= {g['target']:g}x)  {'met' if g['met'] else 'MISSED'}")
    print(f"(took {time.monotonic() - started_at:.0f} s)")
    summary = {
        "benchmark": "serving",
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "runs": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in runs],
        "goals": checked,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
