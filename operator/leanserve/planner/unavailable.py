"""Why an instance type cannot be planned for: what profiling found, as a typed value.

Profiling (the operator) finds out; the planner shows it in the ranked table and
leaves the type out. The kind is data, not a prefix of the text that the
planner would have to read back: that mislabelled a spec without
``model.evaluation`` as "unschedulable".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

UnavailableKind = Literal["unschedulable", "profiling-failed", "not-profilable"]


@dataclass(frozen=True)
class Unavailable:
    """One instance type left out of the plan, and the sentence the ranked table shows for it."""

    kind: UnavailableKind
    reason: str

    @classmethod
    def unschedulable(cls, message: str, waited_s: float | None = None) -> Unavailable:
        """Its profiling pod found no node (``message`` is the scheduler's), for ``waited_s`` seconds."""
        waited = f" for {waited_s:g} s" if waited_s is not None else ""
        return cls("unschedulable", f"unschedulable{waited}: {message}")

    @classmethod
    def profiling_failed(cls, why: str, attempts: int | None = None) -> Unavailable:
        """The bench ran and failed (its own reason, or the Job's), after ``attempts`` attempts."""
        after = f" after {attempts} attempt(s)" if attempts is not None else ""
        return cls("profiling-failed", f"profiling failed{after}: {why}")

    @classmethod
    def not_profilable(cls, why: str) -> Unavailable:
        """The spec cannot be profiled at all (nothing was run)."""
        return cls("not-profilable", f"not profiled: {why}")

    def __str__(self) -> str:
        return self.reason
