"""Validate InferenceDeployment files locally, with errors addressed by field.

The same pydantic models that generate the CRD check the file, so what passes
here passes the API server's schema and CEL rules (a test holds the two in
step). Each error names the field path, the offending value and the reason.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from leanserve.api.resource import API_VERSION, GROUP, KIND, InferenceDeployment
from leanserve.api.spec import ALLOWED_URI_SCHEMES, URI_PATTERN


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


@dataclass(frozen=True)
class FieldError:
    """One problem with one field: where, what was there, and why it is wrong."""

    path: str
    value: Any
    reason: str

    def format(self) -> str:
        """``path: reason (value: ...)``, the line ``leanserve validate`` prints."""
        if self.value is MISSING:
            return f"{self.path}: {self.reason}"
        return f"{self.path}: {self.reason} (value: {self.value!r})"

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "value": None if self.value is MISSING else self.value,
            "reason": self.reason,
        }


@dataclass
class DocumentResult:
    """The outcome for one YAML document of a file."""

    source: str
    name: str | None = None
    errors: list[FieldError] = field(default_factory=list)
    resource: InferenceDeployment | None = None
    skipped: str | None = None

    @property
    def valid(self) -> bool:
        return not self.errors


def format_path(parts: typing.Iterable[str | int]) -> str:
    """``("spec", "candidates", 2)`` -> ``spec.candidates[2]``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(document)"


def _lookup(doc: Any, parts: typing.Sequence[str | int]) -> Any:
    for part in parts:
        if (isinstance(doc, dict) and part in doc) or (
            isinstance(doc, list) and isinstance(part, int) and part < len(doc)
        ):
            doc = doc[part]
        else:
            return MISSING
    return doc


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``X``, ``X | None``, ``list[X]`` or ``dict[str, X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _known_fields(parts: typing.Sequence[str | int]) -> list[str]:
    """The field names (as written in YAML) of the model found at ``parts``."""
    model: type[BaseModel] | None = InferenceDeployment
    for part in parts:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        info = next(
            (f for n, f in model.model_fields.items() if (f.alias or n) == part),
            None,
        )
        model = _model_in(info.annotation) if info is not None else None
    if model is None:
        return []
    return [f.alias or n for n, f in model.model_fields.items()]


def _reason(err: dict[str, Any], loc: tuple[str | int, ...]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _known_fields(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        listing = f"; known fields: {', '.join(known)}" if known and not close else ""
        return f"unknown field{hint}{listing}"
    if kind == "missing":
        return "required field is missing"
    if kind == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == URI_PATTERN:
        return "URI scheme not allowed: use one of " + ", ".join(f"{s}://" for s in ALLOWED_URI_SCHEMES)
    return str(err["msg"])


def errors_from_validation(exc: ValidationError, doc: Any) -> list[FieldError]:
    """Turn pydantic's errors into field-addressed ones, resolving rule field paths."""
    out: list[FieldError] = []
    for err in exc.errors(include_url=False):
        loc: tuple[str | int, ...] = tuple(err["loc"])
        if err["type"] == "rule":
            extra = err["ctx"]["field_path"].strip(".")
            loc = loc + tuple(p for p in extra.split(".") if p)
            value = _lookup(doc, loc)
        elif err["type"] == "missing":
            value = MISSING
        else:
            value = err.get("input", MISSING)
        out.append(FieldError(format_path(loc), value, _reason(err, loc)))
    return out


def validate_object(doc: Any) -> tuple[InferenceDeployment | None, list[FieldError]]:
    """Validate one parsed document; return the resource or the errors."""
    if not isinstance(doc, dict):
        return None, [FieldError("(document)", doc, "expected a mapping (an InferenceDeployment object)")]
    try:
        return InferenceDeployment.model_validate(doc), []
    except ValidationError as exc:
        return None, errors_from_validation(exc, doc)


def _is_ours(doc: Any) -> bool:
    if not isinstance(doc, dict):
        return True  # let validate_object say what is wrong with it
    api_version = str(doc.get("apiVersion", ""))
    return doc.get("kind") == KIND or api_version.split("/")[0] == GROUP or not api_version


def validate_text(text: str, source: str) -> list[DocumentResult]:
    """Validate every InferenceDeployment in a (multi-document) YAML text."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        return [DocumentResult(source, errors=[FieldError("(document)", MISSING, f"invalid YAML: {exc}")])]
    if not docs:
        return [DocumentResult(source, errors=[FieldError("(document)", MISSING, "no YAML document")])]
    results = []
    for index, doc in enumerate(docs):
        where = source if len(docs) == 1 else f"{source}#{index + 1}"
        name = _lookup(doc, ("metadata", "name"))
        result = DocumentResult(where, name=None if name is MISSING else str(name))
        if not _is_ours(doc):
            result.skipped = f"not an {KIND} ({doc.get('apiVersion')}/{doc.get('kind')}); expected {API_VERSION}"
        else:
            result.resource, result.errors = validate_object(doc)
        results.append(result)
    return results


def validate_file(path: Path) -> list[DocumentResult]:
    """Validate every InferenceDeployment in a YAML file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return [DocumentResult(str(path), errors=[FieldError("(file)", MISSING, f"cannot read: {exc.strerror}")])]
    return validate_text(text, str(path))
