"""The predictive warm pool: the minReplicas schedule learnt from a request-rate history, and the cold start.

Pure: synthetic histories in, schedules out. Times are UTC; the week starts on a Monday.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from leanserve.planner.warm_pool import (
    DAY_S,
    HOUR_S,
    WEEK_S,
    WarmPoolStep,
    cold_start_seconds,
    min_replicas_at,
    schedule,
)

MONDAY = datetime(2024, 5, 6, tzinfo=UTC)
#: 25 rps per replica at 80 % utilization: one replica per 20 rps.
CAPACITY = 25.0
COLD_START_S = 300.0


def history(days: int, rate, *, step_s: int = 300, start: datetime = MONDAY) -> list[tuple[datetime, float]]:
    """Samples every ``step_s`` for ``days`` days; ``rate(when)`` gives each one's rps."""
    times = [start + timedelta(seconds=s) for s in range(0, days * DAY_S, step_s)]
    return [(t, rate(t)) for t in times]


def daily_peak(when: datetime) -> float:
    """20 rps, 180 rps from 09:00 to 11:00 UTC."""
    return 180.0 if 9 <= when.hour < 11 else 20.0


def at(day: datetime, hh: int, mm: int = 0, ss: int = 0) -> datetime:
    return day + timedelta(hours=hh, minutes=mm, seconds=ss)


def test_a_daily_peak_is_met_a_cold_start_early_and_released_when_it_ends():
    plan = schedule(history(7, daily_peak), CAPACITY, warm_pool=2, max_replicas=20, cold_start_s=COLD_START_S)

    assert plan.basis == "hour-of-day" and plan.period_s == DAY_S
    assert plan.steps == (
        WarmPoolStep(0, 2),
        WarmPoolStep(9 * HOUR_S - 300, 9),  # 180 rps / 20 per replica, from 08:55
        WarmPoolStep(11 * HOUR_S, 2),
    )
    day = MONDAY + timedelta(days=30)  # any later day
    assert min_replicas_at(plan, at(day, 8, 54, 59)) == 2
    assert min_replicas_at(plan, at(day, 8, 55)) == 9
    assert min_replicas_at(plan, at(day, 10, 59, 59)) == 9
    assert min_replicas_at(plan, at(day, 11)) == 2
    assert plan.hourly_replicas[9] == plan.hourly_replicas[10] == 9
    assert plan.hourly_rps[9] == pytest.approx(180.0)


def test_the_lead_follows_the_measured_cold_start():
    slow = schedule(history(7, daily_peak), CAPACITY, warm_pool=2, max_replicas=20, cold_start_s=1_800.4)

    assert min_replicas_at(slow, at(MONDAY, 8, 29, 58)) == 2
    assert min_replicas_at(slow, at(MONDAY, 8, 29, 59)) == 9  # 1800.4 s rounds up: a whole second early
    assert WarmPoolStep(9 * HOUR_S - 1_801, 9) in slow.steps


def test_a_peak_just_after_midnight_is_prepared_for_the_evening_before():
    def midnight(when: datetime) -> float:
        return 100.0 if when.hour == 0 else 0.0

    plan = schedule(history(3, midnight), CAPACITY, warm_pool=1, max_replicas=10, cold_start_s=600)

    assert plan.steps == (WarmPoolStep(0, 5), WarmPoolStep(HOUR_S, 1), WarmPoolStep(DAY_S - 600, 5))
    assert min_replicas_at(plan, at(MONDAY, 23, 50)) == 5


def test_a_flat_history_gives_a_flat_schedule():
    plan = schedule(history(7, lambda _: 50.0), CAPACITY, warm_pool=1, max_replicas=10, cold_start_s=COLD_START_S)

    assert plan.steps == (WarmPoolStep(0, 3),)  # 50 rps / 20 per replica
    assert set(plan.hourly()) == {3}


def test_the_schedule_stays_within_the_warm_pool_and_max_replicas():
    def extremes(when: datetime) -> float:
        return 10_000.0 if when.hour == 12 else 0.0

    plan = schedule(history(7, extremes), CAPACITY, warm_pool=3, max_replicas=8, cold_start_s=COLD_START_S)

    assert min(s.min_replicas for s in plan.steps) == 3
    assert max(s.min_replicas for s in plan.steps) == 8
    assert set(plan.hourly()) == {3, 8}


def test_under_a_day_of_history_the_schedule_is_the_warm_pool():
    plan = schedule(history(1, daily_peak)[:-1], CAPACITY, warm_pool=2, max_replicas=20, cold_start_s=COLD_START_S)

    assert plan.basis == "warm-pool"
    assert plan.steps == (WarmPoolStep(0, 2),)
    assert "under a day" in plan.reason
    assert min_replicas_at(plan, at(MONDAY, 10)) == 2
    empty = schedule([], CAPACITY, warm_pool=2, max_replicas=20, cold_start_s=COLD_START_S)
    assert empty.steps == (WarmPoolStep(0, 2),) and "no history" in empty.reason


def test_a_full_day_of_hourly_points_is_enough():
    plan = schedule(
        history(1, daily_peak, step_s=HOUR_S), CAPACITY, warm_pool=2, max_replicas=20, cold_start_s=COLD_START_S
    )

    assert plan.basis == "hour-of-day"
    assert min_replicas_at(plan, at(MONDAY, 9)) == 9


def weekday_peak(when: datetime) -> float:
    """The daily peak on weekdays; 10 rps all weekend."""
    return 10.0 if when.weekday() >= 5 else daily_peak(when)


def test_two_weeks_with_a_weekend_dip_are_planned_by_hour_of_the_week():
    plan = schedule(history(14, weekday_peak), CAPACITY, warm_pool=1, max_replicas=20, cold_start_s=COLD_START_S)

    assert plan.basis == "hour-of-week" and plan.period_s == WEEK_S
    friday, saturday = MONDAY + timedelta(days=4), MONDAY + timedelta(days=5)
    later = timedelta(weeks=3)
    assert min_replicas_at(plan, at(friday, 8, 55) + later) == 9
    assert min_replicas_at(plan, at(saturday, 9, 30) + later) == 1
    assert min_replicas_at(plan, at(saturday, 14) + later) == 1


def test_under_two_weeks_the_weekend_is_planned_like_a_weekday():
    plan = schedule(history(13, weekday_peak), CAPACITY, warm_pool=1, max_replicas=20, cold_start_s=COLD_START_S)

    assert plan.basis == "hour-of-day"
    assert min_replicas_at(plan, at(MONDAY + timedelta(days=5), 9, 30)) == 9


def test_one_burst_does_not_keep_replicas_warm_every_day():
    def burst(when: datetime) -> float:
        return 1_000.0 if when == at(MONDAY + timedelta(days=2), 15) else 20.0

    plan = schedule(history(7, burst), CAPACITY, warm_pool=1, max_replicas=100, cold_start_s=COLD_START_S)

    assert plan.steps == (WarmPoolStep(0, 1),)  # one 5-minute sample out of 84 at 15:00 is under the 95th percentile


def test_an_hour_without_samples_is_planned_as_the_busiest_hour():
    samples = [(t, r) for t, r in history(7, daily_peak) if t.hour != 3]

    plan = schedule(samples, CAPACITY, warm_pool=1, max_replicas=20, cold_start_s=COLD_START_S)

    assert min_replicas_at(plan, at(MONDAY, 3, 30)) == 9
    assert "without samples" in plan.reason


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"capacity_rps": 0.0}, "capacity_rps"),
        ({"warm_pool": -1}, "warm_pool"),
        ({"max_replicas": 1}, "max_replicas"),
        ({"cold_start_s": float("nan")}, "cold_start_s"),
        ({"utilization": 1.5}, "utilization"),
    ],
)
def test_arguments_out_of_range_are_refused_by_name(changes, field):
    arguments = {"capacity_rps": CAPACITY, "warm_pool": 2, "max_replicas": 10, "cold_start_s": 60.0} | changes
    capacity = arguments.pop("capacity_rps")

    with pytest.raises(ValueError, match=field):
        schedule(history(1, daily_peak), capacity, **arguments)


def test_naive_times_and_negative_rates_are_refused():
    with pytest.raises(ValueError, match=r"history\[0\].*naive"):
        schedule([(datetime(2024, 5, 6), 1.0)], CAPACITY, warm_pool=1, max_replicas=2, cold_start_s=0)
    with pytest.raises(ValueError, match=r"history\[1\]"):
        schedule([(MONDAY, 1.0), (MONDAY, -1.0)], CAPACITY, warm_pool=1, max_replicas=2, cold_start_s=0)
    plan = schedule(history(1, daily_peak), CAPACITY, warm_pool=1, max_replicas=20, cold_start_s=0)
    with pytest.raises(ValueError, match="naive"):
        min_replicas_at(plan, datetime(2024, 5, 6))


def pod(created: str, ready: str | None, *, restarts: int = 0) -> dict:
    """A Pod as the API serves it; ``ready`` None for one that is not Ready."""
    conditions = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": created}]
    if ready is not None:
        conditions.append({"type": "Ready", "status": "True", "lastTransitionTime": ready})
    else:
        conditions.append({"type": "Ready", "status": "False", "lastTransitionTime": created})
    return {
        "metadata": {"name": "p", "creationTimestamp": created},
        "status": {"conditions": conditions, "containerStatuses": [{"name": "server", "restartCount": restarts}]},
    }


def test_cold_start_is_a_high_quantile_of_created_to_ready():
    pods = [
        pod(f"2024-05-06T10:{m:02d}:00Z", f"2024-05-06T10:{m:02d}:{s:02d}Z") for m, s in enumerate(range(30, 60, 3))
    ]

    # 30, 33, ..., 57 s: the 90th percentile lies between 54 and 57
    assert cold_start_seconds(pods) == pytest.approx(54.3)
    assert cold_start_seconds(pods, quantile=1.0) == 57.0


def test_cold_start_counts_the_newest_pods():
    old = [pod(f"2024-05-01T10:0{i}:00Z", "2024-05-01T11:00:00Z") for i in range(5)]  # about an hour each
    new = [pod(f"2024-05-06T10:0{i}:00Z", f"2024-05-06T10:0{i}:40Z") for i in range(3)]

    assert cold_start_seconds(new + old, recent=3) == 40.0


def test_cold_start_leaves_out_pods_not_ready_restarted_or_without_times():
    pods = [
        pod("2024-05-06T10:00:00Z", "2024-05-06T10:01:00Z"),
        pod("2024-05-06T10:00:00Z", None),
        pod("2024-05-06T10:00:00Z", "2024-05-06T12:00:00Z", restarts=1),
        pod("2024-05-06T10:00:00Z", "2024-05-06T09:00:00Z"),  # clock skew
        {"metadata": {"name": "no-status"}},
    ]

    assert cold_start_seconds(pods) == 60.0
    assert cold_start_seconds(pods[1:]) is None
    assert cold_start_seconds([]) is None


def test_cold_start_reads_the_kubernetes_clients_datetimes():
    created = datetime(2024, 5, 6, 10, tzinfo=UTC)
    client_pod = {
        "metadata": {"creationTimestamp": created},
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": created + timedelta(seconds=90)}]
        },
    }

    assert cold_start_seconds([client_pod]) == 90.0
