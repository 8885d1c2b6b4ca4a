"""Status conditions: set one, keep the transition time when nothing changed, find what transitioned.

Pure functions over the API's status dicts (camelCase, as stored), so that a
reconcile that finds everything as it was produces an identical status and
writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


def rfc3339(when: datetime) -> str:
    """A status time as the API writes it: UTC, to the second, with a Z."""
    return when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_rfc3339(value: str) -> datetime:
    """A time read from an object (``...Z`` or with an offset), timezone-aware."""
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def now_rfc3339() -> str:
    return rfc3339(datetime.now(UTC))


@dataclass(frozen=True)
class Cond:
    """A condition to set: type, status (True, False, Unknown), CamelCase reason, message."""

    type: str
    status: str
    reason: str
    message: str = ""


def merge(
    current: list[dict[str, Any]], updates: list[Cond], generation: int | None, now: str | None = None
) -> list[dict[str, Any]]:
    """``current`` with ``updates`` applied; a condition whose status did not change keeps its lastTransitionTime."""
    by_type = {c["type"]: dict(c) for c in current}
    for u in updates:
        old = by_type.get(u.type)
        stamp = old["lastTransitionTime"] if old and old.get("status") == u.status else (now or now_rfc3339())
        new = {
            "type": u.type,
            "status": u.status,
            "reason": u.reason,
            "message": u.message[:32768],
            "lastTransitionTime": stamp,
        }
        if generation is not None:
            new["observedGeneration"] = generation
        by_type[u.type] = new
    order = ["Planned", "Deployed", "Available", "WithinBudget"]
    return sorted(by_type.values(), key=lambda c: (order.index(c["type"]) if c["type"] in order else 99, c["type"]))


def transitions(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conditions of ``after`` whose status or reason differs from ``before`` (what deserves an Event)."""
    old = {c["type"]: (c.get("status"), c.get("reason")) for c in before}
    return [c for c in after if old.get(c["type"]) != (c["status"], c["reason"])]


def same_status(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether writing ``b`` over ``a`` would change anything a reader sees."""
    return (a or {}) == (b or {})
