"""The generated CRD: fresh, structural, with printer columns, defaults and CEL rules
that agree with the pydantic models they come from."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from leanserve.api import InferenceDeployment
from leanserve.api.crd import CRD_FILENAME, crd_yaml, render_crd
from tests import crd_schema
from tests.conftest import EXAMPLES, REPO, load_example
from tests.invalid_specs import INVALID_CASES

COMMITTED = REPO / "crds" / CRD_FILENAME


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(COMMITTED.read_text())


@pytest.fixture(scope="module")
def schema(crd) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_matches_a_fresh_generation():
    assert COMMITTED.read_text() == crd_yaml(), "crds/ is stale: run `make crds` and commit the result"


def test_generation_is_deterministic():
    assert crd_yaml() == crd_yaml()
    assert yaml.safe_load(crd_yaml()) == render_crd()


def test_identity_and_subresources(crd):
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "inferencedeployments.leanserve.dev"
    assert spec["group"] == "leanserve.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "InferenceDeployment"
    assert spec["names"]["shortNames"] == ["infd"]
    [version] = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_schema_is_structural(schema):
    assert crd_schema.structural_problems(schema) == []


def test_structural_checker_catches_violations():
    bad = {
        "type": "object",
        "properties": {
            "a": {"description": "untyped"},
            "b": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "c": {"type": "number", "exclusiveMinimum": 0},
        },
    }
    problems = crd_schema.structural_problems(bad)
    assert any(".a: no type" in p for p in problems)
    assert any(".b: anyOf outside int-or-string" in p for p in problems)
    assert any(".c: exclusiveMinimum must be a boolean" in p for p in problems)


def test_every_field_has_a_description_or_is_obvious(schema):
    spec = schema["properties"]["spec"]
    undocumented = [
        p
        for p, n in crd_schema.walk(spec)
        if n.get("type") == "object" and "description" not in n and "properties" in n
    ]
    assert undocumented == []


def test_printer_columns(crd, schema):
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    names = [c["name"] for c in columns if c.get("priority", 0) == 0]
    assert names == ["Phase", "Instance", "Precision", "Replicas", "Cost/1M", "Obs/1M", "Latency", "P95", "Age"]
    type_map = {"string": "string", "integer": "integer", "number": "number"}
    for col in columns:
        if col["jsonPath"] == ".metadata.creationTimestamp":
            continue
        node = crd_schema.node_at(schema, col["jsonPath"])
        assert node is not None, f"{col['name']}: {col['jsonPath']} is not in the schema"
        assert node["type"] == type_map[col["type"]], col


def test_bounds_enums_and_defaults_are_carried(schema):
    spec = schema["properties"]["spec"]["properties"]
    target = spec["sla"]["properties"]["latency"]["properties"]["targetMs"]
    assert target["minimum"] == 0 and target["exclusiveMinimum"] is True
    assert spec["precision"]["enum"] == ["auto", "fp32", "int8", "fp16"]
    assert spec["precision"]["default"] == "auto"
    assert spec["cache"]["properties"]["semantic"]["properties"]["threshold"]["default"] == 0.97
    assert spec["candidates"]["x-kubernetes-list-type"] == "set"
    assert spec["model"]["properties"]["uri"]["pattern"].startswith("^(https|http|pvc|configmap|file)://")
    cpu = spec["serving"]["properties"]["resources"]["properties"]["requests"]["additionalProperties"]
    assert cpu["x-kubernetes-int-or-string"] is True


def test_required_cross_field_rules_are_present(schema):
    found = {(path, r["rule"]) for path, _, r in crd_schema.rules(schema)}
    paths = {p for p, _ in found}
    for expected in (
        ".spec.traffic",
        ".spec.autoscaling",
        ".spec.sla.latency",
        ".spec.cache.semantic",
        ".spec.batching",
        ".spec.cache.redis",
        ".spec",
    ):
        assert expected in paths, f"no CEL rule on {expected}"
    assert any("self.peakRps >= self.averageRps" in r for _, r in found)
    assert any("self.warmPool <= self.maxReplicas" in r for _, r in found)


def test_every_cel_rule_compiles_and_names_an_existing_field(schema):
    for path, node, rule in crd_schema.rules(schema):
        field = rule.get("fieldPath")
        if field:
            assert field.strip(".") in node["properties"], f"{path}: fieldPath {field} is not a property"
        assert crd_schema.cel_program(rule["rule"]) is not None


def _crd_defaulted(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    return crd_schema.apply_defaults(doc, schema)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_crd_defaults_equal_model_defaults(path, schema):
    """What the API server stores after defaulting is what pydantic fills in."""
    doc = load_example(path)
    via_crd = _crd_defaulted(doc, schema)
    via_model = InferenceDeployment.model_validate(doc).to_api()
    assert InferenceDeployment.model_validate(via_crd).to_api() == via_model


def test_minimal_spec_defaults_agree_field_by_field(minimal_doc, schema):
    via_crd = _crd_defaulted(minimal_doc, schema)["spec"]
    via_model = InferenceDeployment.model_validate(minimal_doc).to_api()["spec"]

    def leaves(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            return {k: v for key, sub in d.items() for k, v in leaves(sub, f"{prefix}.{key}").items()}
        return {prefix: d}

    # An empty list and an absent one mean the same; compare everything else exactly.
    def present(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in leaves(d).items() if v != []}

    assert present(via_crd) == present(via_model)


def _rule_holds(schema: dict[str, Any], doc: dict[str, Any]) -> dict[str, bool]:
    """Evaluate every CEL rule on the (defaulted) document, as the API server would."""
    defaulted = _crd_defaulted(doc, schema)
    out = {}
    for path, node, rule in crd_schema.rules(schema):
        value = crd_schema.value_at(defaulted, path)
        if value is not None:
            out[f"{path}: {rule['rule']}"] = crd_schema.cel_eval(rule["rule"], value, node)
    return out


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_cel_rules_hold_on_valid_examples(path, schema):
    results = _rule_holds(schema, load_example(path))
    assert results and all(results.values()), [k for k, v in results.items() if not v]


_RULE_MESSAGES = [
    r["message"] for _, _, r in crd_schema.rules(render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
]
#: The invalid cases that a CEL rule (rather than a plain schema bound) must catch.
RULE_CASES = [c for c in INVALID_CASES if any(c.reason in m for m in _RULE_MESSAGES)]


def test_rule_cases_cover_every_rule():
    assert {m for m in _RULE_MESSAGES if any(c.reason in m for c in RULE_CASES)} == set(_RULE_MESSAGES)


@pytest.mark.parametrize("case", RULE_CASES, ids=[c.id for c in RULE_CASES])
def test_cel_rule_and_python_twin_reject_the_same_spec(case, minimal_doc, schema):
    doc = case.apply(minimal_doc)
    with pytest.raises(ValidationError):
        InferenceDeployment.model_validate(doc)
    results = _rule_holds(schema, doc)
    failing = [k for k, ok in results.items() if not ok]
    assert failing, f"no CEL rule rejects {case.id}"
