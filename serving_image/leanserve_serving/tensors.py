"""Open Inference Protocol (v2) tensors: decoding requests, encoding responses.

One module for both the model server and the sidecar, so that a request the
sidecar accepts is one the model server accepts. Every malformed request ends
in a :class:`ProtocolError` carrying an HTTP status and a reason a client can act on.

Both JSON tensors and the binary tensor data extension (what tritonclient sends by
default): the JSON header first, its length in ``Inference-Header-Content-Length``,
then each binary tensor's raw bytes in order, its size in ``parameters.binary_data_size``
(little-endian; BYTES elements as a 4-byte length and the bytes; BOOL one byte each).
A binary tensor decodes to the same numpy-backed :class:`Tensor` as its JSON twin, so
batching and the caches never see the encoding; which outputs travel binary is the
request's :class:`OutputEncoding`, applied when the response is written.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

#: v2 datatype -> numpy dtype. BYTES tensors hold Python str/bytes objects.
DATATYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}

#: ONNX Runtime type strings -> v2 datatypes.
ORT_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


#: The longest model name accepted (a Kubernetes object name's limit).
MAX_MODEL_NAME = 253

#: A model name: letters, digits, '-', '_' and '.' (KServe's and Kubernetes' names fit), never '.' or '..'.
MODEL_NAME = re.compile(rf"(?!\.\.?$)[A-Za-z0-9._-]{{1,{MAX_MODEL_NAME}}}")

#: The request and response header giving the JSON header's length when binary tensor data follows it.
HEADER_LENGTH = "Inference-Header-Content-Length"

#: A tensor's ``parameters`` key: how many bytes of the binary part it takes.
BINARY_SIZE = "binary_data_size"

#: The request ``parameters`` key: every output in binary unless the output itself says otherwise.
BINARY_OUTPUT = "binary_data_output"

#: A requested output's ``parameters`` key: this output in binary (true) or JSON (false).
BINARY_DATA = "binary_data"

#: The v2 extensions this server implements (server metadata's ``extensions``).
EXTENSIONS = ["binary_tensor_data"]

#: Parameters of v2 extensions this server does not implement, and the extension's name: refused with a 400
#: rather than ignored (a client asking for shared memory must not read an answer that is not there).
UNSUPPORTED_PARAMETERS = {
    "shared_memory_region": "shared memory (shared_memory_region)",
    "shared_memory_byte_size": "shared memory (shared_memory_byte_size)",
    "shared_memory_offset": "shared memory (shared_memory_offset)",
    "classification": "classification",
}

#: The deepest nesting of a tensor's ``data`` (numpy's limit on dimensions).
MAX_DATA_DEPTH = 64

#: The deepest nesting of ``parameters`` (orjson refuses to write past 254; nobody needs near that).
MAX_PARAMETER_DEPTH = 32


class ProtocolError(Exception):
    """A request the server cannot serve, with the HTTP status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Tensor:
    """A named tensor: the v2 fields plus the data as a numpy array of that shape."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = self.data
        if self.datatype == "BYTES":
            flat = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in data.ravel()]
            return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape), "data": flat}
        # orjson serialises numpy arrays natively (OPT_SERIALIZE_NUMPY), far faster than tolist()
        data = np.ascontiguousarray(data.ravel())
        if data.dtype == np.float16:
            data = data.astype(np.float32)
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape), "data": data}


@dataclass(frozen=True)
class TensorSpec:
    """An input or output of a model as its metadata declares it (-1 = any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TensorSpec:
        return cls(raw["name"], raw["datatype"], tuple(int(d) for d in raw["shape"]))


@dataclass
class OutputEncoding:
    """Which outputs a response carries in binary: an output's own ``binary_data``, else the request's
    ``binary_data_output`` (false when absent: plain JSON, as the protocol's core says)."""

    default: bool = False
    per_output: dict[str, bool] = field(default_factory=dict)

    def binary(self, name: str) -> bool:
        return self.per_output.get(name, self.default)


@dataclass
class InferRequest:
    """A decoded ``POST /v2/models/{name}/infer`` body.

    ``parameters`` hold no binary extension keys: those say how tensors travel, not what they hold, so
    neither the batcher's grouping nor the exact cache's key depends on them; ``encoding`` keeps them.
    """

    inputs: list[Tensor]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] | None = None
    encoding: OutputEncoding = field(default_factory=OutputEncoding)


def check_model_name(name: str) -> str:
    """``name`` when it is a model name; a 400 otherwise (it is spliced into upstream URLs and metric labels)."""
    if not MODEL_NAME.fullmatch(name):
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise ProtocolError(
            400,
            f"invalid model name {shown!r}: 1 to {MAX_MODEL_NAME} letters, digits, '-', '_' or '.', not '.' or '..'",
        )
    return name


def _flatten(data: Any) -> list[Any]:
    """Nested lists (one level per dimension) as one flat list, level by level: no recursion to exhaust."""
    if not isinstance(data, list):
        raise ProtocolError(400, "tensor data must be a JSON array")
    depth = 1
    while data and isinstance(data[0], list):
        depth += 1
        if depth > MAX_DATA_DEPTH:
            raise ProtocolError(400, f"tensor data nested deeper than {MAX_DATA_DEPTH} levels")
        out: list[Any] = []
        for item in data:
            if not isinstance(item, list):
                raise ProtocolError(400, "tensor data must be nested arrays of the same depth")
            out.extend(item)
        data = out
    return data


def _parameters(raw: Any, where: str) -> dict[str, Any]:
    """A ``parameters`` object (non-objects read as empty, as before), refused when nested too deep to re-encode."""
    if not isinstance(raw, dict):
        return {}
    level: list[Any] = [raw]
    for _ in range(MAX_PARAMETER_DEPTH - 1):  # the object itself is the first level
        level = [
            child
            for value in level
            for child in (value.values() if isinstance(value, dict) else value)
            if isinstance(child, (dict, list))
        ]
        if not level:
            return raw
    raise ProtocolError(400, f"{where} nested deeper than {MAX_PARAMETER_DEPTH} levels")


def typed_array(flat: list[Any], datatype: str) -> np.ndarray:
    """``flat`` as a 1-D array of ``datatype``, refusing every value the datatype cannot hold (a ValueError or
    TypeError naming the first one).

    numpy's cast alone would let them through changed: 1e39 becomes inf in FP32 (which JSON cannot carry: it
    is re-encoded as null, and the model server then refuses the whole batch it was merged into), 300
    wraps to 44 in INT8, 1.5 truncates to 1, 2 reads as true. The sidecar re-encodes what it decoded, so a
    value must survive the round trip unchanged (up to a float's rounding) to be accepted.
    """
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise TypeError("BYTES data must be strings")
        return np.array(flat, dtype=object)
    array = np.array(flat)  # numbers give a numeric array; strings, nulls, objects or huge integers do not
    if not flat:
        return array.astype(DATATYPES[datatype])
    kind = array.dtype.kind
    if datatype == "BOOL":
        if kind != "b":
            raise TypeError("BOOL data must be true or false")
        return array
    if kind not in "biuf":
        raise TypeError(f"{datatype} data must be numbers")
    dtype = np.dtype(DATATYPES[datatype])
    if dtype.kind == "f":
        with np.errstate(over="ignore"):
            typed = array.astype(dtype)
        _refuse_first(flat, ~np.isfinite(typed), f"out of the range of {datatype} (±{np.finfo(dtype).max:.4g})")
        return typed
    if kind == "f":
        _refuse_first(flat, array != np.trunc(array), f"not an integer, as {datatype} needs")
    info = np.iinfo(dtype)
    if kind != "b":  # exact bounds: python ints, as numpy would compare int64 with 2**64 - 1 as floats
        low, high = int(np.argmin(array)), int(np.argmax(array))
        for index in (low, high):
            if not info.min <= int(array[index]) <= info.max:
                raise ValueError(f"element {index} ({flat[index]!r}) is out of the range of {datatype}")
    return array.astype(dtype)


def _refuse_first(flat: list[Any], bad: np.ndarray, why: str) -> None:
    """A ValueError naming the first element of ``flat`` that ``bad`` marks, if any."""
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(f"element {index} ({flat[index]!r}) is {why}")


class BinaryPart:
    """The bytes after a body's JSON header, handed to the binary tensors in order, each taking its size."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: int, who: str) -> memoryview:
        """The next ``size`` bytes; a 400 when they go past the body (checked before anything is allocated)."""
        left = len(self.data) - self.offset
        if size > left:
            raise ProtocolError(
                400, f"{who}: binary_data_size {size} goes past the body ({left} bytes of binary data left)"
            )
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def finish(self) -> None:
        """A 400 when bytes are left over: the declared sizes do not add up to the body."""
        extra = len(self.data) - self.offset
        if extra:
            raise ProtocolError(
                400,
                f"{extra} bytes of binary data after the last binary tensor: the binary_data_size values add up "
                f"to {self.offset}, the body holds {len(self.data)} after its JSON header",
            )


def split_body(body: bytes, header_length: str | None) -> tuple[memoryview, BinaryPart | None]:
    """The JSON header and the binary part of a body (no binary part without ``Inference-Header-Content-Length``)."""
    view = memoryview(body)
    if header_length is None:
        return view, None
    try:
        length = int(header_length)
    except ValueError:
        raise ProtocolError(400, f"{HEADER_LENGTH} {header_length[:40]!r} is not an integer") from None
    if not 0 < length <= len(body):
        raise ProtocolError(400, f"{HEADER_LENGTH} {length} is past the body's {len(body)} bytes (or not positive)")
    return view[:length], BinaryPart(view[length:])


def array_from_bytes(chunk: memoryview, datatype: str, count: int, who: str) -> np.ndarray:
    """``count`` elements of ``datatype`` read from a binary tensor's bytes, refusing every size that does not
    match and every BOOL byte other than 0 or 1 (the one value a fixed-size datatype's bytes cannot hold).

    Floats may be NaN or infinite here: binary carries them, unlike JSON. BYTES elements stay ``bytes``.
    """
    if datatype == "BYTES":
        return _bytes_elements(chunk, count, who)
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    if len(chunk) != count * dtype.itemsize:
        raise ProtocolError(
            400,
            f"{who}: binary_data_size {len(chunk)} does not match its shape: {count} {datatype} elements "
            f"take {count * dtype.itemsize} bytes",
        )
    if datatype == "BOOL":
        raw = np.frombuffer(chunk, dtype=np.uint8)
        _refuse_bytes(raw, raw > 1, who, "is not a BOOL (0 or 1)")
        return raw.view(np.bool_)
    return np.frombuffer(chunk, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)


def _refuse_bytes(raw: np.ndarray, bad: np.ndarray, who: str, why: str) -> None:
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ProtocolError(400, f"{who}: element {index} (byte {int(raw[index])}) {why}")


def _bytes_elements(chunk: memoryview, count: int, who: str) -> np.ndarray:
    """BYTES elements, each a 4-byte little-endian length then the bytes; the count is checked against the
    size before the array is made (each element takes 4 bytes at least), every length before its slice."""
    if count * 4 > len(chunk):
        raise ProtocolError(400, f"{who}: {count} BYTES elements need at least {count * 4} bytes, got {len(chunk)}")
    out = np.empty(count, dtype=object)
    offset = 0
    for index in range(count):
        if offset + 4 > len(chunk):
            raise ProtocolError(400, f"{who}: BYTES element {index} has no 4-byte length: the binary data ends")
        (length,) = struct.unpack_from("<I", chunk, offset)
        offset += 4
        if offset + length > len(chunk):
            raise ProtocolError(400, f"{who}: BYTES element {index} declares {length} bytes, past the tensor's end")
        out[index] = bytes(chunk[offset : offset + length])
        offset += length
    if offset != len(chunk):
        raise ProtocolError(
            400, f"{who}: {len(chunk) - offset} bytes after its {count} BYTES elements: binary_data_size is too large"
        )
    return out


def _refuse_unsupported(parameters: dict[str, Any], where: str) -> None:
    """A 400 naming the extension when ``parameters`` ask for one this server does not implement."""
    for key, extension in UNSUPPORTED_PARAMETERS.items():
        if key in parameters:
            raise ProtocolError(400, f"{where}: the {extension} extension is not supported")


def decode_tensor(raw: Any, where: str, binary: BinaryPart | None = None, kind: str = "input") -> Tensor:
    """Validate one JSON tensor, its data inline or in ``binary``, and turn it into a numpy-backed :class:`Tensor`."""
    if not isinstance(raw, dict):
        raise ProtocolError(400, f"{where} must be an object with name, shape, datatype and data")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(400, f"{where}.name must be a non-empty string")
    datatype = raw.get("datatype")
    if datatype not in DATATYPES:
        raise ProtocolError(400, f"{kind} '{name}': unknown datatype {datatype!r}; one of {', '.join(DATATYPES)}")
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(400, f"{kind} '{name}': shape must be a list of non-negative integers")
    parameters = dict(_parameters(raw.get("parameters"), f"{where}.parameters"))
    _refuse_unsupported(parameters, f"{kind} '{name}'")
    expected = math.prod(shape)
    if BINARY_SIZE in parameters:
        size = parameters.pop(BINARY_SIZE)
        who = f"{kind} '{name}'"
        if "data" in raw:
            raise ProtocolError(400, f"{who}: both data and parameters.binary_data_size; send one")
        if binary is None:
            raise ProtocolError(400, f"{who}: binary_data_size without the {HEADER_LENGTH} header")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError(400, f"{who}: binary_data_size must be a non-negative integer, got {size!r}")
        array = array_from_bytes(binary.take(size, who), datatype, expected, who).reshape(shape)
        return Tensor(name, datatype, tuple(shape), array, parameters)
    if "data" not in raw:
        raise ProtocolError(400, f"{kind} '{name}': no data and no parameters.binary_data_size")
    flat = _flatten(raw["data"])
    if len(flat) != expected:
        raise ProtocolError(400, f"{kind} '{name}': shape {shape} needs {expected} elements, got {len(flat)}")
    try:
        array = typed_array(flat, datatype).reshape(shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(400, f"{kind} '{name}': data does not match datatype {datatype}: {exc}") from None
    return Tensor(name, datatype, tuple(shape), array, parameters)


def _load_header(header: memoryview) -> Any:
    try:
        return orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(400, f"invalid JSON: {exc}") from None


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(400, f"{where} must be true or false, got {value!r}")
    return value


def _requested_outputs(outputs: Any) -> tuple[list[str] | None, dict[str, bool]]:
    """The requested output names and their own ``binary_data`` choices; a 400 on an unsupported extension."""
    if outputs is None:
        return None, {}
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise ProtocolError(400, "'outputs' must be a list of objects with a name")
    binary = {}
    for index, output in enumerate(outputs):
        parameters = _parameters(output.get("parameters"), f"outputs[{index}].parameters")
        _refuse_unsupported(parameters, f"output '{output['name']}'")
        if BINARY_DATA in parameters:
            binary[output["name"]] = _flag(parameters[BINARY_DATA], f"output '{output['name']}': binary_data")
    return [o["name"] for o in outputs], binary


def decode_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """Parse and validate an infer request body: JSON, or a JSON header of ``header_length`` bytes (the
    ``Inference-Header-Content-Length`` header) followed by binary tensor data."""
    header, binary = split_body(body, header_length)
    doc = _load_header(header)
    if not isinstance(doc, dict):
        raise ProtocolError(400, "the request body must be a JSON object")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError(400, "'inputs' must be a non-empty list of tensors")
    tensors = [decode_tensor(t, f"inputs[{i}]", binary) for i, t in enumerate(inputs)]
    if binary is not None:
        binary.finish()
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ProtocolError(400, f"duplicate input names: {names}")
    wanted, per_output = _requested_outputs(doc.get("outputs"))
    request_id = doc.get("id")
    if request_id is not None and (isinstance(request_id, bool) or not isinstance(request_id, (str, int, float))):
        raise ProtocolError(400, "'id' must be a string")
    parameters = dict(_parameters(doc.get("parameters"), "'parameters'"))
    _refuse_unsupported(parameters, "'parameters'")
    default = _flag(parameters.pop(BINARY_OUTPUT, False), "parameters.binary_data_output")
    return InferRequest(
        inputs=tensors,
        id=str(request_id) if request_id is not None else None,
        parameters=parameters,
        outputs=wanted,
        encoding=OutputEncoding(default, per_output),
    )


def decode_outputs(body: bytes, header_length: str | None) -> list[Tensor]:
    """The output tensors of an upstream's infer response, JSON or binary; a :class:`ProtocolError` when the
    binary part does not add up. JSON data is read as numpy reads it (an upstream's null stays NaN)."""
    header, binary = split_body(body, header_length)
    doc = _load_header(header)
    outputs = doc.get("outputs") if isinstance(doc, dict) else None
    if not isinstance(outputs, list):
        raise ProtocolError(400, "the response has no 'outputs' list")
    tensors = []
    for index, out in enumerate(outputs):
        if isinstance(out, dict) and isinstance(out.get("parameters"), dict) and BINARY_SIZE in out["parameters"]:
            tensors.append(decode_tensor(out, f"outputs[{index}]", binary, kind="output"))
            continue
        dtype = DATATYPES.get(out["datatype"], object)
        data = np.asarray(out["data"], dtype=dtype).reshape(out["shape"])
        tensors.append(Tensor(out["name"], out["datatype"], tuple(out["shape"]), data))
    if binary is not None:
        binary.finish()
    return tensors


def check_inputs(specs: list[TensorSpec], request: InferRequest) -> None:
    """Check a request's inputs against a model's declared inputs: names, datatypes, shapes.

    The model server runs it before ``session.run``; the sidecar runs it before a
    request joins a batch, so one bad request never fails a batch of good ones.
    """
    given = {t.name: t for t in request.inputs}
    for spec in specs:
        tensor = given.pop(spec.name, None)
        if tensor is None:
            raise ProtocolError(400, f"missing input '{spec.name}' ({spec.datatype} {list(spec.shape)})")
        if tensor.datatype != spec.datatype:
            raise ProtocolError(
                400, f"input '{spec.name}' has datatype {tensor.datatype}, the model expects {spec.datatype}"
            )
        if len(tensor.shape) != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, tensor.shape, strict=True)
        ):
            raise ProtocolError(
                400, f"input '{spec.name}' has shape {list(tensor.shape)}, the model expects {list(spec.shape)}"
            )
    if given:
        raise ProtocolError(400, f"unknown input(s) {sorted(given)}; the model takes {[s.name for s in specs]}")


def encode_response(model: str, version: str | None, request_id: str | None, outputs: list[Tensor]) -> dict[str, Any]:
    """The v2 infer response body."""
    body: dict[str, Any] = {"model_name": model, "outputs": [t.to_json() for t in outputs]}
    if version:
        body["model_version"] = version
    if request_id is not None:
        body["id"] = request_id
    return body


def tensor_bytes(datatype: str, data: Any) -> bytes:
    """A tensor's data as the binary extension carries it: little-endian values, BOOL one byte each,
    BYTES elements each a 4-byte little-endian length then the bytes (str as UTF-8)."""
    if datatype == "BYTES":
        parts = []
        for value in np.asarray(data, dtype=object).ravel():
            raw = value if isinstance(value, bytes) else str(value).encode()
            parts += (struct.pack("<I", len(raw)), raw)
        return b"".join(parts)
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    return np.ascontiguousarray(np.asarray(data), dtype=dtype).tobytes()


def binary_size(datatype: str, data: np.ndarray) -> int:
    """The bytes :func:`tensor_bytes` makes of ``data``, counted without making them."""
    if datatype == "BYTES":
        return sum(4 + len(v if isinstance(v, bytes) else str(v).encode()) for v in data.ravel())
    return data.size * np.dtype(DATATYPES[datatype]).itemsize


def non_finite(data: Any) -> int:
    """How many NaN or infinite values ``data`` holds (JSON can carry none of them)."""
    if isinstance(data, np.ndarray) and data.dtype.kind == "f":
        return int(data.size - np.count_nonzero(np.isfinite(data)))
    return 0


def encode_body(body: dict[str, Any], encoding: OutputEncoding) -> tuple[bytes, int | None]:
    """The payload of an infer response body and its JSON header's length (None when no output is binary:
    the payload is plain JSON).

    A JSON output holding NaN or infinity is a 422 naming the output and the fix, never a ``null``
    (JSON has no such numbers; a null read back is a value the model did not answer).
    """
    outputs, chunks = [], []
    for out in body["outputs"]:
        if encoding.binary(out["name"]):
            raw = tensor_bytes(out["datatype"], out["data"])
            chunks.append(raw)
            parameters = {**out.get("parameters", {}), BINARY_SIZE: len(raw)}
            out = {**{k: v for k, v in out.items() if k != "data"}, "parameters": parameters}
        elif count := non_finite(out["data"]):
            raise ProtocolError(
                422,
                f"output '{out['name']}' holds {count} NaN or infinite value(s), which JSON cannot carry: ask for "
                f"it in binary (parameters.binary_data_output: true, or the output's parameters.binary_data: true)",
            )
        outputs.append(out)
    header = dumps({**body, "outputs": outputs})
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def json_can_carry(tensor: Tensor) -> bool:
    """Whether JSON holds ``tensor``'s values as they are: no NaN or infinity, BYTES that are UTF-8 text."""
    if tensor.datatype == "BYTES":
        try:
            for value in tensor.data.ravel():
                if isinstance(value, bytes):
                    value.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True
    return non_finite(tensor.data) == 0


def encode_request(request: InferRequest, binary_outputs: bool, binary_inputs: bool) -> tuple[bytes, int | None]:
    """An infer request body for an upstream, its outputs asked in binary or JSON, its inputs sent in binary or
    JSON; with the JSON header's length when binary data follows it (for ``Inference-Header-Content-Length``)."""
    inputs, chunks = [], []
    for tensor in request.inputs:
        if binary_inputs:
            raw = tensor_bytes(tensor.datatype, tensor.data)
            chunks.append(raw)
            inputs.append(
                {
                    "name": tensor.name,
                    "datatype": tensor.datatype,
                    "shape": list(tensor.shape),
                    "parameters": {BINARY_SIZE: len(raw)},
                }
            )
        else:
            inputs.append(tensor.to_json())
    body: dict[str, Any] = {"inputs": inputs}
    if request.outputs is not None:
        body["outputs"] = [
            {"name": o, "parameters": {BINARY_DATA: True}} if binary_outputs else {"name": o} for o in request.outputs
        ]
    parameters = {**request.parameters, BINARY_OUTPUT: True} if binary_outputs else request.parameters
    if parameters:
        body["parameters"] = parameters
    header = dumps(body)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def dumps(body: Any) -> bytes:
    """JSON-encode a v2 body whose tensors may hold numpy arrays."""
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def error_body(reason: str) -> bytes:
    """The v2 error body: ``{"error": "..."}``."""
    return orjson.dumps({"error": reason})
