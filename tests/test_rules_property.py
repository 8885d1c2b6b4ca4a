"""Property: for any values, pydantic accepts a spec exactly when the CRD's CEL rules do.

The rules are declared once (CEL for the API server, a Python twin for local
validation); hypothesis looks for inputs on which the two disagree.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from leanserve.api import InferenceDeployment
from leanserve.api.crd import render_crd
from tests import crd_schema
from tests.conftest import MINIMAL_DOC

SCHEMA = render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

rps = st.floats(min_value=0.5, max_value=1000, allow_nan=False)
maybe = st.one_of(st.none(), st.just(True))


def _cel_accepts(doc: dict[str, Any]) -> bool:
    defaulted = crd_schema.apply_defaults(doc, SCHEMA)
    for path, node, rule in crd_schema.rules(SCHEMA):
        value = crd_schema.value_at(defaulted, path)
        if value is not None and not crd_schema.cel_eval(rule["rule"], value, node):
            return False
    return True


def _pydantic_accepts(doc: dict[str, Any]) -> bool:
    try:
        InferenceDeployment.model_validate(doc)
    except ValidationError:
        return False
    return True


@settings(max_examples=60, deadline=None)
@given(
    average=rps,
    peak=st.one_of(st.none(), rps),
    profile=st.one_of(st.none(), st.lists(st.floats(0, 4, allow_nan=False), min_size=24, max_size=24)),
    warm_pool=st.integers(0, 12),
    max_replicas=st.one_of(st.none(), st.integers(1, 12)),
    percentile=st.floats(0.001, 99.999),
    threshold=st.floats(0.001, 1.0),
    mode=st.sampled_from(["auto", "fixed", "off"]),
    batch=st.one_of(st.none(), st.integers(1, 64)),
    wait=st.one_of(st.none(), st.floats(0, 50)),
    redis_url=st.one_of(st.none(), st.just("redis://r:6379")),
    managed=st.one_of(st.none(), st.booleans()),
    precision=st.sampled_from(["auto", "fp32", "int8", "fp16"]),
    evaluation=st.booleans(),
    unschedulable=st.one_of(st.none(), st.integers(10, 3000)),
    deadline=st.one_of(st.none(), st.integers(10, 3000)),
)
def test_python_rules_agree_with_cel(
    average,
    peak,
    profile,
    warm_pool,
    max_replicas,
    percentile,
    threshold,
    mode,
    batch,
    wait,
    redis_url,
    managed,
    precision,
    evaluation,
    unschedulable,
    deadline,
):
    doc = copy.deepcopy(MINIMAL_DOC)
    spec = doc["spec"]
    traffic = {"averageRps": average, "peakRps": peak, "dailyProfile": profile}
    spec["traffic"] = {k: v for k, v in traffic.items() if v is not None}
    spec["autoscaling"] = {"warmPool": warm_pool} | ({"maxReplicas": max_replicas} if max_replicas else {})
    spec["sla"]["latency"]["percentile"] = percentile
    spec["cache"] = {
        "semantic": {"threshold": threshold},
        "redis": {k: v for k, v in (("url", redis_url), ("managed", managed)) if v is not None},
    }
    spec["batching"] = {"mode": mode} | {k: v for k, v in (("maxBatchSize", batch), ("maxWaitMs", wait)) if v}
    spec["precision"] = precision
    if evaluation:
        spec["model"]["evaluation"] = {"uri": "file:///eval.npz"}
    profiling = (("unschedulableTimeoutSeconds", unschedulable), ("deadlineSeconds", deadline))
    spec["profiling"] = {k: v for k, v in profiling if v is not None}
    assert _pydantic_accepts(doc) == _cel_accepts(doc), doc
