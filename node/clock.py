"""The one clock of a node, passed in: wall time for what goes on the wire, trio's clock
for durations.

Signed messages carry wall time (epoch milliseconds) because other machines compare
it with theirs; every duration and timeout runs on trio's clock, which
`trio.testing.MockClock` controls. A node takes a `Clock` and reads both through it, so
a test under MockClock moves the wire's time too (`TrioClock`).
"""

from __future__ import annotations

import time

import trio


class Clock:
    """Wall time for messages, trio time for durations."""

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def elapsed_s(self) -> float:
        """A monotonic reading in seconds, for measuring durations."""
        return trio.current_time()


class TrioClock(Clock):
    """Wall time derived from trio's clock, from a fixed epoch: under MockClock, time on
    the wire moves only when the test's clock does."""

    def __init__(self, epoch_ms: int = 1_700_000_000_000):
        self.epoch_ms = epoch_ms

    def now_ms(self) -> int:
        return self.epoch_ms + int(trio.current_time() * 1000)


SYSTEM_CLOCK = Clock()
