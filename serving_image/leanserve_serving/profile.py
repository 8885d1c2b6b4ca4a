"""The Profile: what ``leanserve bench`` measured for one model on one instance type.

Shared by the bench (which writes it), the operator (which stores it in its
profile cache) and the planner (which reads service times and accuracy drops
from it). The full form goes to a file; the compact form fits a Kubernetes
container termination message (4 KiB), which is how a profiling Job hands its
result back.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TERMINATION_MESSAGE_LIMIT = 4096

#: Quantile levels (percent) at which the stack's jitter and outside-the-batch latency are kept.
STACK_LEVELS = (0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 98, 99, 100)

VariantName = Literal["fp32", "int8-dynamic", "int8-static", "fp16"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hardware(_Model):
    """Where the measurements were taken. A profile is only valid for this hardware."""

    cpu_model: str
    vcpus: int
    isa_flags: list[str] = Field(default_factory=list)
    """The flags that matter for quantized inference: avx2, avx512f, avx512_vnni, avx_vnni, amx_int8, ..."""
    gpu: str | None = None
    gpu_memory_mb: int | None = None
    onnxruntime: str
    providers: list[str]


class LatencyPoint(_Model):
    """Latency of one ``session.run`` at one batch size (not including HTTP)."""

    batch_size: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    throughput_rps: float
    """Rows per second at this batch size: batch_size / mean latency."""
    stack_ms: float | None = None
    """Mean time one batch of this size holds a replica through the whole serving stack (sidecar, HTTP,
    JSON, model server, model) under saturating load; None where the stack was not measured."""


class StackProfile(_Model):
    """What the serving stack adds to the model, measured through the real processes (see bench.stack)."""

    jitter: list[float]
    """Quantiles (STACK_LEVELS) of a batch's time over its mean: the spread the planner draws service times from."""
    outside_ms: list[float]
    """Quantiles (STACK_LEVELS) of the time a request spends outside the replica's batch path."""


#: Node names a recipe keeps in the compact form (the full list is in the full profile), and their length.
COMPACT_RECIPE_NODES = 2
COMPACT_NODE_NAME_CHARS = 48


class QuantRecipe(_Model):
    """How an INT8 variant was built, and what the accuracy-aware search (bench.quant_search) did.

    Present when the bench ran with an accuracy gate; None in profiles made without one (and in every
    profile from before the search existed).
    """

    method: Literal["dynamic", "static"]
    per_channel: bool
    reduce_range: bool
    calibration: Literal["MinMax", "Entropy", "Percentile"] | None = None
    """Static only: how activation ranges were calibrated."""
    op_types: list[str] | None = None
    """Static only: the op types quantized; None: all those ORT's quantizer supports."""
    nodes_excluded: list[str] = Field(default_factory=list)
    """Nodes kept in fp32, most sensitive first (unnamed nodes are named ``OpType:first_output``)."""
    excluded_count: int = 0
    """How many nodes are kept in fp32: the compact form lists only the first few of them."""
    outcome: Literal["not_needed", "found", "not_found"]
    """not_needed: the whole-model recipe kept the gate; found: a searched one does; not_found: none
    did within the time budget, and the variant is the whole-model one, over the gate."""
    search_seconds: float = 0.0
    tried: int = 1
    """Recipes built and measured, the whole-model one included."""
    most_sensitive: list[str] = Field(default_factory=list)
    """The top of the sensitivity ranking, when the search got that far."""

    @model_validator(mode="after")
    def _count_covers_the_list(self) -> QuantRecipe:
        if self.excluded_count < len(self.nodes_excluded):
            raise ValueError(f"excluded_count {self.excluded_count} < {len(self.nodes_excluded)} nodes listed")
        return self

    def compact(self, names: int | None = COMPACT_RECIPE_NODES) -> dict[str, Any]:
        """The recipe for the termination message: the excluded nodes cut to ``names`` names (None: every
        one, whole: what the serving pod needs to rebuild the variant; ``excluded_count`` says how many there
        are), no sensitivity ranking, fields at their default left out."""
        doc = self.model_dump(exclude_defaults=True, exclude={"nodes_excluded", "most_sensitive"})
        if names is None:
            kept = list(self.nodes_excluded)
        else:
            kept = [name[:COMPACT_NODE_NAME_CHARS] for name in self.nodes_excluded[:names]]
        if kept:
            doc["nodes_excluded"] = kept
        if "search_seconds" in doc:
            doc["search_seconds"] = round(self.search_seconds, 1)
        return doc


class VariantProfile(_Model):
    """One precision variant of the model: how it was built, how good it is, how fast."""

    name: VariantName
    status: Literal["ok", "failed", "skipped"]
    reason: str = ""
    """Why it failed or was skipped (a build error, no GPU, ...)."""
    size_bytes: int | None = None
    load_seconds: float | None = None
    quality: float | None = None
    """The evaluation metric on the evaluation data (accuracy, relative error, cosine)."""
    quality_drop: float | None = None
    """How much worse than fp32, in the metric's units; 0 for fp32 itself."""
    latency: list[LatencyPoint] = Field(default_factory=list)
    rss_mb: float | None = None
    gpu_memory_mb: float | None = None
    stack: StackProfile | None = None
    """None when the bench did not run the serving stack (``--stack-seconds 0``, or a profile from before)."""
    recipe: QuantRecipe | None = None
    """INT8 variants benched with an accuracy gate: how they were quantized (see QuantRecipe)."""

    def best(self) -> LatencyPoint | None:
        """The batch size with the highest throughput."""
        return max(self.latency, key=lambda p: p.throughput_rps) if self.latency else None


class Profile(_Model):
    """Everything measured for one model on one instance type.

    The contract between the bench (the serving image writes it) and the planner (the operator reads
    it, from a Job's termination message and from its profile cache): the two ship in different
    images and may run at different versions, so a change of shape is a new ``schema_version`` and
    both sides change together.
    """

    schema_version: Literal[1] = 1
    model_name: str
    model_digest: str
    """sha256 of the model file: the profile cache's key, with the instance type and image version."""
    instance_type: str
    metric: Literal["accuracy", "top1", "mse", "cosine"]
    evaluation_rows: int
    threads: int
    hardware: Hardware
    variants: list[VariantProfile]
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def variant(self, name: str) -> VariantProfile | None:
        return next((v for v in self.variants if v.name == name), None)

    # ---- compact form ---------------------------------------------------------------------------
    def to_compact(self, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
        """JSON of at most ``limit`` bytes: numbers rounded, recipes' node lists whole when they fit (else cut
        to a few names, then to none), latency curves thinned if they must be.

        The first and the best batch size of every variant are always kept. A recipe's node list is whole
        when it fits, as the serving pod rebuilds the variant from it; a list cut short makes the planner
        leave that variant out (it cannot be served as measured) and says so.
        """
        doc = json.loads(self.model_dump_json())
        for v, full in zip(doc["variants"], self.variants, strict=True):
            v["reason"] = v["reason"][:300]
            if full.recipe is None:
                del v["recipe"]  # absent, not null: what a reader from before recipes expects
            else:
                v["recipe"] = full.recipe.compact(names=None)
            for point in v["latency"]:
                for key, value in point.items():
                    if isinstance(value, float):
                        point[key] = float(f"{value:.4g}")
            if v.get("stack"):
                v["stack"] = {k: [float(f"{x:.3g}") for x in q] for k, q in v["stack"].items()}
        for names in (COMPACT_RECIPE_NODES, 0):  # whole lists first: the planner serves only a whole recipe
            text = json.dumps(doc, separators=(",", ":"))
            if len(text.encode()) <= limit:
                return text
            for v, full in zip(doc["variants"], self.variants, strict=True):
                if full.recipe is not None:
                    v["recipe"] = full.recipe.compact(names=names)
        keep_every = 1
        while True:
            text = json.dumps(doc, separators=(",", ":"))
            if len(text.encode()) <= limit:
                return text
            keep_every += 1
            if keep_every > 64:
                raise ValueError(f"the compact profile does not fit {limit} bytes")
            for v, full in zip(doc["variants"], self.variants, strict=True):
                best = full.best()
                v["latency"] = [
                    p
                    for i, p in enumerate(v["latency"])
                    if i % keep_every == 0 or (best is not None and p["batch_size"] == best.batch_size)
                ]

    @classmethod
    def from_compact(cls, text: str) -> Profile:
        """Parse (and validate) a compact profile, as the operator does with a termination message."""
        return cls.model_validate_json(text)


def summary_rows(profile: Profile) -> list[dict[str, Any]]:
    """One row per variant, for the terminal summary and reports."""
    rows = []
    base = profile.variant("fp32")
    base_best = base.best() if base else None
    base_single = base.latency[0].throughput_rps if base and base.latency else None
    for v in profile.variants:
        best = v.best()
        rows.append(
            {
                "variant": v.name,
                "status": v.status if v.status == "ok" else f"{v.status}: {v.reason[:60]}",
                "quality": v.quality,
                "drop": v.quality_drop,
                "p50_b1_ms": v.latency[0].p50_ms if v.latency else None,
                "best_batch": best.batch_size if best else None,
                "best_rps": best.throughput_rps if best else None,
                "vs_fp32_best": best.throughput_rps / base_best.throughput_rps if best and base_best else None,
                "vs_fp32_b1": best.throughput_rps / base_single if best and base_single else None,
                "load_s": v.load_seconds,
                "rss_mb": v.rss_mb,
            }
        )
    return rows
