"""Every refused input a node sees, counted by reason and by peer, with a log and an
event stream a flood cannot fill: one attack once wrote 24,576 log lines on a bootstrap.

Each reason logs (and emits its `refused` event) in bursts of `BURST`, then at most one
line per `EVERY_S` carrying how many were held back; the counts are always exact.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

from .clock import SYSTEM_CLOCK, Clock
from .ratelimit import PeerRateLimit

BURST = 50
EVERY_S = 10.0
MAX_PEERS_KEPT = 256  # peers counted one by one; the rest are summed under "other"


class Refusals:
    def __init__(self, log: logging.Logger, *, emit: Callable[..., None] | None = None,
                 on_count: Callable[[str], None] | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        """`emit`: where `refused` events go (a node's stdout); `on_count`: a metrics hook."""
        self.log, self.emit, self.on_count, self.clock = log, emit, on_count, clock
        self.by_reason: Counter[str] = Counter()
        self.by_peer: Counter[str] = Counter()
        self.other_peers = 0
        self._limit = PeerRateLimit(1.0 / EVERY_S, BURST)
        self._held_back: Counter[str] = Counter()

    def __call__(self, code: str, peer: str, detail: object) -> None:
        self.by_reason[code] += 1
        if peer in self.by_peer or len(self.by_peer) < MAX_PEERS_KEPT:
            self.by_peer[peer] += 1
        else:
            self.other_peers += 1
        if self.on_count:
            self.on_count(code)
        if not self._limit.allow(code, self.clock.elapsed_s()):
            self._held_back[code] += 1
            return
        held_back = self._held_back.pop(code, 0)
        more = f" ({held_back} more like it not logged)" if held_back else ""
        self.log.info("refused %s from %s: %s%s", code, peer, detail, more)
        if self.emit:
            self.emit("refused", code=code, peer=peer, **({"not_logged": held_back} if held_back else {}))

    def total(self) -> int:
        return sum(self.by_reason.values())

    def snapshot(self, top: int = 10) -> dict:
        """For status files and `--json`: counts by reason, and the peers refused most."""
        return {"total": self.total(), "by_reason": dict(sorted(self.by_reason.items())),
                "top_peers": dict(self.by_peer.most_common(top)),
                **({"other_peers": self.other_peers} if self.other_peers else {})}
