"""Invalid InferenceDeployments, each a small change to a valid one.

Used twice: ``leanserve validate`` must reject each with a message naming the
field, and (with the control plane) the API server must reject each too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Doc = dict[str, Any]


@dataclass(frozen=True)
class InvalidCase:
    id: str
    mutate: Callable[[Doc], None]
    path: str
    """The field path the error must name (as leanserve validate prints it)."""
    reason: str
    """A fragment of leanserve validate's reason."""
    server: bool = True
    """Whether the API server rejects it too (the tests send fieldValidation=Strict, so
    unknown fields are rejected there as well, not silently pruned)."""

    def apply(self, doc: Doc) -> Doc:
        out = copy.deepcopy(doc)
        self.mutate(out)
        return out


def _set(path: str, value: Any) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return mutate


def _del(path: str) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node[p]
        del node[last]

    return mutate


def _both(*mutations: Callable[[Doc], None]) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        for m in mutations:
            m(doc)

    return mutate


INVALID_CASES: list[InvalidCase] = [
    InvalidCase(
        "peak-below-average",
        _set("spec.traffic.peakRps", 50),
        "spec.traffic.peakRps",
        "peakRps must be greater than or equal to averageRps",
    ),
    InvalidCase(
        "warm-pool-over-max",
        _both(_set("spec.autoscaling.warmPool", 5), _set("spec.autoscaling.maxReplicas", 2)),
        "spec.autoscaling.warmPool",
        "warmPool must not exceed maxReplicas",
    ),
    InvalidCase(
        "percentile-100",
        _set("spec.sla.latency.percentile", 100),
        "spec.sla.latency.percentile",
        "percentile must be in (0, 100)",
    ),
    InvalidCase(
        "percentile-zero",
        _set("spec.sla.latency.percentile", 0),
        "spec.sla.latency.percentile",
        "percentile must be in (0, 100)",
    ),
    InvalidCase(
        "semantic-threshold-above-one",
        _set("spec.cache.semantic", {"enabled": True, "threshold": 1.5}),
        "spec.cache.semantic.threshold",
        "threshold is a cosine similarity in (0, 1]",
    ),
    InvalidCase(
        "semantic-threshold-zero",
        _set("spec.cache.semantic", {"threshold": 0}),
        "spec.cache.semantic.threshold",
        "threshold is a cosine similarity in (0, 1]",
    ),
    InvalidCase(
        "uri-scheme-not-allowed",
        _set("spec.model.uri", "s3://bucket/model.onnx"),
        "spec.model.uri",
        "URI scheme not allowed",
    ),
    InvalidCase(
        "evaluation-uri-scheme",
        _set("spec.model.evaluation", {"uri": "ftp://host/eval.npz"}),
        "spec.model.evaluation.uri",
        "URI scheme not allowed",
    ),
    InvalidCase(
        "unknown-precision",
        _set("spec.precision", "int4"),
        "spec.precision",
        "Input should be 'auto', 'fp32', 'int8' or 'fp16'",
    ),
    InvalidCase(
        "negative-latency-target", _set("spec.sla.latency.targetMs", -5), "spec.sla.latency.targetMs", "greater than 0"
    ),
    InvalidCase("missing-traffic", _del("spec.traffic"), "spec.traffic", "required field is missing"),
    InvalidCase(
        "average-rps-not-a-number", _set("spec.traffic.averageRps", "lots"), "spec.traffic.averageRps", "valid number"
    ),
    InvalidCase(
        "batching-fixed-without-wait",
        _set("spec.batching", {"mode": "fixed", "maxBatchSize": 8}),
        "spec.batching.mode",
        "mode fixed needs both maxBatchSize and maxWaitMs",
    ),
    InvalidCase(
        "batching-off-with-size",
        _set("spec.batching", {"mode": "off", "maxBatchSize": 8}),
        "spec.batching.mode",
        "mode off takes neither",
    ),
    InvalidCase(
        "batch-size-too-large",
        _set("spec.batching", {"maxBatchSize": 4096}),
        "spec.batching.maxBatchSize",
        "less than or equal to 1024",
    ),
    InvalidCase(
        "redis-url-and-managed",
        _set("spec.cache.redis", {"url": "redis://r:6379", "managed": True}),
        "spec.cache.redis.managed",
        "not both",
    ),
    InvalidCase(
        "redis-unmanaged-without-url",
        _set("spec.cache.redis", {"managed": False}),
        "spec.cache.redis.url",
        "managed: false needs a url",
    ),
    InvalidCase(
        "int8-without-evaluation", _set("spec.precision", "int8"), "spec.model", "precision int8 needs model.evaluation"
    ),
    InvalidCase(
        "daily-profile-23-hours",
        _set("spec.traffic.dailyProfile", [1.0] * 23),
        "spec.traffic.dailyProfile",
        "at least 24 items",
    ),
    InvalidCase(
        "daily-profile-above-peak",
        _both(_set("spec.traffic.peakRps", 150), _set("spec.traffic.dailyProfile", [1.0] * 23 + [2.0])),
        "spec.traffic.dailyProfile",
        "must not exceed peakRps",
    ),
    InvalidCase(
        "accuracy-drop-above-one",
        _set("spec.sla.maxAccuracyDrop", 2),
        "spec.sla.maxAccuracyDrop",
        "less than or equal to 1",
    ),
    InvalidCase(
        "duplicate-candidates",
        _set("spec.candidates", ["m5.xlarge", "m5.xlarge"]),
        "spec.candidates",
        "duplicate instance type",
    ),
    InvalidCase(
        "bad-instance-type-name", _set("spec.candidates", ["M5 XL"]), "spec.candidates[0]", "should match pattern"
    ),
    InvalidCase(
        "unknown-evaluation-metric",
        _set("spec.model.evaluation", {"uri": "file:///e.npz", "metric": "f1"}),
        "spec.model.evaluation.metric",
        "Input should be 'accuracy'",
    ),
    InvalidCase(
        "ttl-zero",
        _set("spec.cache.exact", {"ttlSeconds": 0}),
        "spec.cache.exact.ttlSeconds",
        "greater than or equal to 1",
    ),
    InvalidCase(
        "profiling-deadline-within-unschedulable-timeout",
        _set("spec.profiling", {"unschedulableTimeoutSeconds": 600, "deadlineSeconds": 600}),
        "spec.profiling.deadlineSeconds",
        "deadlineSeconds must exceed unschedulableTimeoutSeconds",
    ),
    InvalidCase(
        "profiling-deadline-too-short",
        _set("spec.profiling", {"deadlineSeconds": 5}),
        "spec.profiling.deadlineSeconds",
        "greater than or equal to 10",
    ),
    InvalidCase("name-not-dns-label", _set("metadata.name", "fraud.scorer"), "metadata.name", "should match pattern"),
    InvalidCase(
        "resource-quantity-float",
        _set("spec.serving", {"resources": {"requests": {"cpu": 0.5}}}),
        "spec.serving.resources.requests.cpu",
        "valid string",
    ),
    InvalidCase(
        "misspelt-field",
        _set("spec.traffic.averageRPS", 10),
        "spec.traffic.averageRPS",
        "unknown field (did you mean 'averageRps'?)",
    ),
]
