"""The desired state of an InferenceDeployment: what is served and what it may cost.

These models are the single source of the API: the CRD schema in ``crds/`` is
generated from them (``make crds``) and ``leanserve validate`` checks local files
with them. Defaults are chosen so that a spec naming only a model, a latency
target and a traffic figure is complete.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema

from leanserve.api.base import ApiModel, Rule

#: Schemes a model or evaluation URI may use. Anything else (s3 through a
#: proxy, ftp, data:) is refused: the fetcher only knows how to handle these.
ALLOWED_URI_SCHEMES: tuple[str, ...] = ("https", "http", "pvc", "configmap", "file")

URI_PATTERN = r"^(" + "|".join(ALLOWED_URI_SCHEMES) + r")://[^\s]+$"

ModelUri = Annotated[
    str,
    Field(
        pattern=URI_PATTERN,
        max_length=2048,
        description=(
            "Where to fetch it from. Allowed schemes: "
            + ", ".join(f"{s}://" for s in ALLOWED_URI_SCHEMES)
            + " (pvc://CLAIM/PATH, configmap://NAME/KEY; file:// is for local runs and tests)."
        ),
    ),
]

InstanceTypeName = Annotated[
    str,
    Field(pattern=r"^[a-z0-9][a-z0-9.\-]*[a-z0-9]$", max_length=63),
]

QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"


def _quantity_from_int(value: Any) -> Any:
    # YAML reads `cpu: 2` as an integer; the API server's int-or-string does too.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


#: A Kubernetes resource quantity: ``2``, ``500m``, ``4Gi``. An integer or a
#: string on the wire (``x-kubernetes-int-or-string``), a string once parsed.
Quantity = Annotated[
    str,
    BeforeValidator(_quantity_from_int),
    Field(pattern=QUANTITY_PATTERN, max_length=64),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
        }
    ),
]


def defaulted(model: type[ApiModel]) -> Any:
    """A field whose default is ``model()``, with that default written into the CRD.

    The API server applies nested defaults only inside objects that exist, and
    it checks an object's default against its CEL rules, so the CRD default is
    the model's full default value (``{mode: auto}``), not ``{}``.
    """
    return Field(default_factory=model, json_schema_extra={"default": model().to_api()})


class EvaluationSpec(ApiModel):
    """A labelled sample of the user's data, used by the accuracy gate."""

    uri: ModelUri
    metric: Literal["accuracy", "top1", "mse", "cosine"] = "accuracy"
    """How a variant is compared with the FP32 original: accuracy or top1 for
    classifiers, mse (relative error) for regression, cosine for embeddings."""


class ModelSpec(ApiModel):
    """The model to serve."""

    uri: ModelUri
    format: Literal["onnx", "pytorch"] = "onnx"
    """onnx, or pytorch (a TorchScript or full-model file, exported to ONNX)."""
    sha256: str | None = Field(default=None, pattern=r"^[a-f0-9]{64}$")
    """Hex sha256 of the model file. Checked by the serving pod before the model loads, and the
    key of the profile cache (without it the URI is the key, and a changed file at the same URI
    is not noticed)."""
    evaluation: EvaluationSpec | None = None
    """Labelled data for the accuracy gate. Without it only fp32 is served."""


class LatencySpec(ApiModel):
    """The latency objective: this percentile of request latency under targetMs."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.percentile > 0.0 && self.percentile < 100.0",
            message="percentile must be in (0, 100), for example 95 or 99.9",
            check=lambda s: 0.0 < s.percentile < 100.0,
            field_path=".percentile",
        ),
    )

    percentile: float = 95.0
    """Which latency percentile the objective is about, in (0, 100)."""
    target_ms: float = Field(gt=0, le=600_000)
    """The bound on that percentile, in milliseconds, end to end through the pod."""


class SlaSpec(ApiModel):
    """What the service must guarantee."""

    latency: LatencySpec
    max_accuracy_drop: float = Field(default=0.01, ge=0, le=1)
    """Largest absolute drop of the evaluation metric a variant (INT8, FP16) may
    have against the FP32 original: 0.01 is one percentage point of accuracy."""


class BudgetSpec(ApiModel):
    """What it may cost. Both limits are optional; a plan above either is rejected."""

    max_cost_per_million_requests: float | None = Field(default=None, gt=0)
    """USD per million requests served, cache hits included."""
    max_monthly_cost: float | None = Field(default=None, gt=0)
    """USD per month (730 hours) for the serving replicas."""


def _profile_within_peak(t: TrafficSpec) -> bool:
    if t.daily_profile is None or t.peak_rps is None:
        return True
    return all(f * t.average_rps <= t.peak_rps for f in t.daily_profile)


class TrafficSpec(ApiModel):
    """The traffic the deployment is sized for."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.peakRps) || self.peakRps >= self.averageRps",
            message="peakRps must be greater than or equal to averageRps",
            check=lambda t: t.peak_rps is None or t.peak_rps >= t.average_rps,
            field_path=".peakRps",
        ),
        Rule(
            cel=(
                "!has(self.dailyProfile) || !has(self.peakRps) || "
                "self.dailyProfile.all(f, f * self.averageRps <= self.peakRps)"
            ),
            message="dailyProfile factors times averageRps must not exceed peakRps",
            check=_profile_within_peak,
            field_path=".dailyProfile",
        ),
    )

    average_rps: float = Field(gt=0, le=1_000_000)
    """Average requests per second over a day."""
    peak_rps: float | None = Field(default=None, gt=0, le=1_000_000)
    """Peak requests per second. Default: 3x averageRps."""
    daily_profile: list[Annotated[float, Field(ge=0, le=100)]] | None = Field(
        default=None, min_length=24, max_length=24
    )
    """24 hourly factors (UTC hour 0 to 23) multiplying averageRps. Default: a
    shape derived from averageRps and peakRps."""

    def effective_peak_rps(self) -> float:
        """The peak used for sizing: the declared one, or 3x the average."""
        return self.peak_rps if self.peak_rps is not None else 3.0 * self.average_rps


class BatchingSpec(ApiModel):
    """Dynamic batching in the sidecar."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.mode != 'fixed' || (has(self.maxBatchSize) && has(self.maxWaitMs))",
            message="mode fixed needs both maxBatchSize and maxWaitMs",
            check=lambda b: b.mode != "fixed" or (b.max_batch_size is not None and b.max_wait_ms is not None),
            field_path=".mode",
            reason="FieldValueRequired",
        ),
        Rule(
            cel="self.mode != 'off' || (!has(self.maxBatchSize) && !has(self.maxWaitMs))",
            message="mode off takes neither maxBatchSize nor maxWaitMs",
            check=lambda b: b.mode != "off" or (b.max_batch_size is None and b.max_wait_ms is None),
            field_path=".mode",
            reason="FieldValueForbidden",
        ),
    )

    mode: Literal["auto", "fixed", "off"] = "auto"
    """auto: the planner picks the policy (maxBatchSize, if set, caps its search);
    fixed: use maxBatchSize and maxWaitMs as given; off: one request per call."""
    max_batch_size: int | None = Field(default=None, ge=1, le=1024)
    """Largest batch sent to the model server."""
    max_wait_ms: float | None = Field(default=None, ge=0, le=1000)
    """Longest time the oldest request of a batch waits for the batch to fill."""
    pad_inputs: dict[str, float] = Field(default_factory=dict, max_length=16)
    """Ragged batching: inputs of shape [batch, sequence] named here are right-padded with the given value
    to the longest sequence in the batch, so requests of different lengths batch together (for example
    ``{input_ids: 0, attention_mask: 0}`` for a BERT-style model). Only correct for a model that ignores
    padded positions (an attention mask padded with 0); every sequence input must be named."""


class ExactCacheSpec(ApiModel):
    """Response cache keyed by a canonical hash of the request inputs."""

    enabled: bool = True
    ttl_seconds: int = Field(default=3600, ge=1, le=30 * 24 * 3600)
    """How long a cached response is served."""
    exclude_fields: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        default_factory=list, max_length=64
    )
    """Input or parameter names left out of the cache key (request ids, timestamps)."""
    expected_hit_rate: float = Field(default=0.0, ge=0, le=0.99)
    """The planner's estimate of the hit rate until one is observed."""


class SemanticCacheSpec(ApiModel):
    """Cache for text inputs keyed by embedding similarity."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.threshold > 0.0 && self.threshold <= 1.0",
            message="threshold is a cosine similarity in (0, 1]",
            check=lambda s: 0.0 < s.threshold <= 1.0,
            field_path=".threshold",
        ),
    )

    enabled: bool = False
    """Opt-in, with a risk: a text is answered with the cached answer of another, similar text. Guards
    (numbers, negations, yes/no words, length) refuse the near-misses they recognise, not all of them."""
    threshold: float = 0.97
    """Cosine similarity above which a cached response is served, in (0, 1]."""
    embedding_model: str = Field(default="all-MiniLM-L6-v2", min_length=1, max_length=253)
    """The embedder; the default ships with the serving image and runs offline."""
    max_entries: int = Field(default=100_000, ge=1, le=10_000_000)
    """Size bound of the index; the least recently used entries are evicted."""


class RedisSpec(ApiModel):
    """Where the caches live: an existing Redis (url) or one the operator manages."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!(has(self.url) && has(self.managed) && self.managed)",
            message="set either url (an existing Redis) or managed: true, not both",
            check=lambda r: not (r.url is not None and r.managed),
            field_path=".managed",
            reason="FieldValueForbidden",
        ),
        Rule(
            cel="has(self.url) || !has(self.managed) || self.managed",
            message="managed: false needs a url",
            check=lambda r: r.url is not None or r.managed is not False,
            field_path=".url",
            reason="FieldValueRequired",
        ),
    )

    url: str | None = Field(default=None, pattern=r"^rediss?://[^\s]+$", max_length=2048)
    """redis:// or rediss:// URL of an existing Redis."""
    managed: bool | None = None
    """Run a Redis for this deployment. Default: true when no url is given."""


class CacheSpec(ApiModel):
    """Response caching in the sidecar."""

    exact: ExactCacheSpec = defaulted(ExactCacheSpec)
    semantic: SemanticCacheSpec = defaulted(SemanticCacheSpec)
    redis: RedisSpec = defaulted(RedisSpec)


def _warm_pool_within_max(a: AutoscalingSpec) -> bool:
    return a.max_replicas is None or a.warm_pool <= a.max_replicas


class AutoscalingSpec(ApiModel):
    """The HorizontalPodAutoscaler the operator writes."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.maxReplicas) || self.warmPool <= self.maxReplicas",
            message="warmPool must not exceed maxReplicas",
            check=_warm_pool_within_max,
            field_path=".warmPool",
        ),
    )

    warm_pool: int = Field(default=1, ge=0, le=1000)
    """Replicas kept running at all times (minReplicas). Raised to 1 on GPU types,
    where a cold start takes minutes."""
    max_replicas: int | None = Field(default=None, ge=1, le=1000)
    """Upper bound of the HPA. Default: what the budget allows, or the peak sizing."""
    scale_down_stabilization_seconds: int = Field(default=300, ge=0, le=3600)
    """How long load must stay low before replicas are removed."""
    predictive_warm_pool: bool = True
    """With a Prometheus to read: raise minReplicas ahead of the hours the request-rate history says
    are busy (by the measured cold start), and lower it after. Never below warmPool."""
    target_cpu_utilization: int = Field(default=70, ge=10, le=95)
    """When the HPA scales on CPU (no custom metrics API serves the request rate): the utilization of
    each serving container's CPU request it keeps. Lower scales out earlier: more headroom, more cost."""


class ProfilingSpec(ApiModel):
    """How candidate instance types are measured: one profiling Job per type whose profile is not cached."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.deadlineSeconds > self.unschedulableTimeoutSeconds",
            message="deadlineSeconds must exceed unschedulableTimeoutSeconds: the deadline counts from the "
            "Job's start, waiting for a node included, so a shorter one would report a type with no node "
            "as timed out instead of unschedulable",
            check=lambda p: p.deadline_seconds > p.unschedulable_timeout_seconds,
            field_path=".deadlineSeconds",
        ),
    )

    unschedulable_timeout_seconds: int = Field(default=600, ge=10, le=86_400)
    """How long a profiling pod may stay unschedulable before its instance type is marked unavailable
    (no such node pool, no free GPU) and the plan goes ahead without it. The same for CPU and GPU types;
    a short one (30) suits a cluster known to have no GPU pool."""
    retries: int = Field(default=2, ge=0, le=10)
    """Retries of a failed bench (the Job's backoffLimit; Kubernetes backs off exponentially)."""
    quantization_search_seconds: int = Field(default=300, ge=0, le=7200)
    """How long the bench may search, per INT8 variant, for a recipe that keeps sla.maxAccuracyDrop when the
    whole-model INT8 variant breaks it (nodes kept in fp32, quantizer settings); 0: no search. Counted
    inside deadlineSeconds."""
    deadline_seconds: int = Field(default=1800, ge=10, le=86_400)
    """Longest a profiling Job may take, from its start to its end (waiting for a node, pulling the image
    and every retry included): the Job's activeDeadlineSeconds. A bench that hangs is then stopped by
    Kubernetes (reason DeadlineExceeded) and its instance type is left out of the plan, instead of
    holding the deployment in Profiling for ever. Must exceed unschedulableTimeoutSeconds."""


class DriftSpec(ApiModel):
    """When observed figures leave what the plan assumed, plan again with them, without flapping."""

    enabled: bool = True
    min_interval_seconds: int = Field(default=3600, ge=60, le=604800)
    """At most one re-plan per this period, whatever the figures do meanwhile."""
    min_savings: float = Field(default=0.1, ge=0, le=1)
    """A re-plan that fixes no SLA miss is applied only if it saves at least this share of the cost per
    million requests of the plan in place (both priced at the observed figures)."""
    traffic_tolerance: float = Field(default=0.25, ge=0, le=10)
    """Drift when the observed request rate leaves [lowest hourly rate x (1 - t), peakRps x (1 + t)]."""
    hit_rate_tolerance: float = Field(default=0.05, ge=0, le=1)
    """Drift when the observed cache hit rate is off the spec's expected one by more than this (absolute)."""
    sla_miss_windows: int = Field(default=3, ge=1, le=1000)
    """Drift when the observed latency misses the SLA in this many consecutive observations."""


class ObserveSpec(ApiModel):
    """How the operator reads what the deployment actually does from Prometheus (when it has one)."""

    interval_seconds: int = Field(default=60, ge=10, le=3600)
    """How often the figures are read."""
    window_seconds: int = Field(default=300, ge=30, le=86400)
    """The window each reading covers (rates, quantiles and replicas are over it)."""
    min_requests: int = Field(default=1000, ge=1, le=1_000_000_000)
    """Requests a window needs before SLAMet, WithinBudget and drift are judged on observed figures."""
    drift: DriftSpec = defaulted(DriftSpec)


class ResourceOverrides(ApiModel):
    """Container resources, overriding what the planner sizes."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


class ServingSpec(ApiModel):
    """Overrides for the serving pods."""

    image: str | None = Field(default=None, min_length=1, max_length=1024)
    """Serving image for CPU types. Default: the operator's matching release."""
    gpu_image: str | None = Field(default=None, min_length=1, max_length=1024)
    """Serving image for GPU types. Default: the operator's matching release."""
    resources: ResourceOverrides | None = None


def _unique(names: list[str]) -> list[str]:
    # The CRD marks the list x-kubernetes-list-type: set; this is its local twin.
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate instance type(s): {', '.join(dupes)}")
    return names


def _int8_needs_evaluation(s: InferenceDeploymentSpec) -> bool:
    return s.precision != "int8" or s.model.evaluation is not None


class InferenceDeploymentSpec(ApiModel):
    """What to serve, the objective it must meet and what it may cost."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.precision != 'int8' || has(self.model.evaluation)",
            message="precision int8 needs model.evaluation: the accuracy gate must be measured",
            check=_int8_needs_evaluation,
            field_path=".model",
            reason="FieldValueRequired",
        ),
    )

    model: ModelSpec
    sla: SlaSpec
    traffic: TrafficSpec
    budget: BudgetSpec = defaulted(BudgetSpec)
    candidates: Annotated[list[InstanceTypeName], AfterValidator(_unique)] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    """Instance types to consider. Default (empty): every type in the price table."""
    precision: Literal["auto", "fp32", "int8", "fp16"] = "auto"
    """auto: the cheapest precision that passes the accuracy gate."""
    batching: BatchingSpec = defaulted(BatchingSpec)
    cache: CacheSpec = defaulted(CacheSpec)
    autoscaling: AutoscalingSpec = defaulted(AutoscalingSpec)
    profiling: ProfilingSpec = defaulted(ProfilingSpec)
    serving: ServingSpec = defaulted(ServingSpec)
    observe: ObserveSpec = defaulted(ObserveSpec)
