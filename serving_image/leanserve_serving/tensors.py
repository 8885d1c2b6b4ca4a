"""Open Inference Protocol (v2) tensors: decoding requests, encoding responses.

One module for both the model server and the sidecar, so that a request the
sidecar accepts is one the model server accepts. Every malformed request ends
in a :class:`ProtocolError` carrying an HTTP status and a reason a client can act on.
"""

from __future__ import annotations

import math
import re
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
class InferRequest:
    """A decoded ``POST /v2/models/{name}/infer`` body."""

    inputs: list[Tensor]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] | None = None


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


def decode_tensor(raw: Any, where: str) -> Tensor:
    """Validate one JSON tensor and turn it into a numpy-backed :class:`Tensor`."""
    if not isinstance(raw, dict):
        raise ProtocolError(400, f"{where} must be an object with name, shape, datatype and data")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(400, f"{where}.name must be a non-empty string")
    datatype = raw.get("datatype")
    if datatype not in DATATYPES:
        raise ProtocolError(400, f"input '{name}': unknown datatype {datatype!r}; one of {', '.join(DATATYPES)}")
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(400, f"input '{name}': shape must be a list of non-negative integers")
    if "data" not in raw:
        raise ProtocolError(400, f"input '{name}': no data (the binary data extension is not supported)")
    flat = _flatten(raw["data"])
    expected = math.prod(shape)
    if len(flat) != expected:
        raise ProtocolError(400, f"input '{name}': shape {shape} needs {expected} elements, got {len(flat)}")
    try:
        array = typed_array(flat, datatype).reshape(shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(400, f"input '{name}': data does not match datatype {datatype}: {exc}") from None
    return Tensor(name, datatype, tuple(shape), array, _parameters(raw.get("parameters"), f"{where}.parameters"))


def decode_request(body: bytes) -> InferRequest:
    """Parse and validate an infer request body (JSON)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(400, f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError(400, "the request body must be a JSON object")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError(400, "'inputs' must be a non-empty list of tensors")
    tensors = [decode_tensor(t, f"inputs[{i}]") for i, t in enumerate(inputs)]
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ProtocolError(400, f"duplicate input names: {names}")
    outputs = doc.get("outputs")
    wanted = None
    if outputs is not None:
        if not isinstance(outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
        ):
            raise ProtocolError(400, "'outputs' must be a list of objects with a name")
        wanted = [o["name"] for o in outputs]
    request_id = doc.get("id")
    if request_id is not None and (isinstance(request_id, bool) or not isinstance(request_id, (str, int, float))):
        raise ProtocolError(400, "'id' must be a string")
    return InferRequest(
        inputs=tensors,
        id=str(request_id) if request_id is not None else None,
        parameters=_parameters(doc.get("parameters"), "'parameters'"),
        outputs=wanted,
    )


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


def dumps(body: Any) -> bytes:
    """JSON-encode a v2 body whose tensors may hold numpy arrays."""
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def error_body(reason: str) -> bytes:
    """The v2 error body: ``{"error": "..."}``."""
    return orjson.dumps({"error": reason})
