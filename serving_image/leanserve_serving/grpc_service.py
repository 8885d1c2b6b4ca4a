"""The sidecar's v2 gRPC front door: ``inference.GRPCInferenceService``, over the REST handlers' path.

A ``ModelInferRequest`` becomes the same :class:`InferRequest` a REST body decodes to, and takes the
same path: a place in the batcher's queue first, then :meth:`Sidecar.answer` (checks, caches, the
dynamic batcher), so gRPC and REST requests share batches and cache entries, and are counted in the
same metrics under the HTTP status they would have had. Errors are chosen here, at the edge: the
protocol's and the batcher's errors carry HTTP statuses (``http_error``), mapped to gRPC codes by
:data:`GRPC_CODES`. Metadata and readiness come from the upstream, as the REST proxy reads them.

Responses carry their outputs in ``raw_output_contents``, as Triton does (what tritonclient expects);
requests may use ``raw_input_contents`` (tritonclient's default) or typed ``contents``. Raw contents are
laid out as the REST binary tensor extension's tensors, and read and written by the same functions: a
gRPC request and its REST twin, JSON or binary, make the same tensors, so they share batches and cache keys.

The generated modules register the ``inference`` package in protobuf's default pool, as tritonclient's
own do: the two cannot be imported into one process (the sidecar never imports tritonclient).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np

from leanserve_serving.batcher import BatchError, Place
from leanserve_serving.proto import grpc_predict_v2_pb2 as pb
from leanserve_serving.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from leanserve_serving.sidecar import CLIENT_GONE, RETRY_LATER, Sidecar, http_error
from leanserve_serving.tensors import (
    DATATYPES,
    UNSUPPORTED_PARAMETERS,
    InferRequest,
    ProtocolError,
    Tensor,
    array_from_bytes,
    check_model_name,
    tensor_bytes,
    typed_array,
)

log = logging.getLogger("leanserve.grpc")

#: HTTP statuses of the shared path -> gRPC codes (other 4xx: INVALID_ARGUMENT, other 5xx: INTERNAL).
GRPC_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,  # with retry-after: 1, as REST's Retry-After
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

#: Where each datatype's elements travel in typed ``contents``; FP16 has no field (raw contents only).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

#: What tells the client where an answer came from (REST's ``X-Leanserve-Source`` header).
SOURCE_METADATA = "x-leanserve-source"


def grpc_code(status: int) -> grpc.StatusCode:
    """The gRPC code of an HTTP status of the shared path."""
    if status in GRPC_CODES:
        return GRPC_CODES[status]
    return grpc.StatusCode.INVALID_ARGUMENT if 400 <= status < 500 else grpc.StatusCode.INTERNAL


def parameter_value(parameter: pb.InferParameter) -> Any:
    """The Python value of one parameter (whichever kind it holds; None when it holds none)."""
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind is not None else None


def parameters_of(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """A parameters map as the dict a REST body's ``parameters`` decodes to."""
    return {key: parameter_value(value) for key, value in parameters.items()}


def refuse_unsupported(parameters: Mapping[str, Any], where: str) -> None:
    """INVALID_ARGUMENT naming the extension when ``parameters`` ask for one the sidecar does not implement
    (shared memory, classification), as REST refuses them: ignored, the answer would not be what was asked."""
    for key, extension in UNSUPPORTED_PARAMETERS.items():
        if key in parameters:
            raise ProtocolError(400, f"{where}: the {extension} extension is not supported")


def decode_contents(name: str, datatype: str, shape: tuple[int, ...], contents: pb.InferTensorContents) -> np.ndarray:
    """One input's typed contents as an array of its datatype and shape. Integers are range-checked as REST
    checks JSON numbers (int_contents are 32-bit: an INT8 of 300 is refused, never wrapped); floats are
    taken as they are (NaN included, as in raw contents: the binary hop upstream carries them)."""
    if datatype not in CONTENTS_FIELD:
        raise ProtocolError(400, f"input '{name}': {datatype} travels in raw_input_contents only")
    field = CONTENTS_FIELD[datatype]
    values = list(getattr(contents, field))
    count = math.prod(shape)
    if len(values) != count:
        raise ProtocolError(
            400, f"input '{name}': shape {list(shape)} needs {count} elements, {field} holds {len(values)}"
        )
    if datatype in ("FP32", "FP64"):
        return np.array(values, dtype=DATATYPES[datatype]).reshape(shape)
    if datatype == "BYTES":  # bytes, as the binary extension's BYTES: the cache key is the same either way
        array = np.empty(count, dtype=object)
        array[:] = values
        return array.reshape(shape)
    try:
        return typed_array(values, datatype).reshape(shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(400, f"input '{name}': data does not match datatype {datatype}: {exc}") from None


def decode_input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, where: str) -> Tensor:
    """One input tensor, from its raw contents when the request uses them (read as the binary extension's
    tensors are: the layout is the same), else from its typed contents."""
    name = tensor.name
    if not name:
        raise ProtocolError(400, f"{where}.name must be a non-empty string")
    datatype = tensor.datatype
    if datatype not in DATATYPES:
        raise ProtocolError(400, f"input '{name}': unknown datatype {datatype!r}; one of {', '.join(DATATYPES)}")
    if any(d < 0 for d in tensor.shape):
        raise ProtocolError(400, f"input '{name}': shape must be a list of non-negative integers")
    parameters = parameters_of(tensor.parameters)
    refuse_unsupported(parameters, f"input '{name}'")
    shape = tuple(int(d) for d in tensor.shape)
    if raw is None:
        return Tensor(name, datatype, shape, decode_contents(name, datatype, shape, tensor.contents), parameters)
    if tensor.HasField("contents"):
        raise ProtocolError(400, f"input '{name}': contents and raw_input_contents both given; use one")
    data = array_from_bytes(memoryview(raw), datatype, math.prod(shape), f"input '{name}' (raw_input_contents)")
    return Tensor(name, datatype, shape, data.reshape(shape), parameters)


def decode_infer_request(message: pb.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest as the :class:`InferRequest` its REST twin decodes to (same tensors, same cache
    key), refusing what REST refuses, with the same reasons where the two protocols share them."""
    if not message.inputs:
        raise ProtocolError(400, "'inputs' must be a non-empty list of tensors")
    raws = list(message.raw_input_contents)
    if raws and len(raws) != len(message.inputs):
        raise ProtocolError(
            400, f"raw_input_contents holds {len(raws)} entries for {len(message.inputs)} inputs; one per input"
        )
    tensors = [
        decode_input(tensor, raws[i] if raws else None, f"inputs[{i}]") for i, tensor in enumerate(message.inputs)
    ]
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ProtocolError(400, f"duplicate input names: {names}")
    for output in message.outputs:
        refuse_unsupported(output.parameters, f"output '{output.name}'")
    parameters = parameters_of(message.parameters)
    refuse_unsupported(parameters, "parameters")
    return InferRequest(
        inputs=tensors,
        id=message.id or None,
        parameters=parameters,
        outputs=[o.name for o in message.outputs] or None,
    )


def encode_infer_response(body: Mapping[str, Any], request_id: str | None) -> pb.ModelInferResponse:
    """A v2 response body (the model's answer or a cache hit's) as a ModelInferResponse with raw outputs."""
    response = pb.ModelInferResponse(
        model_name=body["model_name"], model_version=body.get("model_version", ""), id=request_id or ""
    )
    for output in body["outputs"]:
        response.outputs.add(name=output["name"], datatype=output["datatype"], shape=output["shape"])
        response.raw_output_contents.append(tensor_bytes(output["datatype"], output["data"]))
    return response


def tensor_metadata(raw: Mapping[str, Any]) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=raw["name"], datatype=raw["datatype"], shape=[int(d) for d in raw["shape"]]
    )


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The service's handlers over one sidecar (its upstream, batcher, caches, metrics and drain state)."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar

    async def upstream_json(self, path: str, context: grpc.aio.ServicerContext) -> dict[str, Any]:
        """An upstream metadata or readiness answer (a 200's body); any other status aborts the call."""
        try:
            status, payload = await self.sidecar.state.upstream.call("GET", path)
        except ProtocolError as exc:
            await context.abort(grpc_code(exc.status), exc.reason)
        if status != 200:
            await context.abort(grpc_code(status), str(payload.get("error", f"upstream answered {status}")))
        return payload

    async def model_path(self, name: str, context: grpc.aio.ServicerContext) -> str:
        """The upstream path of a model, its name checked (it is spliced into the path)."""
        try:
            return f"/v2/models/{check_model_name(name)}"
        except ProtocolError as exc:
            await context.abort(grpc_code(exc.status), exc.reason)

    async def ServerLive(  # noqa: N802 (the protocol's method names)
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(  # noqa: N802
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        """Ready as REST's readiness is: not draining, and the upstream ready at the last health check."""
        sidecar = self.sidecar
        return pb.ServerReadyResponse(ready=not sidecar.drain.active and sidecar.state.upstream.ready)

    async def ModelReady(  # noqa: N802
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """The upstream's answer for the model: not ready (not an error) when it does not serve it."""
        path = await self.model_path(request.name, context)
        try:
            status, _ = await self.sidecar.state.upstream.call("GET", path + "/ready")
        except ProtocolError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=status == 200)

    async def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        meta = await self.upstream_json("/v2", context)
        return pb.ServerMetadataResponse(
            name=meta.get("name", ""), version=meta.get("version", ""), extensions=meta.get("extensions", [])
        )

    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        meta = await self.upstream_json(await self.model_path(request.name, context), context)
        return pb.ModelMetadataResponse(
            name=meta.get("name", request.name),
            versions=[str(v) for v in meta.get("versions", [])],
            platform=meta.get("platform", ""),
            inputs=[tensor_metadata(i) for i in meta.get("inputs", [])],
            outputs=[tensor_metadata(o) for o in meta.get("outputs", [])],
        )

    async def ModelInfer(  # noqa: N802
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        """REST's infer (``Sidecar.infer``) over gRPC: the same admission, path, metrics and error statuses.

        A failed call is counted before its status goes out (``abort`` sends it at once): whoever reads the
        metrics after an answer finds it counted, as after a REST answer."""
        sidecar = self.sidecar
        model = request.model_name
        start = time.perf_counter()
        code = 500  # until the request is answered
        place: Place | None = None
        error = ProtocolError(500, "internal error")
        try:
            check_model_name(model)
            place = sidecar.state.batcher.admit()  # before decoding: refusing costs no numpy
            decoded = decode_infer_request(request)
            body, source = await sidecar.answer(model, decoded, place)
            response = encode_infer_response(body, decoded.id)
            context.set_trailing_metadata(((SOURCE_METADATA, source),))
            code = 200
            return response
        except (ProtocolError, BatchError) as exc:
            error = http_error(exc)
            code = error.status
        except asyncio.CancelledError:  # the client went away (or its deadline passed)
            code = CLIENT_GONE
            raise
        except Exception as exc:  # the server must survive anything a request triggers, as REST's middleware
            log.exception("request failed model=%s protocol=grpc", model)
            error = ProtocolError(500, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            if place is not None:
                place.release()
            sidecar.metrics.answered(sidecar.model_label(model), code, time.perf_counter() - start)
        retry = (("retry-after", "1"),) if error.status in RETRY_LATER else ()
        await context.abort(grpc_code(error.status), error.reason, retry)


def listen_address(host: str, port: int) -> str:
    """``host:port`` as gRPC reads it (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_grpc_server(sidecar: Sidecar, host: str, port: int, max_message_bytes: int) -> grpc.aio.Server:
    """Serve the v2 gRPC service for ``sidecar`` in the running event loop (aiohttp's), on ``host:port``.

    Requests are bounded as REST bodies are (``max_message_bytes``); the port is not shared with another
    process (gRPC would otherwise set SO_REUSEPORT and split the connections silently between two
    sidecars started on one port), so a port in use fails the start-up.
    """
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", max_message_bytes), ("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(sidecar), server)
    address = listen_address(host, port)
    server.add_insecure_port(address)
    await server.start()
    log.info("event=serving protocol=grpc address=%s max_message_bytes=%d", address, max_message_bytes)
    return server
