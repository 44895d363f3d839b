"""Per-peer token buckets: how many messages or streams a peer may start, and how fast.
The clock is passed in, so the logic is testable without waiting."""

from __future__ import annotations

from collections import OrderedDict


class PeerRateLimit:
    def __init__(self, rate_per_s: float, burst: float, *, max_peers: int = 10_000):
        self.rate = rate_per_s
        self.burst = burst
        self.max_peers = max_peers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # peer -> (tokens, at_s)

    def allow(self, peer: str, now_s: float) -> bool:
        tokens, at = self._buckets.pop(peer, (self.burst, now_s))
        tokens = min(self.burst, tokens + (now_s - at) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[peer] = (tokens - 1.0 if allowed else tokens, now_s)
        if len(self._buckets) > self.max_peers:  # forget the longest-quiet peer (a full bucket anyway)
            self._buckets.popitem(last=False)
        return allowed
