"""Serving benchmark: a plain one-process server against leanserve (sidecar + model server), side by side.

Every server process runs on one core (the first CPU) and the load generator on another (the last CPU),
so a front door's cost shows as throughput, not as a share of a core the client also wants; all setups run
in one go, so the ratios are comparable even on a noisy machine. Setups, on each model:

- ``plain``: benchmarks/plain_server.py, aiohttp + ONNX Runtime, one JSON parse and one ``session.run`` a
  request (the floor a Python front door must beat; REST JSON only);
- ``off``: leanserve with batching off (max_batch_size 1), over REST JSON, REST binary and gRPC;
- ``batched``: leanserve with batching (max_batch_size 32, max_wait_ms 2), over the same three.

Models: the tiny MLP (64-512-512-2), a wide MLP (64-2048-2048-2) and an image-sized input (1x3x224x224 FP32,
reduced by a global average pool: the transport is the cost). The load generator is hack/benchload (Go, built
into .cache/ on first use, so Go is needed: scripts/install-system-deps.sh --with-go): a closed loop of
``--concurrency`` workers (REST: as many keep-alive connections, each body built once here; gRPC: one connection,
the request serialized once here); it reports req/s, p50/p95/p99 over ``--seconds`` after a warm-up, and how
busy its own core was (``client``: near 100 % means the client, not the server, may have been the cap; the
former Python client was, at about 13k req/s).

    .venv/bin/python benchmarks/serving.py [--seconds 6] [--concurrency 32] [--quick]

Prints a table with the ratios and the issue's goals, and, on its last line, one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from leanserve.loadgen import GoBuildError, build_go_binary, go_binary_path  # noqa: E402
from leanserve_serving.local import free_port, pinned, stop_processes  # noqa: E402
from tests.onnx_models import make_mlp  # noqa: E402

if TYPE_CHECKING:
    from leanserve_serving.proto import grpc_predict_v2_pb2 as pb

#: The setups of leanserve: sidecar settings on top of the defaults.
STACKS = {
    "off": {"max_batch_size": 1, "upstream_concurrency": 2},
    "batched": {"max_batch_size": 32, "max_wait_ms": 2, "upstream_concurrency": 2},
}
PROTOCOLS = ("json", "binary", "grpc")
#: hack/benchload's sources, and where it is built.
BENCHLOAD_SOURCE = REPO / "hack" / "benchload"
BENCHLOAD_DIR = REPO / ".cache"


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


def benchload_binary() -> Path:
    """hack/benchload, built on first use into ``.cache/benchload-<hash of its sources>`` (so a binary built from
    older sources is never taken for the current one); SystemExit, saying why, when Go is missing or the build
    fails."""
    binary = go_binary_path(BENCHLOAD_SOURCE, "benchload", BENCHLOAD_DIR)
    if binary.exists():
        return binary
    if shutil.which("go") is None:
        raise SystemExit(
            "the serving benchmark's load generator (hack/benchload) is Go and `go` is not on PATH: "
            "install it with scripts/install-system-deps.sh --with-go (go 1.24 or newer)"
        )
    try:
        build_go_binary(BENCHLOAD_SOURCE, binary)
    except GoBuildError as exc:
        raise SystemExit(f"building hack/benchload failed:\n{exc}") from None
    return binary


def figures(report: dict[str, Any]) -> dict[str, float]:
    """hack/benchload's JSON report as the benchmark's figures: req/s, the share of failed calls, p50/p95/p99 (ms,
    NaN when no call succeeded) and ``client_cpu``, the share of its core the load generator was busy (near 1:
    the client, not the server, may have been the cap)."""
    calls = report["completed"] + report["errors"]
    out = {"rps": float(report["rps"]), "errors": report["errors"] / max(1, calls)}
    for pct in (50, 95, 99):
        value = report[f"p{pct}_ms"]
        out[f"p{pct}_ms"] = float("nan") if value is None else float(value)
    out["client_cpu"] = report["cpu_seconds"] / report["seconds"]
    return out


def benchload(
    target: list[str], payload: tuple[str, bytes], workers: int, warmup: float, seconds: float, cpus: frozenset[int]
) -> dict[str, float]:
    """A closed loop of ``workers`` (hack/benchload on ``cpus``) for ``warmup`` + ``seconds``; ``target`` names
    what to load (its flags), ``payload`` the flag and bytes of the request, passed in a temporary file."""
    flag, data = payload
    with tempfile.NamedTemporaryFile(prefix="benchload-", suffix=".bin") as f:
        f.write(data)
        f.flush()
        argv = [
            str(benchload_binary()),
            *("-c", str(workers), "-warmup", f"{round(warmup * 1000)}ms", "-duration", f"{round(seconds * 1000)}ms"),
            *target,
            *(flag, f.name),
        ]
        done = subprocess.run(argv, capture_output=True, text=True, check=False, **pinned(cpus))
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}: {done.stderr.strip()}")
    return figures(json.loads(done.stdout))


def rest_load(
    url: str,
    body: bytes,
    headers: dict[str, str],
    workers: int,
    warmup: float,
    seconds: float,
    cpus: frozenset[int],
) -> dict[str, float]:
    """POST ``body`` with ``headers`` to ``url``, over ``workers`` keep-alive connections."""
    target = ["-url", url, *(arg for name, value in headers.items() for arg in ("-header", f"{name}: {value}"))]
    return benchload(target, ("-body", body), workers, warmup, seconds, cpus)


def grpc_load(
    port: int, request: pb.ModelInferRequest, workers: int, warmup: float, seconds: float, cpus: frozenset[int]
) -> dict[str, float]:
    """ModelInfer with ``request`` on the gRPC server at ``port``, over one connection."""
    target = ["-grpc", f"127.0.0.1:{port}", "-method", "/inference.GRPCInferenceService/ModelInfer"]
    return benchload(target, ("-message", request.SerializeToString()), workers, warmup, seconds, cpus)


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
    """The v2 ModelInferRequest for ``x`` (raw contents). The generated module is imported here, not with the
    benchmark: it registers the ``inference`` protobuf package, which a process that loaded tritonclient's own
    (the test suite) cannot register twice."""
    from leanserve_serving.proto import grpc_predict_v2_pb2 as pb

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
    load = dict(workers=args.concurrency, warmup=args.warmup, seconds=args.seconds, cpus=client)
    runs: list[dict[str, Any]] = []

    def measure(setup: str, protocol: str, run: Callable[[], dict[str, float]]) -> None:
        print(f"[{name}] {setup} {protocol} ...", file=sys.stderr, flush=True)
        runs.append({"model": name, "setup": setup, "protocol": protocol, **run()})

    port = free_port()
    plain = [sys.executable, str(REPO / "benchmarks" / "plain_server.py"), str(path), name, str(port)]
    with started(plain, {}, port, serving) as url:
        measure("plain", "json", functools.partial(rest_load, url + infer, *rest["json"], **load))
    for setup, settings in STACKS.items():
        with leanserve(path, name, serving, settings) as (url, grpc_port):
            for protocol in PROTOCOLS:
                if protocol == "grpc":
                    run = functools.partial(grpc_load, grpc_port, grpc_request(name, x), **load)
                else:
                    run = functools.partial(rest_load, url + infer, *rest[protocol], **load)
                measure(setup, protocol, run)
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
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs two CPUs: one for the servers, one for the load generator")
    serving, client = frozenset(cpus[:1]), frozenset(cpus[-1:])
    benchload_binary()  # built (or Go found missing) before any server starts
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
        f"{'p50':>7} {'p95':>7} {'p99':>7} {'err':>5} {'client':>6}"
    )
    for r in runs:
        plain = next(p["rps"] for p in runs if p["model"] == r["model"] and p["setup"] == "plain")
        print(
            f"{r['model']:<9} {r['setup']:<8} {r['protocol']:<7} {r['rps']:>7.0f} {r['rps'] / plain:>7.2f}x "
            f"{r['p50_ms']:>7.1f} {r['p95_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['errors']:>5.1%} {r['client_cpu']:>6.0%}"
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
