"""The serving stack's share of a request, measured: the sidecar and the model server, HTTP and JSON included.

``session.run`` alone is not what a replica serves: every request also crosses
the sidecar (parse, check, batch, answer) and every batch the HTTP hop to the
model server (encode, decode), on the same cores as the model. So for each batch
size the bench starts the real stack (the same processes a pod runs) and loads it:

- **batch time**: closed loop with more than twice as many connections as the
  batch size, the sidecar's max batch at that size, so one full batch is always
  waiting while the previous runs (as under heavy load). The time between batch completions is
  what one batch of that size holds the replica, front door included; its spread
  (each cycle over the mean) is the service-time jitter the planner draws from.
- **latency outside the batch**: an open-loop trickle (Poisson, no batching),
  where no request waits for another: each latency (from its send) minus the
  batch time of one row is what a request spends outside the replica's serial
  path (sockets, parsing, wake-ups). Kept as quantiles; the planner adds a draw
  to every request.

The client is a raw HTTP/1.1 keep-alive loop over pre-encoded bytes (tens of
microseconds a request), so it takes little of the CPU it measures. It runs on
the same cores, as a load balancer's connections would not; the figures are
therefore slightly conservative.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from leanserve_serving.local import CPUs, model_server, running_on, sidecar
from leanserve_serving.profile import STACK_LEVELS, StackProfile
from leanserve_serving.tensors import TensorSpec

#: Largest batch size run through the stack (the planner's largest batching policy); beyond it the planner
#: adds the stack's cost at this size to the model's own time.
MAX_STACK_BATCH = 128
WARMUP_S = 0.2


class StackError(RuntimeError):
    """The stack did not answer as it should (a non-200, a closed connection)."""


def v2_body(feeds: dict[str, np.ndarray], specs: list[TensorSpec], row: int = 0) -> bytes:
    """A v2 infer request body holding one row of each input, typed as the model declares it.

    With an ``attention_mask`` input, the row is cut to its own length (the last position its mask keeps):
    a client sends a text as long as it is, and the sidecar pads a batch to its longest (``pad_inputs``)."""
    types = {s.name: s.datatype for s in specs}
    mask = feeds.get("attention_mask")
    length = None
    if mask is not None and mask.ndim == 2:
        kept = np.flatnonzero(mask[row])
        length = int(kept[-1]) + 1 if kept.size else 1
    inputs = []
    for name, array in feeds.items():
        datatype = types.get(name, "FP32")
        data = array[row : row + 1]
        if length is not None and mask is not None and data.ndim == 2 and array.shape == mask.shape:
            data = data[:, :length]
        values = [str(x) for x in data.ravel()] if datatype == "BYTES" else data.ravel().tolist()
        inputs.append({"name": name, "datatype": datatype, "shape": [1, *data.shape[1:]], "data": values})
    return orjson.dumps({"inputs": inputs})


def v2_bodies(feeds: dict[str, np.ndarray], specs: list[TensorSpec], count: int = 64) -> list[bytes]:
    """Bodies of ``count`` rows spread over the data (every row when fewer): requests as varied as the data."""
    rows = len(next(iter(feeds.values())))
    picks = np.unique(np.linspace(0, rows - 1, min(count, rows)).astype(int))
    return [v2_body(feeds, specs, int(r)) for r in picks]


def http_request(port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = head[9:12]
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    if status != b"200":
        raise StackError(f"the stack answered {status.decode()}")


async def closed_loop(
    port: int, request: bytes | list[bytes], connections: int, seconds: float, at_least: int = 0
) -> list[float]:
    """Completion times (perf_counter seconds) of requests sent back-to-back on ``connections`` connections,
    for ``seconds`` or until ``at_least`` requests are done (within ten times ``seconds``). Several requests
    are sent in turn, each connection starting at its own place in the list.

    Timed from the first reply, as the warm-up cut is: opening many connections and the first full batch can
    take longer than a short run, and timing from the start left nothing after the warm-up."""
    done: list[float] = []
    start = time.perf_counter()

    def going() -> bool:
        elapsed = time.perf_counter() - (done[0] if done else start)
        return elapsed < seconds or (len(done) < at_least and elapsed < 10 * seconds)

    requests = request if isinstance(request, list) else [request]

    async def client(first: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sent = first
        try:
            while going():
                await _exchange(reader, writer, requests[sent % len(requests)])
                sent += connections
                done.append(time.perf_counter())
        finally:
            writer.close()

    await asyncio.gather(*(client(i) for i in range(connections)))
    return done


async def open_loop(port: int, request: bytes | list[bytes], rate: float, seconds: float, seed: int = 1) -> list[float]:
    """Latencies (s) of Poisson arrivals at ``rate``, each from the moment it is sent.

    From the send, not the scheduled arrival: at the trickle this runs, nothing waits for anything else, and
    a late wake-up of this client's timer is the client's, not the stack's."""
    rng = np.random.default_rng(seed)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    latencies: list[float] = []

    requests = request if isinstance(request, list) else [request]

    async def one(body: bytes) -> None:
        conn = idle.pop() if idle else await asyncio.open_connection("127.0.0.1", port)
        sent = time.perf_counter()
        await _exchange(*conn, body)
        latencies.append(time.perf_counter() - sent)
        idle.append(conn)

    tasks = []
    start = time.perf_counter()
    at = start
    while at - start < seconds:
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(requests[len(tasks) % len(requests)])))
        at += rng.exponential(1 / rate)
    await asyncio.gather(*tasks)
    for _, writer in idle:
        writer.close()
    return latencies


@dataclass
class StackFigures:
    batch_ms: dict[int, float]
    """Mean time one batch of each size holds the replica through the whole stack."""
    profile: StackProfile
    """The jitter (pooled over batch sizes) and the latency outside the batch path."""


def batch_cycles(done: list[float], size: int, warmup: float) -> np.ndarray:
    """Times between the completions of consecutive full batches (the last reply of each batch of ``size``)."""
    t = np.sort(np.asarray(done))
    t = t[t >= t[0] + warmup] if len(t) else t
    ends = t[size - 1 :: size]
    return np.diff(ends)


def measure_stack(
    model: Path,
    body: bytes | list[bytes],
    batch_sizes: list[int],
    seconds: float = 0.6,
    trickle_seconds: float = 3.0,
    progress: Callable[[str], None] = lambda _: None,
    cpus: CPUs = None,
    client_cpus: CPUs = None,
    pad_inputs: dict[str, float] | None = None,
) -> StackFigures:
    """Batch time by batch size, its jitter, and the latency outside the batch, through the real stack
    (its processes on ``cpus``, this process's client on ``client_cpus``; None: wherever the OS puts them).

    Several bodies (requests of different lengths, ``pad_inputs`` padding them in a batch) are sent in
    turn, so a batch holds requests as varied as the traffic's and is timed at the length it pads to."""
    bodies = body if isinstance(body, list) else [body]
    name = "bench"
    path = f"/v2/models/{name}/infer"
    batch_ms: dict[int, float] = {}
    ratios: list[np.ndarray] = []
    with running_on(client_cpus), model_server(model, name, cpus=cpus) as server:
        for size in [b for b in batch_sizes if b <= MAX_STACK_BATCH]:
            with sidecar(server.url, size, 50.0, cpus=cpus, pad_inputs=pad_inputs) as (_, port):
                request = [http_request(port, path, b) for b in bodies]
                # Twice the batch keeps a full batch waiting; a few more connections than that, as real traffic
                # spreads over many (each costs the event loop a little).
                done = asyncio.run(closed_loop(port, request, 2 * size + 8, seconds + WARMUP_S, 24 * size))
                cycles = batch_cycles(done, size, WARMUP_S)
                if len(cycles) < 5:
                    raise StackError(f"too few batches of {size} completed in {seconds:g} s")
                batch_ms[size] = float(cycles.mean() * 1000)
                ratios.append(cycles / cycles.mean())
                rows_per_s = size / batch_ms[size] * 1000
                progress(f"stack: batch {size}: {batch_ms[size]:.2f} ms a batch ({rows_per_s:.0f} rows/s)")
        with sidecar(server.url, 1, 0.0, cpus=cpus, pad_inputs=pad_inputs) as (_, port):
            request = [http_request(port, path, b) for b in bodies]
            single = batch_ms.get(1) or min(batch_ms.values())
            rate = min(50.0, 100.0 / single)  # about 10 % busy: nobody waits for anybody
            asyncio.run(open_loop(port, request, rate, 0.5))  # warm-up
            latencies = np.asarray(asyncio.run(open_loop(port, request, rate, trickle_seconds))) * 1000
    outside = np.maximum(np.percentile(latencies, STACK_LEVELS) - single, 0.0)
    jitter = np.percentile(np.concatenate(ratios), STACK_LEVELS)
    p50, p90 = STACK_LEVELS.index(50), STACK_LEVELS.index(90)
    progress(
        f"stack: outside the batch p50 {outside[p50]:.2f} ms, p90 {outside[p90]:.2f} ms; batch time "
        f"p90/mean {jitter[p90]:.2f}"
    )
    return StackFigures(
        batch_ms,
        StackProfile(jitter=[round(float(x), 4) for x in jitter], outside_ms=[round(float(x), 3) for x in outside]),
    )
