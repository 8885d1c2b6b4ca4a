"""Helpers that read the generated CRD schema the way the API server does.

They are deliberately written against the YAML (not the pydantic models) so
that the tests compare two independent views of the API.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from typing import Any

import celpy

SCHEMA_COMBINATORS = ("anyOf", "allOf", "oneOf", "not")


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path (``.spec.traffic``, ``.spec.candidates[]``)."""
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def structural_problems(root: dict[str, Any]) -> list[str]:
    """Violations of the API server's structural-schema rules, as readable strings."""
    problems = []
    for path, node in walk(root):
        where = path or "(root)"
        int_or_string = node.get("x-kubernetes-int-or-string") is True
        if "type" not in node and not int_or_string and not node.get("x-kubernetes-preserve-unknown-fields"):
            problems.append(f"{where}: no type")
        for ref_key in ("$ref", "$defs", "definitions", "const", "title", "nullable"):
            if ref_key in node:
                problems.append(f"{where}: {ref_key} is not allowed")
        for comb in SCHEMA_COMBINATORS:
            if comb in node and not (int_or_string and comb == "anyOf"):
                problems.append(f"{where}: {comb} outside int-or-string")
        if int_or_string and node.get("anyOf") not in (None, [{"type": "integer"}, {"type": "string"}]):
            problems.append(f"{where}: int-or-string anyOf must be exactly integer|string")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{where}: properties and additionalProperties together")
        if isinstance(node.get("additionalProperties"), bool):
            problems.append(f"{where}: boolean additionalProperties")
        if node.get("type") == "array" and "items" not in node:
            problems.append(f"{where}: array without items")
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            if bound in node and not isinstance(node[bound], bool):
                problems.append(f"{where}: {bound} must be a boolean in OpenAPI v3")
        if "enum" in node and node.get("type") == "string" and not all(isinstance(v, str) for v in node["enum"]):
            problems.append(f"{where}: non-string enum value")
        for key in node.get("required", []):
            if key not in node.get("properties", {}):
                problems.append(f"{where}: required {key!r} is not a property")
    return problems


def node_at(root: dict[str, Any], json_path: str) -> dict[str, Any] | None:
    """The schema node a printer-column JSONPath (``.status.plan.precision``) points at."""
    node: dict[str, Any] | None = root
    for part in json_path.strip(".").split("."):
        if node is None:
            return None
        node = node.get("properties", {}).get(part)
    return node


def apply_defaults(value: Any, node: dict[str, Any]) -> Any:
    """Structural defaulting as the API server does it: fill missing properties, recurse."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and "properties" in node:
        for name, sub in node["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(value[name], sub)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        value = [apply_defaults(v, node["items"]) for v in value]
    return value


def typed(value: Any, node: dict[str, Any]) -> Any:
    """Convert JSON to the types CEL sees: ``number`` fields are doubles even when written as 7."""
    if node.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        props = node.get("properties", {})
        return {k: typed(v, props.get(k, {})) for k, v in value.items()}
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [typed(v, node["items"]) for v in value]
    return value


def rules(root: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Every ``x-kubernetes-validations`` rule with the path and schema node it sits on."""
    for path, node in walk(root):
        for rule in node.get("x-kubernetes-validations", []):
            yield path, node, rule


_ENV = celpy.Environment()


@functools.cache
def cel_program(expression: str) -> Any:
    """Compile a CEL expression once (compiling is the slow part); raises on a syntax error."""
    return _ENV.program(_ENV.compile(expression))


def cel_eval(expression: str, self_value: Any, node: dict[str, Any]) -> bool:
    """Evaluate a CEL rule with ``self`` bound as the API server binds it."""
    program = cel_program(expression)
    result = program.evaluate({"self": celpy.json_to_cel(typed(self_value, node))})
    if isinstance(result, Exception):
        raise result
    return bool(result)


def value_at(doc: Any, path: str) -> Any:
    """The part of a document at a schema path without arrays (``.spec.traffic``)."""
    for part in path.strip(".").split(".") if path else []:
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    return doc
