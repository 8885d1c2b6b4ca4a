"""``leanserve status``: the predicted-against-observed table from a status decide() wrote (no cluster)."""

from __future__ import annotations

from leanserve.cli.status_cmd import comparison_rows, render
from leanserve.controller.decide import decide
from tests.test_decide import PROMETHEUS, cached, deployed, observed, reading, serving


def judged_status() -> dict:
    doc = deployed()
    d = decide(
        observed(doc, profiles=cached(), serving=serving(2), observation=reading(doc, rps=800, p95=30.0)), PROMETHEUS
    )
    return {**doc, "status": d.status}


def test_rows_put_each_prediction_beside_its_observation_with_the_error():
    obj = judged_status()
    rows = {r[0]: r[1:] for r in comparison_rows(obj["status"])}
    predicted = obj["status"]["plan"]["predictedLatencyMs"]
    latency = rows["latency at the SLA percentile"]
    assert latency[0] == f"{predicted:.1f} ms" and latency[1] == "30.0 ms"
    assert latency[2] == f"{round(30.0 / predicted - 1, 4):+.1%}"  # status keeps errors to 4 decimals
    cost = rows["cost per 1M requests"]
    assert cost[1] == f"${obj['status']['observed']['costPerMillionRequests']:.4f}" and cost[2].endswith("%")
    assert rows["request rate (req/s)"][1] == "800.0"
    # Not saturated (nothing throttled): no observed capacity, no capacity error.
    assert rows["capacity per replica (req/s, when saturated)"][1:] == ("-", "-")


def test_the_report_names_the_plan_the_window_and_the_conditions():
    text = render(judged_status())
    assert text.startswith("team-a/fraud: ")
    assert "plan: " in text and "observed: 300 s window to 2026-11-25T12:00:00Z" in text
    assert "SLAMet=True SLAMet" in text and "Observed=True Observed" in text


def test_a_deployment_without_observations_shows_the_prediction_only():
    obj = deployed()
    rows = {r[0]: r[1:] for r in comparison_rows(obj["status"])}
    assert rows["latency at the SLA percentile"][1:] == ("-", "-")
    assert rows["cost per 1M requests"][0].startswith("$")
