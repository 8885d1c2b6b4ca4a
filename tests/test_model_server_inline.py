"""When the model server runs ``session.run`` on its event loop rather than in its worker thread."""

from __future__ import annotations

import pytest

from leanserve_serving.model_server import INLINE_RUN_S, runs_inline
from leanserve_serving.recent import RecentMean


@pytest.mark.parametrize(
    ("recent_s", "concurrency", "inline"),
    [
        (0.0, 1, False),  # not timed yet: the first run goes to the thread
        (0.00002, 1, True),  # the tiny MLP's 20 us
        (INLINE_RUN_S, 1, True),
        (INLINE_RUN_S * 1.01, 1, False),  # longer runs leave the loop free for reads and probes
        (0.00002, 2, False),  # several runs in flight need the threads, on several cores
    ],
)
def test_only_short_timed_runs_with_one_in_flight_run_inline(recent_s: float, concurrency: int, inline: bool) -> None:
    assert runs_inline(recent_s, concurrency) is inline


def test_the_recent_run_time_follows_recent_runs() -> None:
    timer = RecentMean()
    assert timer.value == 0
    timer.add(0.0002)
    assert timer.value == pytest.approx(0.0002)
    for _ in range(30):  # the model turned slow (a larger batch): the loop hands runs back to the thread
        timer.add(0.01)
    assert not runs_inline(timer.value, 1)
    assert timer.value == pytest.approx(0.01, rel=0.01)
