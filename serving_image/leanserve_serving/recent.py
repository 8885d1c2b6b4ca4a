"""A recent duration: the moving average both serving processes steer by (the batcher's service time, the
model server's run time), so they weigh the past alike."""

from __future__ import annotations


class RecentMean:
    """A moving average of measured seconds: the first measurement as it is, then each one weighing a fifth;
    0 until the first (nothing measured yet)."""

    def __init__(self) -> None:
        self.value = 0.0

    def add(self, seconds: float) -> None:
        self.value = seconds if self.value == 0 else 0.8 * self.value + 0.2 * seconds
