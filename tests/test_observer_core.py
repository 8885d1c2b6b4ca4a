"""The observer's pure core: the PromQL it asks, the checks on what comes back, the arithmetic of the figures.

No Prometheus here (tests/test_observer.py runs the adapter against a real one): plain values in and out.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

import pytest

from leanserve.observer.answers import InvalidAnswer, Sample, by_label, instant_vector, single
from leanserve.observer.figures import Observation, Readings, cache_hit_rate, observation, share
from leanserve.observer.queries import deployment_queries, duration, replica_step_s, selector

AT = datetime(2026, 5, 6, 9, 30, tzinfo=UTC)


def readings(**changes: object) -> Readings:
    """600 requests in a minute on two replicas: 12 answered 503, 6 throttled; an exact and a semantic cache."""
    base = {
        "requests_by_code": {"200": 580.0, "503": 12.0, "429": 6.0, "400": 2.0},
        "latency_s": {0.5: 0.004, 0.95: 0.009, 0.99: 0.02},
        "cache_hits_by_kind": {"exact": 90.0, "semantic": 30.0},
        "cache_misses_by_kind": {"exact": 510.0, "semantic": 480.0},
        "batch_rows": 480.0,
        "batches": 60.0,
        "replicas": 2.0,
    }
    return Readings(**(base | changes))  # type: ignore[arg-type]


# ---- queries ---------------------------------------------------------------------------------------


def test_queries_select_one_deployment_by_namespace_and_name_over_the_window():
    q = deployment_queries("shop", "sentiment", 300)
    sel = '{namespace="shop",inferencedeployment="sentiment"}'
    assert q.requests_by_code == f"sum by (code) (increase(leanserve_requests_total{sel}[300000ms]))"
    assert q.latency_quantiles[0.95] == (
        f"histogram_quantile(0.95, sum by (le) (rate(leanserve_request_duration_seconds_bucket{sel}[300000ms])))"
    )
    assert set(q.latency_quantiles) == {0.5, 0.95, 0.99}
    assert q.cache_hits_by_kind == f"sum by (kind) (increase(leanserve_cache_hits_total{sel}[300000ms]))"
    assert q.cache_misses_by_kind == f"sum by (kind) (increase(leanserve_cache_misses_total{sel}[300000ms]))"
    assert q.batch_rows == f"sum (increase(leanserve_batch_size_sum{sel}[300000ms]))"
    assert q.batches == f"sum (increase(leanserve_batch_size_count{sel}[300000ms]))"
    assert q.replicas == f"avg_over_time(sum(up{sel})[300000ms:1250ms])"


def test_the_window_is_written_to_the_millisecond_and_the_replica_step_is_bounded():
    assert duration(8.0104) == "8010ms"
    assert duration(7 * 86400) == "604800000ms"
    assert replica_step_s(10) == 1.0  # short windows: every second
    assert replica_step_s(7 * 86400) == pytest.approx(2520.0)  # a week: 240 points


@pytest.mark.parametrize(
    ("namespace", "name", "field"),
    [
        ('shop"} or vector(1e9) #', "x", "namespace"),
        ("shop", 'x",code=~".+', "name"),
        ("Shop", "x", "namespace"),
        ("shop", "", "name"),
        ("shop", "x\\", "name"),
    ],
)
def test_names_that_are_not_kubernetes_names_never_reach_promql(namespace, name, field):
    with pytest.raises(ValueError, match=field):
        selector(namespace, name)


@pytest.mark.parametrize("window_s", [0.5, 0, -60, math.inf, math.nan])
def test_a_window_shorter_than_a_second_or_not_a_number_is_refused(window_s):
    with pytest.raises(ValueError, match="window_s"):
        deployment_queries("shop", "x", window_s)


# ---- answers ---------------------------------------------------------------------------------------


def test_an_instant_vector_reads_labels_and_values_nan_included():
    result = [
        {"metric": {"code": "200"}, "value": [1700000000.5, "580"]},
        {"metric": {"code": "503"}, "value": [1700000000.5, "NaN"]},
    ]
    samples = instant_vector(result)
    assert samples[0] == Sample({"code": "200"}, 580.0)
    assert math.isnan(samples[1].value)
    assert by_label(samples, "code", what="requests") == {"200": 580.0}  # NaN: no data, left out


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ({"metric": {}, "value": [1, "1"]}, "is a list"),
        ([["metric", "value"]], "has 'metric' and 'value'"),
        ([{"metric": {"code": 200}, "value": [1, "1"]}], "labels are strings"),
        ([{"metric": {}, "value": "1"}], "is \\[timestamp, value\\]"),
        ([{"metric": {}, "value": [1, True]}], "a number as a string"),
        ([{"metric": {}, "value": [1, "12 requests"]}], "must be a number"),
        ([{"metric": {}, "value": ["NaN", "1"]}], "timestamp must be finite"),
    ],
)
def test_what_is_not_an_instant_vector_is_an_invalid_answer(result, message):
    with pytest.raises(InvalidAnswer, match=message):
        instant_vector(result)


def test_a_single_figure_is_none_without_data_and_invalid_when_it_cannot_be_one():
    assert single([], what="x") is None
    assert single([Sample({}, math.nan)], what="x") is None
    assert single([Sample({}, 2.5)], what="x") == 2.5
    for value in (math.inf, -math.inf, -1.0):
        with pytest.raises(InvalidAnswer, match="finite, non-negative"):
            single([Sample({}, value)], what="x")
    with pytest.raises(InvalidAnswer, match="one series expected, got 2"):
        single([Sample({}, 1.0), Sample({"pod": "b"}, 1.0)], what="x")


def test_a_grouped_answer_needs_its_label_once_per_series():
    with pytest.raises(InvalidAnswer, match="'kind' label"):
        by_label([Sample({"code": "200"}, 1.0)], "kind", what="hits")
    with pytest.raises(InvalidAnswer, match="kind='exact' twice"):
        by_label([Sample({"kind": "exact"}, 1.0), Sample({"kind": "exact"}, 2.0)], "kind", what="hits")
    with pytest.raises(InvalidAnswer, match="finite, non-negative"):
        by_label([Sample({"kind": "exact"}, math.inf)], "kind", what="hits")


# ---- figures ---------------------------------------------------------------------------------------


def test_figures_of_a_busy_minute():
    seen = observation(readings(), at=AT, window_s=60)
    assert seen.requests == 600
    assert seen.rps == 10
    assert (seen.p50_ms, seen.p95_ms, seen.p99_ms) == pytest.approx((4.0, 9.0, 20.0))
    assert seen.error_rate == pytest.approx(12 / 600)  # 5xx only: a 400 is the client's, a 429 counted apart
    assert seen.throttled_rate == pytest.approx(6 / 600)
    assert seen.cache_hit_rate == pytest.approx((90 + 30) / (90 + 510))  # over the exact cache's lookups
    assert seen.mean_batch == 8
    assert seen.replicas == 2


def test_without_requests_the_shares_are_zero_and_what_needs_requests_is_none():
    seen = observation(
        readings(
            requests_by_code={},
            latency_s={0.5: None, 0.95: None, 0.99: None},
            cache_hits_by_kind={},
            cache_misses_by_kind={},
            batch_rows=None,
            batches=None,
        ),
        at=AT,
        window_s=60,
    )
    assert (seen.requests, seen.rps, seen.error_rate, seen.throttled_rate) == (0, 0, 0, 0)
    assert (seen.p50_ms, seen.p95_ms, seen.p99_ms, seen.cache_hit_rate, seen.mean_batch) == (None,) * 5
    assert seen.cost_per_million(0.5) is None


def test_the_hit_rate_counts_lookups_at_the_first_cache_the_sidecar_asks():
    assert cache_hit_rate({"exact": 30.0}, {"exact": 70.0}) == pytest.approx(0.3)
    assert cache_hit_rate({"semantic": 20.0}, {"semantic": 60.0}) == pytest.approx(0.25)  # semantic only
    assert cache_hit_rate({}, {"exact": 50.0}) == 0.0  # asked, never hit
    assert cache_hit_rate({}, {}) is None  # no cache traffic
    assert cache_hit_rate({"exact": 0.0}, {"exact": 0.0}) is None
    assert cache_hit_rate({"exact": 10.0, "semantic": 0.6}, {"exact": 0.5}) == 1.0  # extrapolation: never over 1


def test_share_is_zero_of_nothing_and_at_most_one():
    assert share(3, 0) == 0.0
    assert share(3, 12) == 0.25
    assert share(12.01, 12) == 1.0


def test_cost_per_million_is_replica_hours_at_the_price_over_the_requests():
    seen = observation(readings(), at=AT, window_s=3600)  # 600 requests in an hour on two replicas
    assert seen.cost_per_million(0.5) == pytest.approx(2 * 1 * 0.5 / 600 * 1e6)
    assert seen.cost_per_million(0.0) == 0.0
    for price in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="usd_per_hour"):
            seen.cost_per_million(price)


def test_the_api_form_has_camel_case_keys_and_an_rfc3339_time_in_utc():
    at = datetime(2026, 5, 6, 11, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
    api = observation(readings(cache_hits_by_kind={}, cache_misses_by_kind={}), at=at, window_s=60).to_api()
    assert api == {
        "at": "2026-05-06T09:30:15Z",
        "windowSeconds": 60,
        "requests": 600,
        "rps": 10,
        "p50Ms": pytest.approx(4.0),
        "p95Ms": pytest.approx(9.0),
        "p99Ms": pytest.approx(20.0),
        "errorRate": pytest.approx(0.02),
        "throttledRate": pytest.approx(0.01),
        "cacheHitRate": None,
        "meanBatch": 8,
        "replicas": 2,
    }


def test_an_observation_is_a_value():
    one = observation(readings(), at=AT, window_s=60)
    assert one == observation(readings(), at=AT, window_s=60)
    assert isinstance(one, Observation)
    with pytest.raises(AttributeError):
        one.rps = 0  # type: ignore[misc]
