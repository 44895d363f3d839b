"""The offer book a node keeps: the newest valid signed offer per provider."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from protocol.errors import DecodeError
from protocol.messages import Offer, open_offer

log = logging.getLogger("idlemesh.offers")


@dataclass
class BookEntry:
    offer: Offer
    signed: bytes


class OfferBook:
    def __init__(self) -> None:
        self._entries: dict[str, BookEntry] = {}
        self.rejected = 0

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
            log.info("dropped offer: %s", exc)
            return None

    def is_newer(self, offer: Offer) -> bool:
        held = self._entries.get(offer.peer_id)
        return held is None or held.offer.issued_at_ms < offer.issued_at_ms

    def check(self, signed: bytes, *, now_ms: int) -> Offer | None:
        """The offer if it is valid and newer than what we hold, else None."""
        offer = self.open(signed, now_ms=now_ms)
        return offer if offer is not None and self.is_newer(offer) else None

    def add(self, signed: bytes, *, now_ms: int) -> Offer | None:
        """Store a valid, newer offer; returns it, or None if it was dropped or stale."""
        offer = self.check(signed, now_ms=now_ms)
        if offer is not None:
            self.store(offer, signed)
        return offer

    def store(self, offer: Offer, signed: bytes) -> None:
        """Keep an offer that `open` returned and `is_newer` accepted."""
        self._entries[offer.peer_id] = BookEntry(offer, signed)

    def count(self, *, now_ms: int) -> int:
        """Unexpired offers, without pruning (safe to call from a metrics thread)."""
        return sum(1 for e in list(self._entries.values()) if e.offer.expires_at_ms > now_ms)

    def holds(self, peer_id: str, *, now_ms: int) -> bool:
        """Whether an unexpired offer of `peer_id` is in the book."""
        entry = self._entries.get(peer_id)
        return entry is not None and entry.offer.expires_at_ms > now_ms

    def current(self, *, now_ms: int) -> list[BookEntry]:
        for pid in [p for p, e in self._entries.items() if e.offer.expires_at_ms <= now_ms]:
            del self._entries[pid]
        return sorted(self._entries.values(), key=lambda e: e.offer.peer_id)
