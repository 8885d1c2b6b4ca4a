"""HTTP plumbing shared by the model server and the sidecar: JSON responses and v2 error bodies."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from leanserve_serving.config import load_config
from leanserve_serving.tensors import ProtocolError, dumps, error_body

log = logging.getLogger("leanserve.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Config = TypeVar("Config")


def serve_main(
    parser: argparse.ArgumentParser,
    config_cls: type[Config],
    create_app: Callable[[Config], web.Application],
    argv: list[str] | None,
) -> None:
    """The entry point of a serving process: flags over settings, structured logs, then serve.

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
    web.run_app(app, host=config.host, port=config.port, access_log=None, print=None)  # type: ignore[attr-defined]


def metrics_handler(registry: CollectorRegistry) -> Handler:
    """``GET /metrics`` for one Prometheus registry (each process, or test app, has its own)."""

    async def prometheus(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    return prometheus


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response encoded with orjson (several times faster than the stdlib on tensors)."""
    return web.Response(body=dumps(body), status=status, content_type="application/json", headers=headers)


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
