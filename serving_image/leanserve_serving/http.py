"""HTTP plumbing shared by the model server and the sidecar: JSON responses, v2 error bodies, serving and draining.

Stopping without losing a request (what a Deployment rollout asks of every old
pod; kserve#3360 and knative#429 are what happens otherwise): on SIGTERM a
process answers its readiness probe 503 at once, keeps serving every request,
in flight or new, for ``drain_seconds`` while the endpoints, kube-proxy and
clients catch up (each response closing its connection, so kept-alive clients
reconnect to a pod that stays), then stops listening and lets the requests
still in flight finish (at most ``shutdown_timeout_s``) before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Protocol, TypeVar

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CollectorRegistry, generate_latest

from leanserve_serving.config import load_config
from leanserve_serving.tensors import HEADER_LENGTH, ProtocolError, dumps, error_body

log = logging.getLogger("leanserve.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Rows per batch: the buckets of the sidecar's and the model server's histograms (the same, so they compare).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServingConfig(Protocol):
    """What serving a process needs from its settings (ModelServerConfig and SidecarConfig have it)."""

    host: str
    port: int
    drain_seconds: float

    @property
    def shutdown_timeout_s(self) -> float: ...


Config = TypeVar("Config", bound=ServingConfig)


class Drain:
    """Whether this process is draining (it got SIGTERM): its readiness answers 503, its responses close."""

    def __init__(self) -> None:
        self.since: float | None = None

    @property
    def active(self) -> bool:
        return self.since is not None

    def start(self) -> None:
        if self.since is None:
            self.since = time.monotonic()


DRAIN = web.AppKey("drain", Drain)

#: True on an application whose handlers are cancelled when their client disconnects (the sidecar: a queued
#: request whose caller has gone must not be sent upstream). aiohttp lets them run to the end by default.
CANCEL_ON_DISCONNECT = web.AppKey("cancel_on_disconnect", bool)


def drainable(app: web.Application) -> Drain:
    """Give ``app`` the drain state :func:`serve` sets on SIGTERM, and close every connection while draining.

    ``Connection: close`` on each response during the drain moves kept-alive
    clients (and proxies) off this process one request at a time, without
    cutting any request: their next one opens a new connection, which the
    Service then sends to a pod that is staying.
    """
    drain = app[DRAIN] = Drain()

    @web.middleware
    async def close_while_draining(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if drain.active and not response.prepared:
            response.force_close()
        return response

    app.middlewares.insert(0, close_while_draining)  # outermost: it sees the response errors become too
    return drain


class JsonErrorRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, answering the requests its HTTP parser refuses with the v2 error body.

    Those never reach a handler or a middleware: aiohttp answers them itself, in plain text.
    """

    __slots__ = ()

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs, and refuses when a response has begun
        reason = message or (str(exc) if exc is not None and status != 500 else HTTPStatus(status).phrase)
        response = error_response(status, reason)
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    """aiohttp's low-level server, making :class:`JsonErrorRequestHandler` connections."""

    def __call__(self) -> web.RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


async def serve(app: web.Application, config: ServingConfig) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then drain and stop (see the module's docstring).

    A second signal during the drain cuts it short (a person pressing Ctrl-C
    twice); the requests in flight still finish.
    """
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=config.shutdown_timeout_s,
        handler_cancellation=app.get(CANCEL_ON_DISCONNECT, False),
    )
    await runner.setup()
    # aiohttp offers no hook for the responses its parser writes: the runner's server makes ours instead.
    runner.server.__class__ = JsonErrorServer  # type: ignore[union-attr]
    try:
        await web.TCPSite(runner, config.host, config.port).start()
        loop = asyncio.get_running_loop()
        signals: asyncio.Queue[int] = asyncio.Queue()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, signals.put_nowait, sig)
        log.info("event=serving host=%s port=%d drain_seconds=%g", config.host, config.port, config.drain_seconds)
        received = await signals.get()
        drain = app.get(DRAIN)
        if drain is not None:
            drain.start()
        log.info("event=draining signal=%s seconds=%g", signal.Signals(received).name, config.drain_seconds)
        if config.drain_seconds > 0:
            try:
                await asyncio.wait_for(signals.get(), config.drain_seconds)
                log.info("event=drain_cut_short")
            except TimeoutError:
                pass
        log.info("event=stopping shutdown_timeout_s=%g", config.shutdown_timeout_s)
    finally:
        await runner.cleanup()
    log.info("event=stopped")


def serve_main(
    parser: argparse.ArgumentParser,
    config_cls: type[Config],
    create_app: Callable[[Config], web.Application],
    argv: list[str] | None,
) -> None:
    """The entry point of a serving process: flags over settings, structured logs, then serve until drained.

    Uses uvloop when it is installed (a faster event loop for the same code).
    """
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = load_config(config_cls, vars(args))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        app = create_app(config)
    except Exception as exc:  # any start-up failure: one line that a pod's logs and events show
        print(f"error: cannot start: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    asyncio.run(serve(app, config))


def metrics_handler(registry: CollectorRegistry) -> Handler:
    """``GET /metrics`` for one Prometheus registry (each process, or test app, has its own)."""

    async def prometheus(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    return prometheus


async def read_body(request: web.Request) -> bytes:
    """The request's body, decoded as its ``Content-Encoding`` says; a 400 when it cannot be."""
    try:
        return await request.read()
    except RequestPayloadError as exc:
        raise ProtocolError(400, f"cannot read the request body: {exc}") from None


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response encoded with orjson (several times faster than the stdlib on tensors)."""
    return web.Response(body=dumps(body), status=status, content_type="application/json", headers=headers)


def infer_response(payload: bytes, header_length: int | None, headers: dict[str, str] | None = None) -> web.Response:
    """An infer response from :func:`~leanserve_serving.tensors.encode_body`'s payload: JSON, or a JSON header
    of ``header_length`` bytes followed by binary tensor data (``application/octet-stream``, as Triton answers)."""
    if header_length is None:
        return web.Response(body=payload, content_type="application/json", headers=headers)
    binary_headers = {**(headers or {}), HEADER_LENGTH: str(header_length)}
    return web.Response(body=payload, content_type="application/octet-stream", headers=binary_headers)


def error_response(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    """The v2 error shape, ``{"error": reason}``, with a status a client can act on."""
    return web.Response(body=error_body(reason), status=status, content_type="application/json", headers=headers)


@web.middleware
async def protocol_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into a v2 error body: protocol errors keep their status, the rest are 500s."""
    try:
        return await handler(request)
    except ProtocolError as exc:
        return error_response(exc.status, exc.reason)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(413, f"request body too large: {exc.text}")
    except web.HTTPException as exc:
        if exc.status >= 400:
            return error_response(exc.status, exc.reason or "error")
        raise
    except Exception as exc:  # the server must survive anything a request triggers
        log.exception("request failed path=%s", request.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
