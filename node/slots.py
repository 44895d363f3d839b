"""The device's slots as the provider's jobs take them: when one frees, the waiting job
that node.admission.DeviceQueue says comes first (earliest deadline) gets it, so the
order jobs run in is the order admission promised them."""

from __future__ import annotations

import heapq
import itertools
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

import trio


class SlotGate:
    def __init__(self, slots: int, order_key: Callable[[str], tuple]):
        self._free = max(1, slots)
        self._order_key = order_key
        self._waiting: list[tuple[tuple, int, trio.Event]] = []  # a heap, by order key then arrival
        self._seq = itertools.count()

    @asynccontextmanager
    async def slot(self, job_id: str) -> AsyncIterator[None]:
        """Hold one slot for the block, once every job ahead of this one has had its
        turn. Cancelled while waiting: it leaves the line and nothing is held."""
        if self._free and not self._waiting:
            self._free -= 1
        else:
            turn = trio.Event()
            entry = (self._order_key(job_id), next(self._seq), turn)
            heapq.heappush(self._waiting, entry)
            try:
                await turn.wait()
            except BaseException:
                if turn.is_set():  # given the slot as it was cancelled: hand it on
                    self._hand_on()
                else:
                    self._waiting.remove(entry)
                    heapq.heapify(self._waiting)
                raise
        try:
            yield
        finally:
            self._hand_on()

    def _hand_on(self) -> None:
        if self._waiting:
            heapq.heappop(self._waiting)[2].set()  # the slot passes straight to the next job
        else:
            self._free += 1
