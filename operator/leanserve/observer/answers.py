"""Prometheus's answers to instant queries, checked before a number of them is believed.

Pure: the decoded JSON ``result`` of ``/api/v1/query`` in, plain Python values out, or
:class:`InvalidAnswer` with what was wrong. Whatever answers at the configured URL is read as untrusted
input: a proxy's error page, another service, a Prometheus of a newer API, a tampered answer. An
instant vector is a list of ``{"metric": {label: value}, "value": [timestamp, "number"]}``; Prometheus
writes numbers as strings (``"12.5"``, ``"NaN"``, ``"+Inf"``).

NaN is how PromQL says "no data for this figure" (a quantile of a histogram with no observations in the
window): it reads as None. An infinite or negative count, a second series where ``sum()`` makes one,
a sample without the label it was grouped by: the answer is not one, and the whole observation fails.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: How much of an offending value an error message quotes.
QUOTE_CHARS = 120


class InvalidAnswer(ValueError):  # noqa: N818  (what it is: an answer that is not one)
    """An answer that does not have the shape or the numbers of a Prometheus instant vector."""


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector: its labels and its value (NaN kept: it means "no data")."""

    labels: Mapping[str, str]
    value: float


def _quote(value: Any) -> str:
    return repr(value)[:QUOTE_CHARS]


def _number(raw: Any) -> float:
    """A sample value: Prometheus sends a string; a JSON number is accepted too, a bool or anything else is not."""
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise InvalidAnswer(f"a sample value must be a number as a string, got {_quote(raw)}")
    try:
        return float(raw)
    except ValueError:
        raise InvalidAnswer(f"a sample value must be a number, got {_quote(raw)}") from None


def instant_vector(result: Any) -> list[Sample]:
    """The samples of an instant-vector ``result``; InvalidAnswer when it is not one."""
    if not isinstance(result, list):
        raise InvalidAnswer(f"an instant vector is a list, got {_quote(result)}")
    samples = []
    for element in result:
        if not (isinstance(element, dict) and "metric" in element and "value" in element):
            raise InvalidAnswer(f"a vector element has 'metric' and 'value', got {_quote(element)}")
        labels, point = element["metric"], element["value"]
        if not (isinstance(labels, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())):
            raise InvalidAnswer(f"a sample's labels are strings, got {_quote(labels)}")
        if not (isinstance(point, list) and len(point) == 2):
            raise InvalidAnswer(f"a sample's value is [timestamp, value], got {_quote(point)}")
        timestamp = _number(point[0])
        if not math.isfinite(timestamp):
            raise InvalidAnswer(f"a sample's timestamp must be finite, got {_quote(point[0])}")
        samples.append(Sample(labels, _number(point[1])))
    return samples


def single(samples: list[Sample], *, what: str) -> float | None:
    """The value of a query that makes at most one series (``sum()``, ``histogram_quantile`` over ``sum``).

    None when there is no series or its value is NaN; InvalidAnswer for more than one series, or a value
    that is infinite or negative (every figure here is a count, a duration or an average of counts).
    """
    if not samples:
        return None
    if len(samples) > 1:
        raise InvalidAnswer(f"{what}: one series expected, got {len(samples)}")
    value = samples[0].value
    if math.isnan(value):
        return None
    if math.isinf(value) or value < 0:
        raise InvalidAnswer(f"{what}: a finite, non-negative number expected, got {value}")
    return value


def by_label(samples: list[Sample], label: str, *, what: str) -> dict[str, float]:
    """A ``sum by (label)`` answer as {label value: value}; series whose value is NaN are left out.

    InvalidAnswer for a sample without the label, a label value twice, or an infinite or negative value.
    """
    out: dict[str, float] = {}
    for sample in samples:
        key = sample.labels.get(label)
        if key is None:
            raise InvalidAnswer(f"{what}: every series has a {label!r} label, got {_quote(dict(sample.labels))}")
        if key in out:
            raise InvalidAnswer(f"{what}: {label}={key!r} twice")
        value = sample.value
        if math.isnan(value):
            continue
        if math.isinf(value) or value < 0:
            raise InvalidAnswer(f"{what}: a finite, non-negative number expected for {label}={key!r}, got {value}")
        out[key] = value
    return out
