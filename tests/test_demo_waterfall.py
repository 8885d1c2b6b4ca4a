"""The demo's waterfall as text and its lever shares: what its last JSON line says each lever saved."""

from __future__ import annotations

import pytest

from leanserve.demo import lever_shares, waterfall_lines
from leanserve.planner.plan import SavingsStep

STEPS = [
    SavingsStep("baseline", 1.0, ""),
    SavingsStep("quantization", 0.6, ""),
    SavingsStep("batching", 0.6, ""),
    SavingsStep("caching", 0.65, ""),
    SavingsStep("autoscaling", 0.4, ""),
    SavingsStep("right-sizing", 0.25, ""),
    SavingsStep("plan", 0.25, ""),
]


def test_each_levers_share_is_its_saving_over_the_baseline_and_they_add_up_to_the_cut():
    shares = lever_shares(STEPS)
    assert shares == pytest.approx(
        {"quantization": 0.4, "batching": 0.0, "caching": -0.05, "autoscaling": 0.25, "right-sizing": 0.15}
    )
    assert sum(shares.values()) == pytest.approx(1 - 0.25 / 1.0)


def test_the_text_waterfall_says_each_saving_and_the_whole_cut():
    lines = waterfall_lines(STEPS)
    assert len(lines) == len(STEPS)
    assert "-0.4000 $ (-40%)" in lines[1]
    assert "+0.0500 $ (+5%)" in lines[3]  # a lever that cost more says so
    assert "4.0x cheaper" in lines[-1]
