"""Hostile run of the serving path: malformed requests, poisoned caches, unknown names, overload.

The real parts as local processes (leanserve_serving.local): the ONNX Runtime model
server and the sidecar in front of it, on their own CPU, a real redis-server for the
exact cache, and this script as the load generator on another CPU, speaking plain
HTTP (aiohttp). Every good answer is compared with a direct ONNX Runtime session
on the same input.

1. malformed requests, each sent together with 15 good ones so that they meet in the
   batcher, then the poison pill (1e39 in FP32) 20 times: bad ones must get a 4xx,
   none a 5xx, and every good one its own right answer;
2. poisoned caches: warm the exact cache, overwrite every entry in Redis with poison,
   send the same requests again; with the HMAC key every poison is refused, without
   it only those the structure check can see (a forged body of the right shape
   cannot be told from a real one without the key: counted apart);
3. unknown names: 20,000 distinct model names; /metrics and the sidecar's memory must
   not grow with them;
4. overload: 200 connections in a closed loop (client timeout 2 s) with the model
   server frozen (SIGSTOP) for 3 s in the middle: 429s, 503s, 504s, client timeouts,
   rows sent upstream for callers who had gone, wrong answers.

    .venv/bin/python benchmarks/hostile.py [--quick] [--unknown-names 20000] [--overload-seconds 10]

Prints a line per phase and, on its last line, one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import onnx
import onnxruntime as ort
import orjson
import redis
from onnx import TensorProto, helper, numpy_helper
from yarl import URL

from leanserve_serving.local import CPUs, free_port, model_server, pinned, sidecar, split_cpus

MODEL = "mlp"
WIDTH = 64
SERVER_CPUS, CLIENT_CPUS = split_cpus()
#: The sidecar's batching in this run: concurrent requests share batches.
MAX_BATCH, MAX_WAIT_MS = 16, 8.0


def progress(message: str) -> None:
    print(f"[hostile] {message}", file=sys.stderr, flush=True)


# ---- the model and its oracle -------------------------------------------------------------------


def make_model(path: Path, sizes: tuple[int, ...] = (WIDTH, 256, 256, 2)) -> Path:
    """A seeded MLP (input ``input`` FP32 [batch, 64], output ``logits`` FP32 [batch, 2]), made here."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "input"
    for i in range(len(sizes) - 1):
        w = rng.normal(0, (2 / sizes[i]) ** 0.5, (sizes[i], sizes[i + 1])).astype(np.float32)
        b = rng.normal(0, 0.01, sizes[i + 1]).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(sizes) - 2
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], ["logits" if last else f"z{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"z{i}"], [f"h{i}"]))
        prev = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", sizes[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="leanserve-hostile")
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


class Oracle:
    """The model run directly (ONNX Runtime, one thread): what every good answer must be."""

    def __init__(self, path: Path) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def expected(self, values: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            return self.session.run(None, {"input": values.astype(np.float32)})[0]


def flaw(body: Any, expected: np.ndarray, request_id: str | None) -> str | None:
    """What is wrong with an answer (None when it is the model's answer to that request)."""
    if not isinstance(body, dict):
        return "not a JSON object"
    if request_id is not None and body.get("id") != request_id:
        return f"id {body.get('id')!r}, sent {request_id!r}"
    if body.get("model_name") != MODEL:
        return f"model_name {body.get('model_name')!r}"
    outputs = body.get("outputs")
    if not isinstance(outputs, list) or len(outputs) != 1 or not isinstance(outputs[0], dict):
        return "not one output"
    out = outputs[0]
    if out.get("name") != "logits" or out.get("datatype") != "FP32" or out.get("shape") != list(expected.shape):
        return f"output {out.get('name')!r} {out.get('datatype')!r} {out.get('shape')!r}"
    try:
        got = np.array([np.nan if v is None else v for v in out["data"]], dtype=np.float64).reshape(expected.shape)
    except (TypeError, ValueError, KeyError):
        return "data is not numbers of the shape"
    want = np.where(np.isfinite(expected), expected, np.nan)  # JSON carries inf as null
    if not np.allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True):
        return f"values {got.ravel()[:2].tolist()}, expected {want.ravel()[:2].tolist()}"
    return None


def infer_body(values: np.ndarray, request_id: str | None = None) -> bytes:
    doc: dict[str, Any] = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(values.shape), "data": values.ravel().tolist()}]
    }
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps(doc)


# ---- HTTP ---------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int | str
    """The HTTP status, or what went wrong at the client (``timeout``, ``ClientOSError``...)."""
    body: Any = None
    seconds: float = 0.0
    source: str | None = None


async def send(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    timeout: float = 15.0,
) -> Answer:
    """One request; the URL is sent as written (``encoded``): a name like ``..%2F..`` reaches the server so."""
    start = time.perf_counter()
    try:
        async with session.request(
            method,
            URL(url, encoded=True),
            data=body,
            headers={"Content-Type": "application/json", **(headers or {})},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            raw = await resp.read()
            try:
                decoded = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                decoded = raw[:200]
            return Answer(resp.status, decoded, time.perf_counter() - start, resp.headers.get("X-Leanserve-Source"))
    except TimeoutError:
        return Answer("timeout", None, time.perf_counter() - start)
    except aiohttp.ClientError as exc:
        return Answer(type(exc).__name__, str(exc)[:200], time.perf_counter() - start)


async def send_raw(port: int, raw: bytes, timeout: float = 5.0) -> Answer:
    """Bytes written on a fresh connection as they are (HTTP the client library would not write)."""
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        writer.write(raw)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        writer.close()
        parts = line.split()
        status: int | str = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else f"no status: {line[:40]!r}"
        return Answer(status, None, time.perf_counter() - start)
    except TimeoutError:
        return Answer("timeout", None, time.perf_counter() - start)
    except OSError as exc:
        return Answer(type(exc).__name__, None, time.perf_counter() - start)


def scrape(base: str) -> tuple[int, dict[str, float]]:
    """The size of ``base``/metrics in bytes and its samples (``name{labels}`` -> value)."""
    import urllib.request

    with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
        text = resp.read()
    samples = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return len(text), samples


def total(samples: dict[str, float], prefix: str, *labels: str) -> float:
    """The sum of the samples of a metric whose labels contain all of ``labels``."""
    return sum(v for k, v in samples.items() if k.startswith(prefix + "{") and all(lab in k for lab in labels))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(values, q))


# ---- the stack ----------------------------------------------------------------------------------


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """``os.environ`` with these values while the block runs (local.sidecar passes the environment on)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def redis_server(work: Path, cpus: CPUs) -> Iterator[int]:
    """A throwaway redis-server on a free loopback port, its files in its own temporary folder."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (Debian redis-server; make test installs it)")
    port = free_port()
    folder = work / f"redis-{port}"
    folder.mkdir()
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(folder)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **pinned(cpus))  # type: ignore[call-overload]
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@dataclass
class Front:
    """A running sidecar: its base URL, infer URL and process id."""

    base: str
    pid: int

    @property
    def infer(self) -> str:
        return f"{self.base}/v2/models/{MODEL}/infer"


@contextlib.contextmanager
def front(upstream: str, redis_url: str = "", quiet: bool = True, **env: str) -> Iterator[Front]:
    """A sidecar over ``upstream`` with this run's batching, on the servers' CPU; ``env``: LEANSERVE_* settings."""
    with (
        environment(**env),
        sidecar(upstream, MAX_BATCH, MAX_WAIT_MS, redis_url=redis_url, quiet=quiet, cpus=SERVER_CPUS) as (proc, port),
    ):
        yield Front(f"http://127.0.0.1:{port}", proc.pid)


# ---- phase 1: malformed requests ----------------------------------------------------------------


@dataclass
class Bad:
    kind: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    path: str | None = None
    """Instead of the model's infer path (sent as written)."""
    method: str = "POST"
    raw: bytes | None = None
    """A whole HTTP request written on a socket instead."""


def nested(depth: int, inner: Any) -> Any:
    for _ in range(depth):
        inner = [inner]
    return inner


#: Stands in a document for raw JSON spliced in after encoding (orjson writes at most 254 levels).
SPLICE = "@splice@"


def spliced(doc: bytes, raw: bytes) -> bytes:
    return doc.replace(orjson.dumps(SPLICE), raw)


def deep_array(depth: int) -> bytes:
    return b"[" * depth + b"0.5" + b"]" * depth


def deep_object(depth: int) -> bytes:
    return b'{"a":' * depth + b"{}" + b"}" * depth


def bad_requests() -> list[Bad]:
    """Requests the sidecar must refuse with a 4xx (about 90 kinds)."""
    good = [0.5] * WIDTH

    def tensor(**over: Any) -> dict[str, Any]:
        t = {"name": "input", "datatype": "FP32", "shape": [1, WIDTH], "data": good}
        t.update(over)
        return {k: v for k, v in t.items() if v is not ...}

    def req(*tensors: Any, **extra: Any) -> bytes:
        return orjson.dumps({"inputs": list(tensors), **extra})

    def with_value(value: Any) -> bytes:
        return req(tensor(data=[value, *good[1:]]))

    j = orjson.dumps
    infer = f"/v2/models/{MODEL}/infer"
    body = req(tensor())
    host = b"Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
    bads = [
        Bad("empty body", b""),
        Bad("invalid JSON", b"{"),
        Bad("trailing garbage", body + b"}}"),
        Bad("JSON null", b"null"),
        Bad("JSON array", b"[]"),
        Bad("JSON string", b'"inputs"'),
        Bad("JSON number", b"42"),
        Bad("non-UTF-8 bytes", b'{"inputs": "\xff\xfe\xfd"}'),
        Bad("UTF-16 body", body.decode().encode("utf-16")),
        Bad("NaN literal", body.replace(b"0.5", b"NaN", 1)),
        Bad("Infinity literal", body.replace(b"0.5", b"Infinity", 1)),
        Bad("whole body nested 1000 deep", deep_array(1000)),
        Bad("data nested 1000 deep", spliced(req(tensor(data=SPLICE)), deep_array(1000))),
        Bad("data nested 100 deep", req(tensor(data=nested(100, 0.5)))),
        Bad("parameters nested 300 deep", spliced(req(tensor(), parameters=SPLICE), deep_object(300))),
        Bad("tensor parameters nested 300 deep", spliced(req(tensor(parameters=SPLICE)), deep_object(300))),
        Bad("parameters lists nested 40 deep", req(tensor(), parameters={"a": nested(40, 1)})),
        Bad("no inputs", j({"id": "x"})),
        Bad("inputs null", j({"inputs": None})),
        Bad("inputs an object", j({"inputs": {}})),
        Bad("inputs empty", j({"inputs": []})),
        Bad("inputs [null]", j({"inputs": [None]})),
        Bad("inputs of strings", j({"inputs": ["input"]})),
        Bad("no tensor name", req(tensor(name=...))),
        Bad("empty tensor name", req(tensor(name=""))),
        Bad("tensor name a number", req(tensor(name=123))),
        Bad("wrong input name", req(tensor(name="inputs"))),
        Bad("no datatype", req(tensor(datatype=...))),
        Bad("datatype FLOAT32", req(tensor(datatype="FLOAT32"))),
        Bad("datatype fp32", req(tensor(datatype="fp32"))),
        Bad("datatype null", req(tensor(datatype=None))),
        Bad("datatype INT64 (model: FP32)", req(tensor(datatype="INT64", data=[1] * WIDTH))),
        Bad("datatype FP64 (model: FP32)", req(tensor(datatype="FP64"))),
        Bad("datatype BYTES", req(tensor(datatype="BYTES", data=["a"] * WIDTH))),
        Bad("no shape", req(tensor(shape=...))),
        Bad("shape a string", req(tensor(shape="1,64"))),
        Bad("negative shape", req(tensor(shape=[1, -WIDTH]))),
        Bad("float shape", req(tensor(shape=[1.0, float(WIDTH)]))),
        Bad("boolean shape", req(tensor(shape=[True, WIDTH]))),
        Bad("shape [2, 64], 64 values", req(tensor(shape=[2, WIDTH]))),
        Bad("shape [1, 63] (model: 64)", req(tensor(shape=[1, WIDTH - 1], data=good[1:]))),
        Bad("rank 1", req(tensor(shape=[WIDTH]))),
        Bad("rank 3", req(tensor(shape=[1, 1, WIDTH]))),
        Bad("shape 2**32 x 64", req(tensor(shape=[2**32, WIDTH]))),
        Bad("shape 2**62 x 2**62", req(tensor(shape=[2**62, 2**62]))),
        Bad("no data", req(tensor(data=...))),
        Bad("data null", req(tensor(data=None))),
        Bad("data a string", req(tensor(data="0.5"))),
        Bad("data an object", req(tensor(data={"0": 0.5}))),
        Bad("a null in data", with_value(None)),
        Bad("a string in data", with_value("0.5")),
        Bad("an object in data", with_value({"v": 0.5})),
        Bad("1e39 in FP32", with_value(1e39)),
        Bad("-1e39 in FP32", with_value(-1e39)),
        Bad("1e309 (over float64)", body.replace(b"0.5", b"1e309", 1)),
        Bad(
            "2**64 in INT64",
            spliced(req(tensor(datatype="INT64", data=[SPLICE, *[1] * (WIDTH - 1)])), str(2**64).encode()),
        ),
        Bad("300 in INT8", req(tensor(datatype="INT8", data=[300, *[1] * (WIDTH - 1)]))),
        Bad("1.5 in INT32", req(tensor(datatype="INT32", data=[1.5, *[1] * (WIDTH - 1)]))),
        Bad("10**400 in FP32", body.replace(b"0.5", b"1" + b"0" * 400, 1)),
        Bad("int 2**63 in INT64", req(tensor(datatype="INT64", data=[2**63, *[1] * (WIDTH - 1)]))),
        Bad("ragged data", req(tensor(shape=[2, WIDTH], data=[good, good[1:]]))),
        Bad("mixed depth data", req(tensor(shape=[2, WIDTH], data=[good, 0.5]))),
        Bad("duplicate input", req(tensor(), tensor())),
        Bad("an extra input", req(tensor(), tensor(name="extra"))),
        Bad("outputs a string", req(tensor(), outputs="logits")),
        Bad("output name a number", req(tensor(), outputs=[{"name": 5}])),
        Bad("unknown output", req(tensor(), outputs=[{"name": "nope"}])),
        Bad("id an object", req(tensor(), id={"a": 1})),
        Bad("id a list", req(tensor(), id=[1])),
        Bad("id true", req(tensor(), id=True)),
        Bad("unknown model", body, path="/v2/models/nope/infer"),
        Bad("name ..%2F..%2Fmetrics", body, path="/v2/models/..%2F..%2Fmetrics/infer"),
        Bad("name %2E%2E", body, path="/v2/models/%2E%2E/infer"),
        Bad("name 300 long", body, path=f"/v2/models/{'m' * 300}/infer"),
        Bad("name with %00", body, path="/v2/models/mlp%00/infer"),
        Bad("name with a space", body, path="/v2/models/ml%20p/infer"),
        Bad("name non-ASCII", body, path="/v2/models/ml%C3%A9/infer"),
        Bad("GET metadata ..%2F..%2Fmetrics", None, path="/v2/models/..%2F..%2Fmetrics", method="GET"),
        Bad("GET metadata of unknown", None, path="/v2/models/nope", method="GET"),
        Bad("GET on infer", None, path=infer, method="GET"),
        Bad("gzip header, garbage body", os.urandom(512), {"Content-Encoding": "gzip"}),
        Bad("deflate header, garbage body", os.urandom(512), {"Content-Encoding": "deflate"}),
        Bad("gzip truncated", gzip.compress(body)[:-12], {"Content-Encoding": "gzip"}),
        Bad("gzip of invalid JSON", gzip.compress(b"{" * 100), {"Content-Encoding": "gzip"}),
        Bad("gzip bomb (64 MiB of zeros)", gzip.compress(b"0" * (64 << 20), 9), {"Content-Encoding": "gzip"}),
        Bad("zlib bomb (64 MiB)", zlib.compress(b" " * (64 << 20), 9), {"Content-Encoding": "deflate"}),
        Bad("body over the limit (9 MB)", b"[" + b"0.5," * (9_000_000 // 4) + b"0.5]"),
        Bad(
            "bad Content-Length", raw=b"POST " + infer.encode() + b" HTTP/1.1\r\n" + host + b"Content-Length: x\r\n\r\n"
        ),
        Bad(
            "bad chunk size",
            raw=b"POST " + infer.encode() + b" HTTP/1.1\r\n" + host + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
        ),
        Bad("header line garbage", raw=b"POST " + infer.encode() + b" HTTP/1.1\r\n\x01\x02\r\n\r\n"),
    ]
    return bads


def edge_requests() -> list[tuple[str, np.ndarray]]:
    """Valid but extreme inputs: answered 200 with the model's answer (never a 5xx, never a neighbour's)."""
    return [
        ("3e38 everywhere (overflows inside the model)", np.full((1, WIDTH), 3e38)),
        ("denormals", np.full((1, WIDTH), 1e-45)),
        ("negative zeros", np.full((1, WIDTH), -0.0)),
        ("zero rows", np.zeros((0, WIDTH))),
        ("15 rows", np.random.default_rng(7).normal(size=(15, WIDTH))),
        ("40 rows (over max batch)", np.random.default_rng(8).normal(size=(40, WIDTH))),
    ]


@dataclass
class Tally:
    """What the innocent (good) requests met."""

    sent: int = 0
    failed: int = 0
    wrong: int = 0
    examples: list[str] = field(default_factory=list)

    def check(self, answer: Answer, expected: np.ndarray, request_id: str | None) -> None:
        self.sent += 1
        if answer.status != 200:
            self.failed += 1
            self.note(f"{request_id}: {answer.status} {str(answer.body)[:160]}")
            return
        problem = flaw(answer.body, expected, request_id)
        if problem is not None:
            self.wrong += 1
            self.note(f"{request_id}: {problem}")

    def note(self, text: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(text)

    def figures(self) -> dict[str, Any]:
        return {"sent": self.sent, "failed": self.failed, "wrong": self.wrong, "examples": self.examples}


class GoodTraffic:
    """Good requests with distinct random inputs, each checked against the oracle."""

    def __init__(self, oracle: Oracle, seed: int) -> None:
        self.oracle = oracle
        self.rng = np.random.default_rng(seed)
        self.count = 0
        self.tally = Tally()

    async def one(self, session: aiohttp.ClientSession, url: str) -> None:
        self.count += 1
        rid = f"good-{self.count}"
        values = self.rng.normal(size=(1, WIDTH)).astype(np.float32)
        answer = await send(session, url, infer_body(values, rid))
        self.tally.check(answer, self.oracle.expected(values), rid)


async def malformed(session: aiohttp.ClientSession, car: Front, oracle: Oracle) -> dict[str, Any]:
    port = int(car.base.rsplit(":", 1)[1])
    good = GoodTraffic(oracle, seed=1)
    statuses: dict[str, Any] = {}
    five_xx, accepted, other = [], [], []

    async def bad_one(bad: Bad) -> Answer:
        if bad.raw is not None:
            return await send_raw(port, bad.raw)
        url = car.base + (bad.path or f"/v2/models/{MODEL}/infer")
        return await send(session, url, bad.body, bad.headers, bad.method)

    bads = bad_requests()
    rss_before = rss_mib(car.pid)
    for bad in bads:
        answers = await asyncio.gather(bad_one(bad), *(good.one(session, car.infer) for _ in range(15)))
        answer = answers[0]
        statuses[bad.kind] = answer.status
        if isinstance(answer.status, int) and answer.status >= 500:
            five_xx.append(f"{bad.kind}: {answer.status} {str(answer.body)[:200]}")
        elif answer.status == 200:
            accepted.append(bad.kind)
        elif not isinstance(answer.status, int):
            other.append(f"{bad.kind}: {answer.status} {str(answer.body)[:120]}")
    four_xx = sum(1 for s in statuses.values() if isinstance(s, int) and 400 <= s < 500)
    progress(f"malformed: {four_xx}/{len(bads)} answered 4xx; now the edge cases and the poison pill")

    edges, edge_problems = {}, []
    for kind, values in edge_requests():
        rid = f"edge-{len(edges)}"
        answers = await asyncio.gather(
            send(session, car.infer, infer_body(values, rid)), *(good.one(session, car.infer) for _ in range(15))
        )
        edges[kind] = answers[0].status
        if answers[0].status != 200:
            edge_problems.append(f"{kind}: {answers[0].status} {str(answers[0].body)[:200]}")
        elif (problem := flaw(answers[0].body, oracle.expected(values), rid)) is not None:
            edge_problems.append(f"{kind}: {problem}")

    pill_statuses: Counter[str] = Counter()
    pill = GoodTraffic(oracle, seed=2)
    for _ in range(20):
        answers = await asyncio.gather(
            send(session, car.infer, with_pill()),
            *(pill.one(session, car.infer) for _ in range(15)),
        )
        pill_statuses[str(answers[0].status)] += 1
    return {
        "bad_kinds": len(bads),
        "bad_answered_4xx": four_xx,
        "bad_answered_5xx": len(five_xx),
        "bad_accepted_200": accepted,
        "bad_client_errors": other,
        "five_xx": five_xx,
        "status_counts": dict(Counter(str(v) for v in statuses.values())),
        "kinds_not_400": {k: v for k, v in statuses.items() if v != 400},
        "good": good.tally.figures(),
        "edge_statuses": edges,
        "edge_problems": edge_problems,
        "poison_pill": {"rounds": 20, "bad_statuses": dict(pill_statuses), "good": pill.tally.figures()},
        "sidecar_rss_mib": [round(rss_before, 1), round(rss_mib(car.pid), 1)],
    }


def with_pill() -> bytes:
    values = [0.5] * WIDTH
    values[7] = 1e39
    return orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, WIDTH], "data": values}]})


# ---- phase 2: poisoned caches -------------------------------------------------------------------


def record(body: Any, tag: bytes = b"", version: int = 1) -> bytes:
    """A cache record as the sidecar writes them (msgpack), around ``body`` (JSON-encoded unless bytes)."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return msgpack.packb({"v": version, "body": raw, "text": None, "tag": tag})


def answer_body(shape: list[int], data: list[Any], datatype: str = "FP32", name: str = "logits") -> dict[str, Any]:
    return {
        "model_name": MODEL,
        "model_version": "1",
        "outputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}],
    }


#: Poisons a structure check can see (the rest, a forged body of the right form, only the HMAC key can).
UNDETECTABLE_WITHOUT_KEY = frozenset(
    {"forged values, right shape, no tag", "forged values, right shape, random tag", "another key's real record"}
)


def poisons(real: dict[str, bytes]) -> dict[str, bytes | dict[str, bytes]]:
    """What a hostile writer of Redis puts at every key: one value, or a value per key (``real``: the
    records the sidecar wrote there)."""
    keys = list(real)
    return {
        "garbage bytes": os.urandom(512),
        "empty value": b"",
        "20 MB value": b"\x00" * (20 << 20),
        "msgpack list": msgpack.packb([1, 2, 3]),
        "record version 2": record(answer_body([1, 2], [1.0, 2.0]), version=2),
        "tag of the wrong type": msgpack.packb({"v": 1, "body": b"{}", "text": None, "tag": "x"}),
        "body not JSON": record(b"\xff\x00not json"),
        "body a JSON list": record([1, 2]),
        "body nested 10000 deep": record(b"[" * 10000 + b"]" * 10000),
        "empty outputs": record({"model_name": MODEL, "outputs": []}),
        "no outputs": record({"model_name": MODEL}),
        "wrong shape [1, 3]": record(answer_body([1, 3], [1.0, 2.0, 3.0])),
        "wrong rows [2, 2]": record(answer_body([2, 2], [1.0, 2.0, 3.0, 4.0])),
        "shape with a bool": record(answer_body([True, 2], [1.0, 2.0])),
        "another model's output": record(
            {"model_name": "other", "outputs": answer_body([1, 2], [0.1, 0.9], name="probs")["outputs"]}
        ),
        "BYTES outputs": record(answer_body([1, 2], ["a", "b"], datatype="BYTES")),
        "FP32 declared, strings held": record(answer_body([1, 2], ["1", "2"])),
        "nulls in data": record(answer_body([1, 2], [None, None])),
        "booleans in data": record(answer_body([1, 2], [True, False])),
        "too many values": record(answer_body([1, 2], [1.0, 2.0, 3.0])),
        "duplicate outputs": record(
            {"model_name": MODEL, "outputs": [answer_body([1, 2], [1.0, 2.0])["outputs"][0]] * 2}
        ),
        "forged values, right shape, random tag": record(answer_body([1, 2], [123.0, -456.0]), tag=os.urandom(32)),
        "forged values, right shape, no tag": record(answer_body([1, 2], [123.0, -456.0])),
        "another key's real record": {key: real[keys[(i + 1) % len(keys)]] for i, key in enumerate(keys)},
    }


async def poisoned_cache(
    session: aiohttp.ClientSession, car: Front, store: redis.Redis, oracle: Oracle, keyed: bool, requests: int
) -> dict[str, Any]:
    """Warm the exact cache, then for each poison: overwrite every entry with it and ask again."""
    rng = np.random.default_rng(3)
    inputs = [rng.normal(size=(1, WIDTH)).astype(np.float32) for _ in range(requests)]
    expected = [oracle.expected(v) for v in inputs]

    async def ask_all() -> list[Answer]:
        return await asyncio.gather(*(send(session, car.infer, infer_body(v, f"c{i}")) for i, v in enumerate(inputs)))

    store.flushall()
    warm = Tally()
    for answers in (await ask_all(), await ask_all()):  # the first fills the cache, the second hits it
        for i, answer in enumerate(answers):
            warm.check(answer, expected[i], f"c{i}")
    hits_warm = sum(1 for a in answers if a.source == "exact")
    keys = sorted(k.decode() for k in store.scan_iter(match="leanserve:*exact*"))
    real = {k: store.get(k) or b"" for k in keys}
    _, before = scrape(car.base)
    rows, served_poison = [], 0
    visible, invisible = Tally(), Tally()  # answers after poisons a check can see / only the key can see
    for name, poison in poisons(real).items():
        for key in keys:
            store.set(key, poison[key] if isinstance(poison, dict) else poison)
        answers = await ask_all()
        from_cache = sum(1 for a in answers if a.source == "exact")
        served_poison += from_cache
        tally = invisible if name in UNDETECTABLE_WITHOUT_KEY and not keyed else visible
        bad_before = tally.wrong + tally.failed
        for i, answer in enumerate(answers):
            tally.check(answer, expected[i], f"c{i}")
        wrong = tally.wrong + tally.failed - bad_before
        _, now = scrape(car.base)
        failed_open = now.get("leanserve_redis_up", 1.0) == 0.0
        if failed_open:  # Redis timed out: the sidecar skips it for its back-off (1 s), which would hide the next
            await asyncio.sleep(1.2)
        rows.append(
            {
                "poison": name,
                "served_from_cache": from_cache,
                "wrong_or_failed": wrong,
                "redis_failed_open": failed_open,
            }
        )
    _, after = scrape(car.base)
    rejected = {
        k.split('reason="')[1].rstrip('"}'): v - before.get(k, 0.0)
        for k, v in after.items()
        if k.startswith("leanserve_cache_rejected_total{") and 'kind="exact"' in k and v - before.get(k, 0.0)
    }
    return {
        "hmac_key": keyed,
        "requests": requests,
        "keys_poisoned": len(keys),
        "poisons": len(rows),
        "warm_hits": hits_warm,
        "warm": warm.figures(),
        "answers_after_poison": visible.sent + invisible.sent,
        "served_from_poisoned_cache": served_poison,
        "wrong_answers_detectable_poisons": visible.wrong,
        "wrong_answers_undetectable_without_key": invisible.wrong,
        "failed": visible.failed + invisible.failed,
        "wrong_examples": visible.examples,
        "cache_rejected_total": rejected,
        "redis_failed_open_after": [r["poison"] for r in rows if r["redis_failed_open"]],
        "served_from_cache_by_poison": {r["poison"]: r["served_from_cache"] for r in rows},
        "sidecar_rss_mib": round(rss_mib(car.pid), 1),
    }


# ---- phase 3: unknown names ---------------------------------------------------------------------


async def in_pool(count: int, concurrency: int, job: Any) -> None:
    """Run ``job(i)`` for i in range(count), ``concurrency`` at a time."""
    counter = iter(range(count))

    async def worker() -> None:
        for i in counter:
            await job(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def unknown_names(session: aiohttp.ClientSession, car: Front, count: int) -> dict[str, Any]:
    body = infer_body(np.zeros((1, WIDTH), dtype=np.float32))
    statuses: Counter[str] = Counter()
    salt = secrets.token_hex(3)

    async def ask(i: int) -> None:
        answer = await send(session, f"{car.base}/v2/models/unknown-{salt}-{i}/infer", body)
        statuses[str(answer.status)] += 1

    await in_pool(200, 32, lambda i: ask(count + i))  # warm-up: the one label of unknown names exists now
    statuses.clear()
    size0, samples0 = scrape(car.base)
    rss = [rss_mib(car.pid)]
    start = time.perf_counter()
    half = count // 2
    await in_pool(half, 32, ask)
    rss.append(rss_mib(car.pid))
    await in_pool(count - half, 32, lambda i: ask(half + i))
    rss.append(rss_mib(car.pid))
    elapsed = time.perf_counter() - start
    size1, samples1 = scrape(car.base)
    return {
        "names": count,
        "seconds": round(elapsed, 1),
        "statuses": dict(statuses),
        "metrics_bytes": [size0, size1],
        "metrics_series": [len(samples0), len(samples1)],
        "new_series": sorted(set(samples1) - set(samples0))[:5],
        "sidecar_rss_mib": [round(r, 1) for r in rss],
        "rss_growth_mib": round(rss[-1] - rss[0], 1),
        "rss_growth_second_half_mib": round(rss[-1] - rss[1], 1),
        "rss_kib_per_1000_names_second_half": round((rss[-1] - rss[1]) * 1024 / max(1, (count - half) / 1000), 1),
    }


# ---- phase 4: overload --------------------------------------------------------------------------


async def overload(
    car: Front, model_pid: int, model_base: str, oracle: Oracle, seconds: float, connections: int, freeze_s: float
) -> dict[str, Any]:
    """A closed loop of ``connections`` clients (2 s timeout each), the model server frozen for ``freeze_s``."""
    rng = np.random.default_rng(5)
    pool = [rng.normal(size=(1, WIDTH)).astype(np.float32) for _ in range(256)]
    bodies = [infer_body(v) for v in pool]
    expected = [oracle.expected(v) for v in pool]
    statuses: Counter[str] = Counter()
    seconds_by: dict[str, list[float]] = {}
    tally = Tally()
    _, side0 = scrape(car.base)
    _, model0 = scrape(model_base)
    end = time.monotonic() + seconds
    chooser = random.Random(6)

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < end:
            i = chooser.randrange(len(pool))
            answer = await send(session, car.infer, bodies[i], timeout=2.0)
            statuses[str(answer.status)] += 1
            seconds_by.setdefault(str(answer.status), []).append(answer.seconds)
            if answer.status == 200:
                tally.check(answer, expected[i], None)

    async def freeze() -> None:
        await asyncio.sleep(seconds * 0.3)
        progress(f"overload: freezing the model server (SIGSTOP) for {freeze_s:g} s")
        os.kill(model_pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(freeze_s)
        finally:
            os.kill(model_pid, signal.SIGCONT)
        progress("overload: model server resumed (SIGCONT)")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(freeze(), *(client(session) for _ in range(connections)))
        await asyncio.sleep(1.5)  # what was in flight settles
        _, side1 = scrape(car.base)
        _, model1 = scrape(model_base)
        after = GoodTraffic(oracle, seed=9)
        await asyncio.gather(*(after.one(session, car.infer) for _ in range(50)))

    def delta(before: dict[str, float], now: dict[str, float], prefix: str, *labels: str) -> int:
        return int(total(now, prefix, *labels) - total(before, prefix, *labels))

    answered = delta(side0, side1, "leanserve_requests_total", 'code="200"')
    rows_upstream = int(
        side1.get(f'leanserve_batch_size_sum{{model="{MODEL}"}}', 0)
        - side0.get(f'leanserve_batch_size_sum{{model="{MODEL}"}}', 0)
    )
    rows_model = int(
        model1.get(f'leanserve_model_batch_size_sum{{model="{MODEL}"}}', 0)
        - model0.get(f'leanserve_model_batch_size_sum{{model="{MODEL}"}}', 0)
    )
    sidecar_codes = {
        k.split('code="')[1].split('"')[0]: int(v - side0.get(k, 0.0))
        for k, v in side1.items()
        if k.startswith("leanserve_requests_total{") and v - side0.get(k, 0.0)
    }
    sent = sum(statuses.values())
    return {
        "connections": connections,
        "seconds": seconds,
        "freeze_s": freeze_s,
        "client_timeout_s": 2.0,
        "requests": sent,
        "client_statuses": dict(statuses),
        "ok_200": statuses.get("200", 0),
        "status_429": statuses.get("429", 0),
        "status_503": statuses.get("503", 0),
        "status_504": statuses.get("504", 0),
        "client_timeouts": statuses.get("timeout", 0),
        "other_5xx": sum(n for s, n in statuses.items() if s.isdigit() and int(s) >= 500 and s not in ("503", "504")),
        "p50_ms_to_429": round(percentile(seconds_by.get("429", []), 50) * 1000, 2),
        "p99_ms_to_429": round(percentile(seconds_by.get("429", []), 99) * 1000, 2),
        "p50_ms_200": round(percentile(seconds_by.get("200", []), 50) * 1000, 2),
        "p99_ms_200": round(percentile(seconds_by.get("200", []), 99) * 1000, 2),
        "wrong_answers": tally.wrong,
        "sidecar_codes": sidecar_codes,
        "rows_sent_upstream": rows_upstream,
        "rows_run_by_model_server": rows_model,
        "rows_answered_200": answered,
        "rows_sent_for_callers_gone": rows_upstream - answered,
        "after": after.tally.figures(),
        "sidecar_rss_mib": round(rss_mib(car.pid), 1),
    }


# ---- the run ------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    path = make_model(work / f"{MODEL}.onnx")
    oracle = Oracle(path)
    key = secrets.token_hex(32)
    figures: dict[str, Any] = {}
    quiet = not args.server_logs
    with (
        redis_server(work, CLIENT_CPUS) as redis_port,
        model_server(path, MODEL, quiet=quiet, cpus=SERVER_CPUS) as server,
    ):
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        store = redis.Redis(port=redis_port)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
            progress("phase 1: malformed requests among good ones (sidecar without cache) ...")
            with front(server.url, quiet=quiet) as car:
                m = figures["malformed"] = await malformed(session, car, oracle)
            pill = m["poison_pill"]
            print(
                f"1. malformed: {m['bad_answered_4xx']}/{m['bad_kinds']} bad kinds answered 4xx, "
                f"{m['bad_answered_5xx']} 5xx, {len(m['bad_accepted_200'])} accepted; "
                f"good: {m['good']['sent']} sent, {m['good']['failed']} failed, {m['good']['wrong']} wrong; "
                f"edge cases: {len(m['edge_problems'])} problems; poison pill x20: bad {pill['bad_statuses']}, "
                f"good {pill['good']['sent']} sent, {pill['good']['failed']} failed, {pill['good']['wrong']} wrong",
                flush=True,
            )
            caches = figures["poisoned_cache"] = {}
            for keyed in (True, False):
                label = "with_key" if keyed else "without_key"
                progress(f"phase 2: poisoned exact cache, {label.replace('_', ' ')} ...")
                env = {"LEANSERVE_CACHE_HMAC_KEY": key if keyed else ""}
                with front(server.url, redis_url, quiet=quiet, **env) as car:
                    c = caches[label] = await poisoned_cache(session, car, store, oracle, keyed, args.cache_requests)
                print(
                    f"2. poisoned cache ({label.replace('_', ' ')}): {c['keys_poisoned']} keys x {c['poisons']} "
                    f"poisons, "
                    f"{c['answers_after_poison']} answers: {c['served_from_poisoned_cache']} from the cache, "
                    f"{c['wrong_answers_detectable_poisons']} wrong, {c['failed']} failed"
                    + (
                        f", {c['wrong_answers_undetectable_without_key']} forged-but-well-formed served (needs the key)"
                        if not keyed
                        else ""
                    )
                    + f"; rejected {c['cache_rejected_total']}",
                    flush=True,
                )
            progress(f"phase 3: {args.unknown_names} requests to distinct unknown model names ...")
            with front(server.url, redis_url, quiet=quiet, LEANSERVE_CACHE_HMAC_KEY=key) as car:
                u = figures["unknown_names"] = await unknown_names(session, car, args.unknown_names)
            print(
                f"3. unknown names: {u['names']} in {u['seconds']} s, statuses {u['statuses']}; /metrics "
                f"{u['metrics_bytes'][0]} -> {u['metrics_bytes'][1]} bytes, {u['metrics_series'][0]} -> "
                f"{u['metrics_series'][1]} series; sidecar RSS {' -> '.join(map(str, u['sidecar_rss_mib']))} MiB "
                f"(start, half, end: {u['rss_kib_per_1000_names_second_half']} KiB per 1000 names in the second half)",
                flush=True,
            )
        progress(f"phase 4: overload, {args.connections} connections for {args.overload_seconds:g} s ...")
        with front(server.url, quiet=quiet) as car:
            o = figures["overload"] = await overload(
                car, server.proc.pid, server.url, oracle, args.overload_seconds, args.connections, args.freeze_seconds
            )
        print(
            f"4. overload: {o['requests']} requests: {o['ok_200']} ok, {o['status_429']} x 429 (p50 "
            f"{o['p50_ms_to_429']} ms), {o['status_503']} x 503, {o['status_504']} x 504, {o['client_timeouts']} "
            f"client timeouts, {o['other_5xx']} other 5xx, {o['wrong_answers']} wrong; rows upstream "
            f"{o['rows_sent_upstream']} (model server ran {o['rows_run_by_model_server']}), answered "
            f"{o['rows_answered_200']}: {o['rows_sent_for_callers_gone']} for callers gone (at most: in flight as "
            f"they left); after: "
            f"{o['after']['failed']} of {o['after']['sent']} failed",
            flush=True,
        )
    return figures


def verdict(f: dict[str, Any]) -> dict[str, Any]:
    m, u, o = f["malformed"], f["unknown_names"], f["overload"]
    caches = f["poisoned_cache"].values()
    return {
        "innocent_failed": m["good"]["failed"]
        + m["poison_pill"]["good"]["failed"]
        + sum(c["failed"] + c["warm"]["failed"] for c in caches)
        + o["after"]["failed"],
        "wrong_answers": m["good"]["wrong"]
        + m["poison_pill"]["good"]["wrong"]
        + len(m["edge_problems"])
        + sum(c["wrong_answers_detectable_poisons"] + c["warm"]["wrong"] for c in caches)
        + o["wrong_answers"],
        "five_xx_on_bad_input": m["bad_answered_5xx"],
        "bad_not_4xx": m["bad_kinds"] - m["bad_answered_4xx"],
        "forged_entries_served_with_key": f["poisoned_cache"]["with_key"]["served_from_poisoned_cache"],
        "metrics_series_growth": u["metrics_series"][1] - u["metrics_series"][0],
        "rss_growth_mib": u["rss_growth_mib"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer names and a shorter overload (about 1 min)")
    parser.add_argument("--unknown-names", type=int, default=None, help="distinct unknown names (20000; quick 5000)")
    parser.add_argument("--overload-seconds", type=float, default=None, help="length of the burst (10; quick 5)")
    parser.add_argument("--freeze-seconds", type=float, default=3.0, help="model server frozen during the burst")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--cache-requests", type=int, default=8, help="distinct requests cached, then poisoned")
    parser.add_argument("--server-logs", action="store_true", help="let the servers log to this terminal")
    args = parser.parse_args()
    args.unknown_names = args.unknown_names or (5000 if args.quick else 20000)
    args.overload_seconds = args.overload_seconds or (5.0 if args.quick else 10.0)
    if CLIENT_CPUS is not None:
        os.sched_setaffinity(0, CLIENT_CPUS)  # the load generator; the servers are started on SERVER_CPUS
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="leanserve-hostile-") as tmp:
        figures = asyncio.run(run(args, Path(tmp)))
    figures["verdict"] = v = verdict(figures)
    print(
        f"\nverdict: {v['innocent_failed']} innocent requests failed, {v['wrong_answers']} wrong answers served, "
        f"{v['five_xx_on_bad_input']} 5xx on bad input ({v['bad_not_4xx']} bad kinds not answered 4xx), "
        f"{v['forged_entries_served_with_key']} poisoned entries served with the HMAC key, /metrics series "
        f"+{v['metrics_series_growth']} and sidecar RSS +{v['rss_growth_mib']} MiB after "
        f"{figures['unknown_names']['names']} unknown names"
    )
    print(
        f"(servers on CPUs {sorted(SERVER_CPUS or [])}, client on {sorted(CLIENT_CPUS or [])}; "
        f"took {time.monotonic() - started:.0f} s)"
    )
    print(json.dumps({"benchmark": "hostile", "quick": args.quick, **figures}, default=float))


if __name__ == "__main__":
    main()
