"""A provider's queue as buyers see it, and whether a job can still be taken (pure: no
clock, no I/O; times are milliseconds the caller passes in).

The provider daemon and the devnet simulator (devnet/simulate.py) both run this code, so
the simulator's providers queue, refuse and advertise load exactly as the real ones do.

The queue is earliest deadline first over `slots`: when a slot frees, the waiting job
whose deadline comes first starts on it (jobs without a deadline are due
NO_DEADLINE_DUE_MS after they were admitted, so a stream of urgent jobs delays them but
never starves them; equal deadlines go in admission order). A job is admitted only if
every admitted job still meets its deadline with it in the queue: a late-comer with a
short deadline may go ahead of a job with a long one, never make it late. Why not first
in, first out: when many buyers send at once, a FIFO queue fills with whichever jobs
came first and refuses the urgent ones it could have fitted ahead of them, which then
miss elsewhere (devnet/scenarios/many-buyers.toml: 140 misses with FIFO, see the
README's figures for EDF).

What a job is expected to take is its items at the rate the offer advertises; a job that
runs longer than expected holds its slot until it ends (it counts as ending now, never in
the past).
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


# What "no deadline" means for the order jobs start in: due this long after admission.
NO_DEADLINE_DUE_MS = 60_000.0


@dataclass
class _Queued:
    expected_ms: float
    due_ms: float            # when it must end: its deadline, or NO_DEADLINE_DUE_MS after admission
    binding: bool            # whether due_ms is the buyer's deadline (checked) or only an order
    seq: int                 # admission order, for equal deadlines
    started_at_ms: float | None = None


def expected_ms(items: int, items_per_s: float) -> float:
    """A job's compute time at an advertised rate (items per second per slot)."""
    return 1000.0 * items / max(items_per_s, 1e-9)


class DeviceQueue:
    def __init__(self, slots: int):
        self.slots = max(1, slots)
        self._jobs: dict[str, _Queued] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._jobs)

    def order_key(self, job_id: str) -> tuple[float, int]:
        """Sort waiting jobs by this: the first starts when a slot frees."""
        q = self._jobs.get(job_id)
        return (q.due_ms, q.seq) if q is not None else (float("inf"), 0)

    def _schedule(self, now_ms: float, jobs: list[_Queued]) -> tuple[list[float], list[tuple[_Queued, float]]]:
        """Run `jobs` in EDF order on the slots as the running ones leave them: when
        each slot frees (a heap) and when each waiting job ends."""
        running = [q for q in jobs if q.started_at_ms is not None]
        free = [max(now_ms, q.started_at_ms + q.expected_ms) for q in running]
        free += [now_ms] * max(0, self.slots - len(free))
        heapq.heapify(free)
        ends = []
        for q in sorted((q for q in jobs if q.started_at_ms is None), key=lambda q: (q.due_ms, q.seq)):
            end = heapq.heappop(free) + q.expected_ms
            heapq.heappush(free, end)
            ends.append((q, end))
        return free, ends

    def _slot_free_at(self, now_ms: float) -> list[float]:
        """When each slot frees, once every admitted job has run (a heap)."""
        return self._schedule(now_ms, list(self._jobs.values()))[0]

    def wait_ms(self, now_ms: float) -> float:
        """How long a job admitted now would wait for a slot: what the offer advertises
        as `backlog_ms`."""
        return max(0.0, min(self._slot_free_at(now_ms)) - now_ms)

    def admit(self, job_id: str, expected_ms: float, now_ms: float, *, deadline_ms: float | None = None) -> str:
        """Take the job (returns "") or say why not. `deadline_ms`: the time the buyer
        still allows, counted from now; a job that cannot end within it, or that would
        make an admitted job late, is refused at once, while the buyer can still place
        it elsewhere."""
        binding = deadline_ms is not None
        new = _Queued(expected_ms, now_ms + (deadline_ms if binding else NO_DEADLINE_DUE_MS), binding, self._seq)
        _, ends = self._schedule(now_ms, [*self._jobs.values(), new])
        for q, end in ends:
            if q.binding and end > q.due_ms + 1e-6:
                if q is new:
                    wait = end - expected_ms - now_ms
                    return (f"cannot finish within the deadline: {wait:.0f} ms of queue + {expected_ms:.0f} ms "
                            f"of compute > {deadline_ms:.0f} ms left")
                return (f"cannot finish within the deadline without making an admitted job late: "
                        f"{expected_ms:.0f} ms of compute, {deadline_ms:.0f} ms left")
        self._seq += 1
        self._jobs[job_id] = new
        return ""

    def start(self, job_id: str, now_ms: float) -> None:
        if job_id in self._jobs:
            self._jobs[job_id].started_at_ms = now_ms

    def finish(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)


class ByteBudget:
    """Bytes of job requests and model uploads held at once. A frame that does
    not fit is refused, unless nothing is held: then even one bigger than the budget
    (a maximal model) gets in, alone. Held bytes never exceed max(capacity, one frame)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.held = 0
        self.peak = 0

    def take(self, n: int) -> bool:
        if self.held and self.held + n > self.capacity:
            return False
        self.held += n
        self.peak = max(self.peak, self.held)
        return True

    def give(self, n: int) -> None:
        self.held -= n


def worth_republishing(published_backlog_ms: float, backlog_ms: float) -> bool:
    """Whether the queue moved enough since the offer was signed to sign it again."""
    change = abs(backlog_ms - published_backlog_ms)
    return change >= REPUBLISH_MIN_CHANGE_MS and change >= REPUBLISH_MIN_CHANGE_SHARE * published_backlog_ms
