"""The model server: one ONNX model, ONNX Runtime, the Open Inference Protocol (v2) over HTTP.

It runs whatever batch it is sent as one ``session.run`` (the sidecar does the
batching), so the same process is also the honest per-request baseline when
clients call it directly.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from leanserve_serving import __version__
from leanserve_serving.config import ModelServerConfig
from leanserve_serving.cpus import cpu_limit
from leanserve_serving.http import (
    BATCH_BUCKETS,
    drainable,
    error_response,
    infer_response,
    json_response,
    metrics_handler,
    protocol_errors,
    read_body,
    serve_main,
)
from leanserve_serving.recent import RecentMean
from leanserve_serving.tensors import (
    EXTENSIONS,
    HEADER_LENGTH,
    ORT_TYPES,
    InferRequest,
    ProtocolError,
    Tensor,
    TensorSpec,
    check_inputs,
    check_model_name,
    decode_request,
    encode_body,
    encode_response,
)

log = logging.getLogger("leanserve.model_server")

#: The longest recent ``session.run`` (seconds, moving average) run on the event loop itself rather than
#: handed to a worker thread. Handing a run over costs a thread wake-up, a GIL hand-off and a future
#: chained back to the loop: about 100 us of one core, measured, which is more than a tiny model's whole
#: run (20 us for the 64-512-512-2 MLP). A run this short delays the loop's other work by no more than
#: what the hand-off itself would have cost it; a longer run goes to the thread, so health checks and
#: request reads keep flowing while it runs.
INLINE_RUN_S = 0.001


def runs_inline(recent_run_s: float, concurrency: int) -> bool:
    """Whether the next ``session.run`` runs on the event loop: only with one run in flight at a time
    (``concurrency`` 1: several runs in flight need the worker threads, on several cores), and only once a
    run has been timed (``recent_run_s`` > 0) and found short."""
    return concurrency == 1 and 0 < recent_run_s <= INLINE_RUN_S


def spec_of(node: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else -1 for d in node.shape)
    return TensorSpec(node.name, ORT_TYPES.get(node.type, node.type), shape)


def text_array(tensor: Tensor) -> np.ndarray:
    """A BYTES tensor as the str array ONNX Runtime's string inputs take: binary elements arrive as bytes,
    which must be UTF-8 (``astype(str)`` would turn them into their repr)."""
    flat = tensor.data.ravel()
    out = np.empty(flat.size, dtype=object)
    for index, value in enumerate(flat):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError(
                    400,
                    f"input '{tensor.name}': BYTES element {index} is not UTF-8 (the model's string input needs text)",
                ) from None
        out[index] = str(value)
    return out.reshape(tensor.data.shape)


class LoadedModel:
    """An ONNX Runtime session with the metadata the v2 protocol needs."""

    def __init__(self, config: ModelServerConfig) -> None:
        path = Path(config.model_path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        available = ort.get_available_providers()
        if config.provider == "cuda" or (config.provider == "auto" and "CUDAExecutionProvider" in available):
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu finds the CUDA and cuDNN libraries of the nvidia-* wheels (the GPU
            # image has no system CUDA) only when asked to load them.
            ort.preload_dlls(directory="")
        options = ort.SessionOptions()
        options.intra_op_num_threads = config.threads or cpu_limit()
        options.inter_op_num_threads = 1
        if not config.spin:
            # ORT's worker threads busy-wait for the next op by default: on a CPU shared
            # with the HTTP front door that burns the cores the requests need.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        start = time.perf_counter()
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for corrupt files
            raise ValueError(f"cannot load {path} with ONNX Runtime: {exc}") from exc
        self.load_seconds = time.perf_counter() - start
        self.name = config.model_name
        self.version = config.model_version
        self.threads = options.intra_op_num_threads
        self.providers = self.session.get_providers()
        self.inputs = [spec_of(i) for i in self.session.get_inputs()]
        self.outputs = [spec_of(o) for o in self.session.get_outputs()]

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnxruntime_onnx",
            "inputs": [i.to_json() for i in self.inputs],
            "outputs": [o.to_json() for o in self.outputs],
            "parameters": {"providers": self.providers, "threads": self.threads, "load_seconds": self.load_seconds},
        }

    def feeds(self, request: InferRequest) -> dict[str, np.ndarray]:
        """Check the request against the graph's inputs; return the arrays to run."""
        check_inputs(self.inputs, request)
        return {t.name: text_array(t) if t.datatype == "BYTES" else t.data for t in request.inputs}

    def run(self, feeds: dict[str, np.ndarray], wanted: list[str] | None) -> list[Tensor]:
        names = [o.name for o in self.outputs]
        if wanted is not None:
            unknown = [w for w in wanted if w not in names]
            if unknown:
                raise ProtocolError(400, f"unknown output(s) {unknown}; the model has {names}")
            names = wanted
        results = self.session.run(names, feeds)
        specs = {o.name: o for o in self.outputs}
        return [
            Tensor(n, specs[n].datatype, tuple(r.shape), np.asarray(r)) for n, r in zip(names, results, strict=True)
        ]


class ModelServerMetrics:
    """Prometheus metrics of the model server (own registry: several servers can share a process in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.load_seconds = Gauge(
            "leanserve_model_load_seconds", "Model load (cold start) time", registry=self.registry
        )
        self.requests = Counter(
            "leanserve_model_requests_total",
            "Infer requests by model and status code",
            ["model", "code"],
            registry=self.registry,
        )
        self.inference = Histogram(
            "leanserve_model_inference_seconds",
            "session.run time per call",
            ["model"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
        )
        self.batch = Histogram(
            "leanserve_model_batch_size",
            "Rows per session.run",
            ["model"],
            registry=self.registry,
            buckets=BATCH_BUCKETS,
        )


def create_app(config: ModelServerConfig) -> web.Application:
    """The aiohttp application serving one model."""
    model = LoadedModel(config)
    log.info(
        "model loaded name=%s path=%s load_seconds=%.3f providers=%s threads=%d",
        model.name,
        config.model_path,
        model.load_seconds,
        ",".join(model.providers),
        model.threads,
    )
    metrics = ModelServerMetrics()
    metrics.load_seconds.set(model.load_seconds)
    # One model: its children made once (``labels()`` takes a lock and checks its arguments on every call).
    run_time, batch_rows = metrics.inference.labels(model.name), metrics.batch.labels(model.name)
    answered = functools.cache(lambda code: metrics.requests.labels(model.name, str(code)))
    executor = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="ort")
    run_s = RecentMean()  # the recent session.run time
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[protocol_errors])
    drain = drainable(app)
    app["model"] = model

    def known(request: web.Request) -> LoadedModel:
        name = check_model_name(request.match_info["name"])
        if name != model.name:
            raise ProtocolError(404, f"unknown model '{name}'; this server serves '{model.name}'")
        version = request.match_info.get("version")
        if version is not None and version != model.version:
            raise ProtocolError(404, f"model '{name}' has no version '{version}'; it has '{model.version}'")
        return model

    async def live(_: web.Request) -> web.Response:
        return json_response({"live": True})

    async def ready(_: web.Request) -> web.Response:
        if drain.active:
            return error_response(503, "draining: shutting down")
        return json_response({"ready": True})

    async def server_metadata(_: web.Request) -> web.Response:
        return json_response({"name": "leanserve-model-server", "version": __version__, "extensions": EXTENSIONS})

    async def model_metadata(request: web.Request) -> web.Response:
        return json_response(known(request).metadata())

    async def model_ready(request: web.Request) -> web.Response:
        known(request)
        return json_response({"name": model.name, "ready": True})

    async def infer(request: web.Request) -> web.Response:
        target = known(request)
        code = 200
        try:
            decoded = decode_request(await read_body(request), request.headers.get(HEADER_LENGTH))
            feeds = target.feeds(decoded)
            first = decoded.inputs[0]
            rows = first.shape[0] if first.shape else 1
            start = time.perf_counter()
            if runs_inline(run_s.value, config.concurrency):
                outputs = target.run(feeds, decoded.outputs)
            else:
                loop = asyncio.get_running_loop()
                outputs = await loop.run_in_executor(executor, target.run, feeds, decoded.outputs)
            elapsed = time.perf_counter() - start
            run_s.add(elapsed)
            run_time.observe(elapsed)
            batch_rows.observe(rows)
            body = encode_response(target.name, target.version, decoded.id, outputs)
            return infer_response(*encode_body(body, decoded.encoding))
        except ProtocolError as exc:
            code = exc.status
            raise
        except web.HTTPException as exc:  # 413: the body is over the limit
            code = exc.status
            raise
        except Exception:
            code = 500
            raise
        finally:
            answered(code).inc()

    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/models/{name}", model_metadata)
    app.router.add_get("/v2/models/{name}/versions/{version}", model_metadata)
    app.router.add_get("/v2/models/{name}/ready", model_ready)
    app.router.add_get("/v2/models/{name}/versions/{version}/ready", model_ready)
    app.router.add_post("/v2/models/{name}/infer", infer)
    app.router.add_post("/v2/models/{name}/versions/{version}/infer", infer)
    app.router.add_get("/metrics", metrics_handler(metrics.registry))
    app.on_cleanup.append(lambda _: asyncio.to_thread(executor.shutdown))
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="leanserve model server (ONNX Runtime, Open Inference Protocol v2)")
    parser.add_argument("--model", dest="model_path")
    parser.add_argument("--name", dest="model_name")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--provider", choices=("auto", "cpu", "cuda"))
    serve_main(parser, ModelServerConfig, create_app, argv)


if __name__ == "__main__":
    main()
