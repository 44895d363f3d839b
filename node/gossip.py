"""Offer gossip and offer sync, shared by every role (bootstrap, provider, buyer)."""

from __future__ import annotations

import json
import logging
import os
from typing import Callable

import trio

from protocol.errors import DecodeError
from protocol.messages import Offer, open_offer
from protocol.stream import MAX_SYNC_DIGESTS, MAX_SYNC_OFFERS, OfferSync, decode_message, encode_message
from protocol.topics import OFFER_SYNC_PROTOCOL, OFFERS_TOPIC, REPUTATION_TOPIC

from .clock import SYSTEM_CLOCK, Clock
from .net import Network, Stream, StreamClosed
from .offers import OfferBook
from .ratelimit import PeerRateLimit
from .reputation import ReputationBook

log = logging.getLogger("idlemesh.gossip")
SYNC_FRAME_BYTES = 8 * 1024 * 1024
SYNC_TIMEOUT_S = 10.0
# Honest nodes publish an offer every 10-30 s and sync on (re)connect: these leave an
# order of magnitude of headroom and still cap what one peer can make us verify.
GOSSIP_PER_ORIGIN = (1.0, 10.0)   # offers per second sustained, burst (the shortest lifetime refreshes every 2 s)
SYNC_PER_PEER = (1.0, 10.0)       # offer-sync streams per second sustained, burst
DIGEST_PER_ORIGIN = (0.05, 3.0)   # reputation digests: one per 20 s sustained
DIGEST_RELAY_S = 30.0             # a relaying node publishes at most one digest this often
SYNCED_BY_KEPT = 16               # the latest peers that synced with us, for status
# Set by the devnet launcher: nodes print an event per offer arrival (bench/soak.py).
TRACE_OFFERS = os.environ.get("IDLEMESH_TRACE_OFFERS") == "1"


def emit(event: str, **fields) -> None:
    """One JSON line on stdout: how parent processes (devnet) learn what a node did."""
    print(json.dumps({"event": event, **fields}), flush=True)


class OfferGossip:
    """Keeps `book` current from gossip and sync; answers sync requests with it."""

    def __init__(self, p2p: Network, book: OfferBook, *, own_offer: Callable[[], bytes | None] = lambda: None,
                 on_new_offer: Callable[[str], None] | None = None, clock: Clock = SYSTEM_CLOCK):
        self.p2p = p2p
        self.clock = clock
        self.book = book
        self.own_offer = own_offer
        self.on_new_offer = on_new_offer
        self.bad_inputs = 0
        self.on_bad_input: Callable[[str, str, object], None] | None = None
        self._gossip_limit = PeerRateLimit(*GOSSIP_PER_ORIGIN)
        self._digest_limit = PeerRateLimit(*DIGEST_PER_ORIGIN)
        self.reputation = ReputationBook()
        self.own_digest: Callable[[], bytes | None] = lambda: None
        self._relayed: set[bytes] = set()
        self.last_sync: dict | None = None  # the peer, time and valid offers (ours too) of our last sync_with
        self.synced_by: dict[str, int] = {}  # peers that took our book by sync -> when (ms)
        p2p.set_validator(REPUTATION_TOPIC, self._validate_digest)
        self._sync_limit = PeerRateLimit(*SYNC_PER_PEER)
        p2p.set_validator(OFFERS_TOPIC, self._validate)
        p2p.set_stream_handler(OFFER_SYNC_PROTOCOL, self._serve_sync)

    def _bad(self, code: str, peer: str, detail: object) -> None:
        self.bad_inputs += 1
        log.info("%s from %s: %s", code, peer, detail)
        if self.on_bad_input:
            self.on_bad_input(code, peer, detail)

    def _validate(self, origin: str, data: bytes) -> bool:
        # Runs before forwarding: floods, forged, expired, oversized, duplicate and stale
        # offers stop here (a duplicate is never newer than the one the book holds).
        if origin == self.p2p.peer_id:
            # The library validates our own publishes too, and our own offer never sits
            # in our book: refusing it here once stopped every offer from being gossiped.
            return data == self.own_offer()
        if not self._gossip_limit.allow(origin, self.clock.elapsed_s()):
            self._bad("rate-limited", origin, "offer gossip over the per-origin rate")
            return False
        offer = self.book.open(data, now_ms=self.clock.now_ms())
        if offer is None:
            return False
        if offer.peer_id != origin:
            # A relayed copy of someone else's offer: only its provider publishes it.
            self._bad("relayed-offer", origin, f"published an offer of {offer.peer_id}")
            return False
        return self.book.is_newer(offer)

    def _take(self, signed: bytes, via: str) -> Offer | None:
        """Store the offer if it is valid, someone else's and newer; return it if valid."""
        now = self.clock.now_ms()
        offer = self.book.open(signed, now_ms=now)
        if offer is None or offer.peer_id == self.p2p.peer_id or not self.book.is_newer(offer):
            return offer
        was_held = self.book.holds(offer.peer_id, now_ms=now)
        self.book.store(offer, signed)
        if TRACE_OFFERS:
            # Devnet and bench only: when each offer arrived, to measure gossip delivery.
            emit("offer-heard", provider=offer.peer_id, issued_at_ms=offer.issued_at_ms,
                 latency_ms=self.clock.now_ms() - offer.issued_at_ms, via=via)
        if self.on_new_offer and not was_held:  # a provider (back) in our book
            self.on_new_offer(offer.peer_id)
        return offer

    def _validate_digest(self, origin: str, data: bytes) -> bool:
        if not self._digest_limit.allow(origin, self.clock.elapsed_s()):
            self._bad("rate-limited", origin, "reputation gossip over the per-origin rate")
            return False
        return self.reputation.add(data, now_ms=self.clock.now_ms())

    async def run(self, *, relay_digests: bool = False, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            async with self.p2p.subscribe(OFFERS_TOPIC) as messages, \
                    self.p2p.subscribe(REPUTATION_TOPIC) as digests:
                nursery.start_soon(self._drain, digests)
                if relay_digests:
                    nursery.start_soon(self._relay_digests)
                task_status.started()
                async for _origin, data in messages:
                    self._take(data, "gossip")
                nursery.cancel_scope.cancel()

    async def _drain(self, digests) -> None:
        async for _origin, _data in digests:
            pass  # the validator already stored each valid digest

    async def _relay_digests(self) -> None:
        """Bootstrap nodes pass on digests that buyers pushed through sync, one at a time,
        at most every DIGEST_RELAY_S: gossip stays within its budget."""
        while True:
            await trio.sleep(DIGEST_RELAY_S)
            current = self.reputation.current(now_ms=self.clock.now_ms())
            self._relayed &= set(current)  # forget expired digests: a bootstrap runs for months
            fresh = [d for d in current if d not in self._relayed]
            if fresh:
                self._relayed.add(fresh[0])
                try:
                    await self.p2p.publish(REPUTATION_TOPIC, fresh[0])
                except (StreamClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    log.info("digest relay failed: %s", exc)

    def _outgoing(self, *, push_own: bool = True) -> OfferSync:
        own = self.own_offer() if push_own else None
        others = [e.signed for e in self.book.current(now_ms=self.clock.now_ms()) if e.offer.peer_id != self.p2p.peer_id]
        digest = self.own_digest()
        digests = ([digest] if digest else []) + self.reputation.current(now_ms=self.clock.now_ms())
        return OfferSync(tuple(([own] if own else []) + others)[:MAX_SYNC_OFFERS],
                         tuple(dict.fromkeys(digests))[:MAX_SYNC_DIGESTS])

    def _take_digests(self, digests: tuple[bytes, ...], peer: str) -> None:
        for signed in digests:
            before = self.reputation.rejected
            self.reputation.add(signed, now_ms=self.clock.now_ms())  # an older digest is no fault ...
            if self.reputation.rejected > before:          # ... a forged or expired one is
                self._bad("bad-digest", peer, "reputation digest in sync does not verify or has expired")

    async def _serve_sync(self, stream: Stream) -> None:
        if not self._sync_limit.allow(stream.remote_peer_id, self.clock.elapsed_s()):
            self._bad("rate-limited", stream.remote_peer_id, "offer sync over the per-peer rate")
            return
        try:
            payload = await stream.receive(max_bytes=SYNC_FRAME_BYTES, timeout_s=SYNC_TIMEOUT_S)
            message = decode_message(payload, max_bytes=SYNC_FRAME_BYTES, expect=("offers",))
        except DecodeError as exc:
            self._bad("bad-sync", stream.remote_peer_id, exc)
            return
        except (StreamClosed, trio.TooSlowError) as exc:
            # A peer that left mid-sync (it stopped, its link dropped) sent nothing bad:
            # logged, not counted as refused input.
            log.info("offer sync from %s ended early: %s", stream.remote_peer_id, exc)
            return
        for signed in message.offers:
            try:
                open_offer(signed, now_ms=self.clock.now_ms())  # a stale but genuine offer is no fault
            except DecodeError as exc:
                self._bad("bad-offer", stream.remote_peer_id, f"offer in sync: {exc}")
                continue
            self._take(signed, "sync")
        self._take_digests(message.digests, stream.remote_peer_id)
        try:
            await stream.send(encode_message(self._outgoing()))
            self.synced_by[stream.remote_peer_id] = self.clock.now_ms()
            while len(self.synced_by) > SYNCED_BY_KEPT:
                del self.synced_by[next(iter(self.synced_by))]
        except (StreamClosed, trio.TooSlowError):
            pass

    async def sync_with(self, peer_id: str, addrs: list[str] | tuple[str, ...] = (), *, push_own: bool = True) -> int:
        """Push our offers to `peer_id` and take its book. Returns how many offers came back.
        Without `push_own` the answer shows what gossip alone brought that peer of ours."""
        async with self.p2p.open_stream(peer_id, addrs, OFFER_SYNC_PROTOCOL) as stream:
            await stream.send(encode_message(self._outgoing(push_own=push_own)))
            payload = await stream.receive(max_bytes=SYNC_FRAME_BYTES, timeout_s=SYNC_TIMEOUT_S)
        message = decode_message(payload, max_bytes=SYNC_FRAME_BYTES, expect=("offers",))
        opened = [self._take(signed, "sync") for signed in message.offers]
        self.last_sync = {"peer": peer_id, "at_ms": self.clock.now_ms(), "offers": [o for o in opened if o is not None]}
        self._take_digests(message.digests, peer_id)
        return len(message.offers)


def bootstrap_peer_id(addr: str) -> str:
    """The peer id in a bootstrap address; ValueError with a one-line reason otherwise."""
    from .p2p import check_peer_addr

    return check_peer_addr(addr)
