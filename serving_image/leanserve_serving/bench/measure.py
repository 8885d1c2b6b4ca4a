"""Measurements of one variant: quality against fp32, latency by batch size, memory, hardware."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from leanserve_serving.bench.evaldata import EvalData
from leanserve_serving.profile import Hardware, LatencyPoint

#: CPU flags that decide how fast INT8 runs.
INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")


def session(path: Path, threads: int, gpu: bool) -> tuple[ort.InferenceSession, float]:
    """A session for ``path`` and how long it took to create (the variant's cold start)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
    start = time.perf_counter()
    sess = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    return sess, time.perf_counter() - start


#: Rows per batch when computing outputs over sequence data, in order of length.
LENGTH_SORTED_BATCH = 32


def outputs(sess: ort.InferenceSession, data: EvalData, batch: int = 256) -> np.ndarray:
    """The first output over all evaluation rows, in row order.

    Sequence data (:attr:`EvalData.lengths`) runs in batches of :data:`LENGTH_SORTED_BATCH` rows of similar
    length, each cut to its longest: quality then costs the set's tokens, not its longest row times every row
    (a masked model's outputs do not depend on the padding; a dynamically quantized one's depend on it a
    little, and less with less of it).
    """
    lengths = data.lengths
    order = np.arange(data.rows) if lengths is None else np.argsort(lengths, kind="stable")
    size = batch if lengths is None else min(batch, LENGTH_SORTED_BATCH)
    parts = [sess.run(None, data.take(order[i : i + size]))[0] for i in range(0, data.rows, size)]
    ordered = np.concatenate(parts, axis=0)
    out = np.empty_like(ordered)
    out[order] = ordered
    return out


def quality(metric: str, out: np.ndarray, labels: np.ndarray | None, reference: np.ndarray) -> tuple[float, float]:
    """(value, drop vs the fp32 ``reference`` outputs) for the metric; a drop is always 'worse by'."""
    if metric in ("accuracy", "top1"):
        assert labels is not None
        value = float((out.reshape(len(out), -1).argmax(1) == labels.reshape(-1)).mean())
        ref = float((reference.reshape(len(reference), -1).argmax(1) == labels.reshape(-1)).mean())
        return value, ref - value
    if metric == "mse":
        assert labels is not None
        scale = float(np.mean(labels.astype(np.float64) ** 2)) or 1.0
        value = float(np.mean((out.reshape(labels.shape) - labels) ** 2) / scale)  # relative error
        ref = float(np.mean((reference.reshape(labels.shape) - labels) ** 2) / scale)
        return value, value - ref
    if metric == "cosine":
        a = out.reshape(len(out), -1).astype(np.float64)
        b = reference.reshape(len(reference), -1).astype(np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        value = float(cos.mean())
        return value, 1.0 - value
    raise ValueError(f"unknown metric {metric!r}")


#: Distinct batches each latency point cycles through: as many as the fewest runs a point times, so each runs.
SAMPLED_BATCHES = 20


def sample_batches(
    data: EvalData, size: int, count: int = SAMPLED_BATCHES, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """``count`` batches of ``size`` rows drawn at random (fixed seed) from the whole evaluation set.

    Rows of different lengths make batches of different widths (:meth:`EvalData.take` pads each to its
    longest), so timing one batch of the first rows would measure whatever lengths those rows happen to
    have; cycling through batches spread over the set gives the latency of the set's length distribution.
    """
    rng = np.random.default_rng(seed)
    replace = size > data.rows
    return [data.take(np.sort(rng.choice(data.rows, size, replace=replace))) for _ in range(count)]


def latency_curve(
    sess: ort.InferenceSession, data: EvalData, max_batch: int, seconds_per_point: float
) -> list[LatencyPoint]:
    """p50/p95/p99 and throughput at batch sizes 1, 2, 4, ... until throughput stops growing.

    Each size cycles through :func:`sample_batches` (random rows, each batch padded to its own longest), so
    with sequence data the percentiles include the spread of lengths a server sees.

    Stops after two doublings that gain less than 5 %, at ``max_batch``, or when a
    batch no longer fits in memory.
    """
    points: list[LatencyPoint] = []
    best, flat = 0.0, 0
    batch = 1
    while batch <= max_batch:
        feeds = sample_batches(data, batch)
        try:
            for feed in feeds[:3]:  # warm-up
                sess.run(None, feed)
            times = []
            deadline = time.perf_counter() + seconds_per_point
            while len(times) < 20 or (time.perf_counter() < deadline and len(times) < 5000):
                feed = feeds[len(times) % len(feeds)]
                start = time.perf_counter()
                sess.run(None, feed)
                times.append(time.perf_counter() - start)
        except (MemoryError, RuntimeError, ort.capi.onnxruntime_pybind11_state.Fail) as exc:
            if "memory" in str(exc).lower() or isinstance(exc, MemoryError):
                break
            raise
        ms = np.array(times) * 1000
        rps = batch / (ms.mean() / 1000)
        points.append(
            LatencyPoint(
                batch_size=batch,
                p50_ms=float(np.percentile(ms, 50)),
                p95_ms=float(np.percentile(ms, 95)),
                p99_ms=float(np.percentile(ms, 99)),
                throughput_rps=float(rps),
            )
        )
        flat = flat + 1 if rps < best * 1.05 else 0
        best = max(best, rps)
        if flat >= 2:
            break
        batch *= 2
    return points


def rss_mb() -> float:
    """Resident memory of this process now (the bench measures one variant at a time)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def gpu_memory_mb() -> float | None:
    """GPU memory in use by this process, from nvidia-smi, or None without a GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    out = subprocess.run(
        [smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    for line in out.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return float(used)
    return 0.0


def hardware(vcpus: int) -> Hardware:
    """The CPU (model, vCPUs, the ISA flags that matter), the GPU, and ONNX Runtime's providers."""
    cpu_model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model in ("", platform.machine(), platform.processor()):
                cpu_model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    gpu, gpu_mem = None, None
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if out:
            name, _, mem = out.splitlines()[0].partition(",")
            gpu, gpu_mem = name.strip(), int(float(mem))
    return Hardware(
        cpu_model=cpu_model,
        vcpus=vcpus,
        isa_flags=[f for f in INTERESTING_FLAGS if f in flags],
        gpu=gpu,
        gpu_memory_mb=gpu_mem,
        onnxruntime=ort.__version__,
        providers=ort.get_available_providers(),
    )
