"""The pydantic models: defaults, aliases, round trips, and the shipped examples."""

from __future__ import annotations

import pytest

from leanserve.api import InferenceDeployment
from leanserve.api.resource import NAME_MAX_LENGTH
from tests.conftest import EXAMPLES, load_example


def test_minimal_spec_is_complete_with_defaults(minimal_doc):
    spec = InferenceDeployment.model_validate(minimal_doc).spec
    assert spec.model.format == "onnx"
    assert spec.model.evaluation is None
    assert spec.sla.latency.percentile == 95.0
    assert spec.sla.max_accuracy_drop == 0.01
    assert spec.traffic.peak_rps is None
    assert spec.traffic.effective_peak_rps() == 300.0
    assert spec.candidates == []
    assert spec.precision == "auto"
    assert spec.batching.mode == "auto"
    assert spec.cache.exact.enabled is True
    assert spec.cache.exact.ttl_seconds == 3600
    assert spec.cache.semantic.enabled is False
    assert spec.cache.semantic.threshold == 0.97
    assert spec.cache.redis.url is None
    assert spec.autoscaling.warm_pool == 1
    assert spec.autoscaling.max_replicas is None
    assert spec.autoscaling.scale_down_stabilization_seconds == 300


def test_wire_format_is_camel_case(minimal_doc):
    out = InferenceDeployment.model_validate(minimal_doc).to_api()
    assert out["apiVersion"] == "leanserve.dev/v1alpha1"
    assert out["spec"]["sla"]["latency"]["targetMs"] == 100
    assert out["spec"]["cache"]["exact"]["ttlSeconds"] == 3600
    assert "target_ms" not in str(out)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_is_valid_and_round_trips(path):
    doc = load_example(path)
    first = InferenceDeployment.model_validate(doc)
    again = InferenceDeployment.model_validate(first.to_api())
    assert again == first


def test_examples_cover_the_three_documented_shapes():
    specs = {p.stem: InferenceDeployment.model_validate(load_example(p)).spec for p in EXAMPLES}
    assert len(specs) >= 3
    assert any(s.cache.semantic.enabled for s in specs.values()), "an example with the semantic cache"
    gpu = [s for s in specs.values() if any(c.startswith("g") for c in s.candidates)]
    assert gpu and any(not c.startswith("g") for c in gpu[0].candidates), "a GPU candidate with CPU fallback"
    assert any(s.candidates and all(c[0] in "mc" for c in s.candidates) for s in specs.values()), "a CPU-only one"


def test_resource_quantities_accept_integers_and_strings(minimal_doc):
    minimal_doc["spec"]["serving"] = {
        "resources": {"requests": {"cpu": 2, "memory": "4Gi"}, "limits": {"cpu": "2500m"}}
    }
    res = InferenceDeployment.model_validate(minimal_doc).spec.serving.resources
    assert res.requests == {"cpu": "2", "memory": "4Gi"}
    assert res.limits == {"cpu": "2500m"}


def test_name_length_limit_leaves_room_for_suffixes(minimal_doc):
    minimal_doc["metadata"]["name"] = "a" * NAME_MAX_LENGTH
    InferenceDeployment.model_validate(minimal_doc)
    minimal_doc["metadata"]["name"] = "a" * (NAME_MAX_LENGTH + 1)
    with pytest.raises(ValueError, match="at most 40 characters"):
        InferenceDeployment.model_validate(minimal_doc)


def test_status_accepts_what_the_operator_writes(minimal_doc):
    minimal_doc["status"] = {
        "phase": "Ready",
        "observedGeneration": 3,
        "replicas": 2,
        "conditions": [
            {
                "type": "Planned",
                "status": "True",
                "reason": "PlanFound",
                "message": "g4dn.xlarge int8",
                "lastTransitionTime": "2026-11-24T10:00:00Z",
            }
        ],
        "plan": {
            "instanceType": "g4dn.xlarge",
            "precision": "int8",
            "costPerMillionRequests": 2.1,
            "replicas": {"min": 1, "max": 4, "average": 1.4, "peak": 3},
        },
        "candidates": [{"rank": 1, "instanceType": "g4dn.xlarge", "precision": "int8", "feasible": True}],
        "savings": [{"lever": "baseline", "costPerMillionRequests": 80.0}],
        "observed": {"p95Ms": 41.5, "cacheHitRate": 0.18},
    }
    status = InferenceDeployment.model_validate(minimal_doc).status
    assert status is not None and status.plan is not None
    assert status.conditions[0].last_transition_time.year == 2026
    assert status.plan.replicas.peak == 3
