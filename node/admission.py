"""A provider's queue as buyers see it, and whether a job can still be taken (pure: no
clock, no I/O; times are milliseconds the caller passes in).

The provider daemon and the devnet simulator (devnet/simulate.py) both run this code, so
the simulator's providers queue, refuse and advertise load exactly as the real ones do.

The queue is first in, first out over `slots`: a job starts on the slot that frees
first. What a job is expected to take is its items at the rate the offer advertises;
a job that runs longer than expected holds its slot until it ends (it counts as ending
now, never in the past).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

# An offer follows its queue, but not faster than this: gossip takes one offer a second
# per origin (node/gossip.py), and the periodic refresh needs its share of that.
REPUBLISH_MIN_INTERVAL_S = 2.0
# A change in backlog below both of these is not worth a message.
REPUBLISH_MIN_CHANGE_MS = 50.0
REPUBLISH_MIN_CHANGE_SHARE = 0.2


@dataclass
class _Queued:
    expected_ms: float
    started_at_ms: float | None = None


def expected_ms(items: int, items_per_s: float) -> float:
    """A job's compute time at an advertised rate (items per second per slot)."""
    return 1000.0 * items / max(items_per_s, 1e-9)


class DeviceQueue:
    def __init__(self, slots: int):
        self.slots = max(1, slots)
        self._jobs: dict[str, _Queued] = {}  # in admission order: the order jobs start

    def __len__(self) -> int:
        return len(self._jobs)

    def _slot_free_at(self, now_ms: float) -> list[float]:
        """When each slot frees, once every admitted job has run (a heap)."""
        running = [q for q in self._jobs.values() if q.started_at_ms is not None]
        free = [max(now_ms, q.started_at_ms + q.expected_ms) for q in running]
        free += [now_ms] * max(0, self.slots - len(free))
        heapq.heapify(free)
        for q in self._jobs.values():
            if q.started_at_ms is None:
                heapq.heappush(free, heapq.heappop(free) + q.expected_ms)
        return free

    def wait_ms(self, now_ms: float) -> float:
        """How long a job admitted now would wait for a slot: what the offer advertises
        as `backlog_ms`."""
        return max(0.0, min(self._slot_free_at(now_ms)) - now_ms)

    def admit(self, job_id: str, expected_ms: float, now_ms: float, *, deadline_ms: float | None = None) -> str:
        """Take the job (returns "") or say why not. `deadline_ms`: the time the buyer
        still allows, counted from now; a job whose wait and compute exceed it is
        refused at once, while the buyer can still place it elsewhere."""
        wait = self.wait_ms(now_ms)
        if deadline_ms is not None and wait + expected_ms > deadline_ms:
            return (f"cannot finish within the deadline: {wait:.0f} ms of queue + {expected_ms:.0f} ms of compute "
                    f"> {deadline_ms:.0f} ms left")
        self._jobs[job_id] = _Queued(expected_ms)
        return ""

    def start(self, job_id: str, now_ms: float) -> None:
        if job_id in self._jobs:
            self._jobs[job_id].started_at_ms = now_ms

    def finish(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)


def worth_republishing(published_backlog_ms: float, backlog_ms: float) -> bool:
    """Whether the queue moved enough since the offer was signed to sign it again."""
    change = abs(backlog_ms - published_backlog_ms)
    return change >= REPUBLISH_MIN_CHANGE_MS and change >= REPUBLISH_MIN_CHANGE_SHARE * published_backlog_ms
