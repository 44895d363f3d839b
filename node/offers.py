"""The offer book a node keeps: the newest valid signed offer per provider, within bounds.

A stranger can mint any number of validly signed offers, so the book has a bound on its
count, its bytes, and the offers that name one host. When it is full, a newcomer takes
the place of the entry that ranks lowest, or is refused if it ranks lower still. The
rank favours offers this node can use (a buyer: its model), then providers with good
receipts in our own ledger, then the ones we have held longest: a flood of fresh keys
can fill the free room but never push out a provider that was here before it.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from protocol.errors import DecodeError
from protocol.messages import Offer, open_offer
from protocol.stream import OfferWant

log = logging.getLogger("idlemesh.offers")

DEFAULT_MAX_OFFERS = 4096
DEFAULT_MAX_BYTES = 32 * 1024 * 1024     # 4,096 typical offers take ~4 MB; max-size ones 64 KB each
DEFAULT_MAX_PER_HOST = 256               # offers whose first address names one host


@dataclass
class BookEntry:
    offer: Offer
    signed: bytes
    first_seen_ms: int = 0  # since when we have held offers of this provider without a gap


def offer_host(offer: Offer) -> str:
    """The host an offer's first address names ("" if none): the per-host bound's key."""
    parts = offer.addrs[0].split("/") if offer.addrs else []
    return parts[2] if len(parts) > 2 else ""


def matches(offer: Offer, want: OfferWant | None) -> bool:
    """Whether `offer` is one a syncing peer asked for. An offer that runs models it does
    not list (open models) matches any model."""
    if want is None:
        return True
    if want.models and offer.open_models_items_per_s is None and \
            not any(offer.model(sha) is not None for sha in want.models):
        return False
    if want.arches and offer.device.arch not in want.arches:
        return False
    if want.providers and offer.peer_id not in want.providers:
        return False
    return want.max_price_per_s is None or offer.price_per_s <= want.max_price_per_s


class OfferBook:
    def __init__(self, *, max_offers: int = DEFAULT_MAX_OFFERS, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_per_host: int = DEFAULT_MAX_PER_HOST, wanted: Callable[[Offer], bool] = lambda offer: True,
                 standing: Callable[[str], int] = lambda peer_id: 0) -> None:
        """`wanted`: offers this node can use; `standing`: a provider's good receipts in
        our own ledger. Both rank entries when the book is full."""
        self._entries: dict[str, BookEntry] = {}
        self.max_offers, self.max_bytes, self.max_per_host = max_offers, max_bytes, max_per_host
        self.wanted, self.standing = wanted, standing
        self.bytes = 0
        self._per_host: Counter[str] = Counter()
        self.rejected = 0
        self.evicted = 0
        self.refused_full = 0

    def open(self, signed: bytes, *, now_ms: int) -> Offer | None:
        """The offer if its signature, validity window and addresses check out, else None
        (counted): an offer a buyer could not dial never enters a book."""
        from .p2p import check_offer_addr

        try:
            offer = open_offer(signed, now_ms=now_ms)
            for addr in offer.addrs:
                check_offer_addr(addr, offer.peer_id)
            return offer
        except (DecodeError, ValueError) as exc:
            self.rejected += 1
            log.debug("dropped offer: %s", exc)
            return None

    def is_newer(self, offer: Offer) -> bool:
        held = self._entries.get(offer.peer_id)
        return held is None or held.offer.issued_at_ms < offer.issued_at_ms

    def check(self, signed: bytes, *, now_ms: int) -> Offer | None:
        """The offer if it is valid and newer than what we hold, else None."""
        offer = self.open(signed, now_ms=now_ms)
        return offer if offer is not None and self.is_newer(offer) else None

    def add(self, signed: bytes, *, now_ms: int) -> Offer | None:
        """Store a valid, newer offer; returns it, or None if it was dropped, stale, or
        ranked too low for a full book."""
        offer = self.check(signed, now_ms=now_ms)
        if offer is not None and self.store(offer, signed, now_ms=now_ms):
            return offer
        return None

    def _rank(self, entry: BookEntry) -> tuple:
        # Higher is better; ties go to the provider held longest, then to peer id order
        # (so a replay of the same flood evicts the same entries).
        return (self.wanted(entry.offer), self.standing(entry.offer.peer_id), -entry.first_seen_ms,
                entry.offer.peer_id)

    def store(self, offer: Offer, signed: bytes, *, now_ms: int, held_since_ms: int | None = None) -> bool:
        """Keep an offer that `open` returned and `is_newer` accepted; False (counted) if
        the book is full of entries that rank higher. `held_since_ms`: since when the
        peer we asked has held this provider (a sync answer's hint), if earlier than us."""
        held = self._entries.get(offer.peer_id)
        since = held.first_seen_ms if held is not None and held.offer.expires_at_ms > now_ms else now_ms
        entry = BookEntry(offer, signed, min(since, held_since_ms if held_since_ms is not None else now_ms))
        if held is not None:
            self._remove(offer.peer_id)
        if len(self._entries) >= self.max_offers or self.bytes + len(signed) > self.max_bytes:
            self._expire(now_ms)
        self._entries[offer.peer_id] = entry
        self.bytes += len(signed)
        host = offer_host(offer)
        self._per_host[host] += 1
        if self._per_host[host] > self.max_per_host:
            same_host = [e for e in self._entries.values() if offer_host(e.offer) == host]
            while len(same_host) > self.max_per_host:
                worst = min(same_host, key=self._rank)
                same_host.remove(worst)
                self._evict(worst, entry)
        while len(self._entries) > self.max_offers or self.bytes > self.max_bytes:
            self._evict(min(self._entries.values(), key=self._rank), entry)
        return offer.peer_id in self._entries

    def _evict(self, worst: BookEntry, newcomer: BookEntry) -> None:
        self._remove(worst.offer.peer_id)
        if worst is newcomer:
            self.refused_full += 1
        else:
            self.evicted += 1

    def _remove(self, peer_id: str) -> None:
        entry = self._entries.pop(peer_id)
        self.bytes -= len(entry.signed)
        host = offer_host(entry.offer)
        self._per_host[host] -= 1
        if not self._per_host[host]:
            del self._per_host[host]

    def _expire(self, now_ms: int) -> None:
        for pid in [p for p, e in self._entries.items() if e.offer.expires_at_ms <= now_ms]:
            self._remove(pid)

    def count(self, *, now_ms: int) -> int:
        """Unexpired offers, without pruning (safe to call from a metrics thread)."""
        return sum(1 for e in list(self._entries.values()) if e.offer.expires_at_ms > now_ms)

    def holds(self, peer_id: str, *, now_ms: int) -> bool:
        """Whether an unexpired offer of `peer_id` is in the book."""
        entry = self._entries.get(peer_id)
        return entry is not None and entry.offer.expires_at_ms > now_ms

    def entry(self, peer_id: str) -> BookEntry | None:
        return self._entries.get(peer_id)

    def current(self, *, now_ms: int) -> list[BookEntry]:
        self._expire(now_ms)
        return sorted(self._entries.values(), key=lambda e: e.offer.peer_id)

    def page(self, want: OfferWant | None, *, after: str, max_bytes: int, max_count: int, now_ms: int,
             exclude: str = "") -> tuple[list[BookEntry], bool]:
        """Unexpired entries matching `want` with peer id after `after`, in peer-id order,
        up to `max_bytes` of signed offers (at least one) and `max_count` of them; and
        whether more follow."""
        out: list[BookEntry] = []
        size = 0
        for entry in self.current(now_ms=now_ms):
            if entry.offer.peer_id <= after or entry.offer.peer_id == exclude or not matches(entry.offer, want):
                continue
            if out and (size + len(entry.signed) > max_bytes or len(out) >= max_count):
                return out, True
            out.append(entry)
            size += len(entry.signed)
        return out, False
