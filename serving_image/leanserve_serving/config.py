"""Settings of the serving processes: defaults < mounted file < environment < command line.

The operator renders the sidecar's settings into a ConfigMap mounted as a file
(``LEANSERVE_CONFIG_FILE``, JSON or YAML); environment variables
(``LEANSERVE_<FIELD>``, for example ``LEANSERVE_MAX_BATCH_SIZE``) override it
for quick changes, and command-line flags override both for local runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


@dataclasses.dataclass
class ModelServerConfig:
    """The ONNX Runtime model server."""

    model_path: str = "/models/model.onnx"
    model_name: str = "model"
    model_version: str = "1"
    host: str = "0.0.0.0"
    port: int = 8081
    provider: str = "auto"
    """auto (CUDA when available, else CPU), cpu or cuda."""
    threads: int = 0
    """ONNX Runtime intra-op threads; 0 = the container's CPU limit."""
    concurrency: int = 1
    """Model runs in flight at once; each uses ``threads`` threads."""
    spin: bool = False
    """Let ONNX Runtime's threads busy-wait between runs (lower latency on dedicated cores)."""
    max_body_bytes: int = 8 * 1024 * 1024
    drain_seconds: float = 0.0
    """After SIGTERM: readiness 503, and keep serving this long before stopping (http.serve). In a pod,
    longer than the sidecar's drain and shutdown together, so the sidecar never finds it gone; 0 locally."""
    shutdown_timeout_s: float = 10.0
    """Then how long runs still in flight may finish (the sidecar gives up on a request after its
    request_timeout_s anyway)."""


@dataclasses.dataclass
class SidecarConfig:
    """The batching, caching front door."""

    upstream: str = "http://127.0.0.1:8081"
    host: str = "0.0.0.0"
    port: int = 8080
    grpc_port: int = 0
    """The v2 gRPC service (same batcher and caches as REST) on this port; 0: off. The operator sets 8085
    in pods; off by default so that several sidecars on one host (tests, local stacks) never share one."""
    model_version: str = "1"
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    pad_inputs: dict[str, float | int] = dataclasses.field(default_factory=dict)
    """Ragged batching (opt-in): inputs of rank 2 ([batch, seq]) right-padded along dimension 1 with the
    given value, so requests of different lengths batch together (the batcher's doc says how). Only for a
    model that ignores padded positions (an attention mask padded with 0). In the environment or on the
    command line: ``input_ids=0,attention_mask=0`` or a JSON object; empty: off."""
    max_queue: int = 1024
    """Requests waiting for a batch; beyond this the sidecar answers 429 (before reading the request)."""
    max_queue_wait_s: float = 0.0
    """Answer 429 at once when the expected wait for an answer (the batches in flight and queued, at the
    recent upstream time per batch) exceeds this; 0: request_timeout_s (it could not be answered in time)."""
    upstream_concurrency: int = 2
    """Batches in flight to the model server at once."""
    request_timeout_s: float = 10.0
    max_body_bytes: int = 8 * 1024 * 1024
    redis_url: str = ""
    """Empty: no cache."""
    exact_enabled: bool = True
    """Answer repeated requests from the exact cache (needs redis_url)."""
    cache_ttl_seconds: int = 3600
    cache_exclude_fields: list[str] = dataclasses.field(default_factory=list)
    cache_namespace: str = "default"
    """Whose entries these are (the operator sets namespace/name of the InferenceDeployment): part of
    every cache key, so deployments sharing a Redis never serve each other's answers."""
    model_digest: str = ""
    """What identifies the model file served (its sha256, and the variant): part of every cache key,
    so a new model never serves the old one's answers."""
    cache_hmac_key: str = dataclasses.field(default="", repr=False)
    """The deployment's key for the integrity tag (HMAC-SHA256) of cache entries; the operator passes
    it from a Secret as LEANSERVE_CACHE_HMAC_KEY. Empty: entries are checked by structure only."""
    cache_hmac_key_file: str = ""
    """A file holding that key instead (a mounted Secret); read at start-up."""
    cache_max_entry_bytes: int = 4 * 1024 * 1024
    """Larger cache entries are neither stored nor served."""
    semantic_enabled: bool = False
    """Opt-in: a semantic hit answers a text with the answer of another, similar one (see README)."""
    semantic_threshold: float = 0.97
    semantic_max_entries: int = 100_000
    semantic_embedder: str = "minilm"
    """minilm (all-MiniLM-L6-v2, offline, numpy) or hashing (character n-grams, no model file)."""
    health_interval_s: float = 1.0
    drain_seconds: float = 0.0
    """After SIGTERM: readiness 503, and keep serving new and in-flight requests this long (responses
    close their connections) while the endpoints and clients move away, then stop (http.serve). The
    operator sets it in pods; 0 (stop at once) for local runs."""

    @property
    def shutdown_timeout_s(self) -> float:
        """How long requests still in flight may finish once it stops listening: no request outlives
        request_timeout_s, so no longer than that."""
        return self.request_timeout_s


def _coerce(value: Any, target: Any) -> Any:
    if isinstance(target, bool):
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
    if isinstance(target, int):
        return int(value)
    if isinstance(target, float):
        return float(value)
    if isinstance(target, list):
        return value if isinstance(value, list) else [v for v in str(value).split(",") if v]
    return str(value)


def parse_pad_inputs(value: Any) -> dict[str, float | int]:
    """``pad_inputs`` from a mapping (a config file) or a string (``name=value,...`` or a JSON object); a
    :class:`ValueError` naming the setting and the culprit for an empty name, a repeated one, or a value that
    is no finite number. None (a file's ``pad_inputs: null``) is off, as empty is."""
    if value is None:
        return {}
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"pad_inputs: {text!r} is not a JSON object: {exc}") from None
        else:
            pairs: dict[str, Any] = {}
            for item in (i for i in text.split(",") if i.strip()):
                name, sep, raw = item.partition("=")
                if not sep:
                    raise ValueError(f"pad_inputs: {item.strip()!r} in {text!r} is not name=value")
                if name.strip() in pairs:
                    raise ValueError(f"pad_inputs: input {name.strip()!r} is named twice in {text!r}")
                pairs[name.strip()] = _number(name.strip(), raw.strip())
            value = pairs
    if not isinstance(value, Mapping):
        raise ValueError(f"pad_inputs: expected a mapping of input name to pad value, got {value!r}")
    result: dict[str, float | int] = {}
    for name, pad in value.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"pad_inputs: an input name must be a non-empty string, got {name!r}")
        result[name.strip()] = _number(name, pad)
    return result


def _number(name: str, value: Any) -> float | int:
    """A pad value: an int or a finite float, as given or as text (``"0"`` is the integer 0)."""
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"pad_inputs: the pad value of {name!r} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"pad_inputs: the pad value of {name!r} must be a finite number, got {value!r}")
    return value


#: Settings that need more than :func:`_coerce`'s conversion by the default's type.
PARSERS: dict[str, Callable[[Any], Any]] = {"pad_inputs": parse_pad_inputs}


def load_config(
    cls: type[T], overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> T:
    """Build ``cls`` from its defaults, the config file, the environment and ``overrides`` (in that order)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    file = environ.get("LEANSERVE_CONFIG_FILE")
    if file:
        text = Path(file).read_text(encoding="utf-8")
        loaded = json.loads(text) if file.endswith(".json") else yaml.safe_load(text)
        layers = [loaded or {}]
    else:
        layers = []
    layers.append(
        {name: environ[f"LEANSERVE_{name.upper()}"] for name in values if f"LEANSERVE_{name.upper()}" in environ}
    )
    layers.append({k: v for k, v in (overrides or {}).items() if v is not None})
    for layer in layers:
        for key, value in layer.items():
            if key not in values:
                raise ValueError(f"unknown setting {key!r} for {cls.__name__}; known: {', '.join(values)}")
            values[key] = PARSERS[key](value) if key in PARSERS else _coerce(value, values[key])
    return cls(**values)
