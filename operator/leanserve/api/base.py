"""The base model of the API and its cross-field rules.

Every cross-field constraint is declared once, as a :class:`Rule` that carries
both its CEL expression (written into the CRD as ``x-kubernetes-validations``,
so the API server enforces it) and its Python twin (run by pydantic, so
``leanserve validate`` catches the same mistake before anything reaches a
cluster). A test evaluates every CEL expression against the same inputs as the
Python check, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError


@dataclass(frozen=True)
class Rule:
    """A cross-field constraint, enforced by the API server and by pydantic.

    ``cel`` is evaluated by the API server with ``self`` bound to the object the
    rule sits on; ``check`` receives the validated pydantic model and must agree
    with it. ``field_path`` (relative, such as ``.peakRps``) points the error at
    the field a user should change.
    """

    cel: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None
    reason: str = "FieldValueInvalid"

    def to_crd(self) -> dict[str, str]:
        """The ``x-kubernetes-validations`` entry for this rule."""
        out = {"rule": self.cel, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason != "FieldValueInvalid":
            out["reason"] = self.reason
        return out


def _add_rules_to_schema(schema: dict[str, Any], cls: type[ApiModel]) -> None:
    """Write a model's rules into its JSON schema, where the CRD generator finds them."""
    if cls.rules:
        schema["x-kubernetes-validations"] = [r.to_crd() for r in cls.rules]


class ApiModel(BaseModel):
    """Base of every API object: camelCase on the wire, unknown fields rejected.

    Attribute docstrings become field descriptions (shown by ``kubectl explain``).
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        json_schema_extra=_add_rules_to_schema,
    )

    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> ApiModel:
        for rule in type(self).rules:
            if not rule.check(self):
                raise PydanticCustomError(
                    "rule",
                    rule.message,
                    {"field_path": rule.field_path or "", "rule": rule.cel},
                )
        return self

    def to_api(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
