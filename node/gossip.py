"""Offer gossip and offer sync, shared by every role (bootstrap, provider, buyer)."""

from __future__ import annotations

import json
import logging
import os
from typing import Callable

import trio

from protocol.errors import DecodeError
from protocol.messages import Offer
from protocol.stream import (MAX_SYNC_DIGESTS, MAX_SYNC_OFFERS, SYNC_PAGE_BYTES, OfferSync, OfferWant, decode_message,
                             encode_message)
from protocol.topics import OFFER_SYNC_PROTOCOL, OFFERS_TOPIC, REPUTATION_TOPIC

from .clock import SYSTEM_CLOCK, Clock
from .net import Network, Stream, StreamClosed
from .offers import OfferBook
from .ratelimit import PeerRateLimit
from .refusals import Refusals
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
MAX_SYNC_PAGES = 64               # pages one sync stream may ask for (64 x 1 MiB: more than any book holds)
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
        # Where refusals go: the node's own counter (provider, bootstrap), else ours.
        self.on_bad_input: Callable[[str, str, object], None] | None = None
        self.refusals = Refusals(log, clock=clock)
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
        (self.on_bad_input or self.refusals)(code, peer, detail)

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

    def _take(self, signed: bytes, via: str, *, peer: str = "", held_ms: int = 0,
              opened: Offer | None = None) -> Offer | None:
        """Store the offer if it is valid, someone else's, newer, and ranks high enough
        for a full book; return it if valid. `held_ms`: how long the peer we asked has
        held this provider; `opened`: the offer already verified from these bytes."""
        now = self.clock.now_ms()
        offer = opened or self.book.open(signed, now_ms=now)
        if offer is None or offer.peer_id == self.p2p.peer_id or not self.book.is_newer(offer):
            return offer
        was_held = self.book.holds(offer.peer_id, now_ms=now)
        if not self.book.store(offer, signed, now_ms=now, held_since_ms=now - min(held_ms, now)):
            self._bad("book-full", peer or offer.peer_id, f"offer of {offer.peer_id} ranks under every offer "
                      "in a full book")
            return offer
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

    async def run(self, *, relay_digests: bool = False, hear_offers: bool = True,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Follow the topics. `hear_offers` False (providers): publish our offer, never
        take anyone else's. A node not subscribed to the offer topic still publishes to
        it (gossipsub sends to subscribed peers, the bootstraps, by fanout), and is in no
        mesh: it receives, validates and forwards none of the other providers' offers,
        which are most of a network's gossip and of no use to a seller."""
        async with trio.open_nursery() as nursery:
            async with self.p2p.subscribe(REPUTATION_TOPIC) as digests:
                nursery.start_soon(self._drain, digests)
                if relay_digests:
                    nursery.start_soon(self._relay_digests)
                if not hear_offers:
                    task_status.started()
                    await trio.sleep_forever()
                async with self.p2p.subscribe(OFFERS_TOPIC) as messages:
                    task_status.started()
                    async for origin, data in messages:
                        self._take(data, "gossip", peer=origin)
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

    def _digests(self) -> tuple[bytes, ...]:
        digest = self.own_digest()
        digests = ([digest] if digest else []) + self.reputation.current(now_ms=self.clock.now_ms())
        return tuple(dict.fromkeys(digests))[:MAX_SYNC_DIGESTS]

    def _page(self, want: OfferWant | None, after: str, first: bool) -> OfferSync:
        now = self.clock.now_ms()
        entries, more = self.book.page(want, after=after, max_bytes=SYNC_PAGE_BYTES, max_count=MAX_SYNC_OFFERS,
                                       now_ms=now, exclude=self.p2p.peer_id)
        offers = [e.signed for e in entries]
        held = [now - e.first_seen_ms for e in entries]
        own = self.own_offer() if first else None
        if own:  # our own offer, which never sits in our book, leads the first page
            offers.insert(0, own)
            held.insert(0, 0)
        return OfferSync(tuple(offers), self._digests() if first else (), more=more, held_ms=tuple(held))

    def _take_digests(self, digests: tuple[bytes, ...], peer: str) -> None:
        for signed in digests:
            before = self.reputation.rejected
            self.reputation.add(signed, now_ms=self.clock.now_ms())  # an older digest is no fault ...
            if self.reputation.rejected > before:          # ... a forged or expired one is
                self._bad("bad-digest", peer, "reputation digest in sync does not verify or has expired")

    async def _serve_sync(self, stream: Stream) -> None:
        """Take the peer's own offer from its push, then answer what it wants, a page
        at a time, as long as it asks for the next one."""
        peer = stream.remote_peer_id
        if not self._sync_limit.allow(peer, self.clock.elapsed_s()):
            self._bad("rate-limited", peer, "offer sync over the per-peer rate")
            return
        try:
            payload = await stream.receive(max_bytes=SYNC_FRAME_BYTES, timeout_s=SYNC_TIMEOUT_S)
            message = decode_message(payload, max_bytes=SYNC_FRAME_BYTES, expect=("offers",))
            self._take_pushed(message, peer)
            want, after = message.want, ""
            for pages in range(1, MAX_SYNC_PAGES + 1):
                answer = self._page(want, after, first=pages == 1)
                await stream.send(encode_message(answer))
                if not answer.more or pages == MAX_SYNC_PAGES:
                    break
                payload = await stream.receive(max_bytes=SYNC_FRAME_BYTES, timeout_s=SYNC_TIMEOUT_S)
                after = decode_message(payload, max_bytes=SYNC_FRAME_BYTES, expect=("offers",)).after
            self.synced_by[peer] = self.clock.now_ms()
            while len(self.synced_by) > SYNCED_BY_KEPT:
                del self.synced_by[next(iter(self.synced_by))]
        except DecodeError as exc:
            self._bad("bad-sync", peer, exc)
        except (StreamClosed, trio.TooSlowError) as exc:
            # A peer that left mid-sync (it stopped, its link dropped, it had pages
            # enough) sent nothing bad: logged, not counted as refused input.
            log.debug("offer sync from %s ended early: %s", peer, exc)

    def _take_pushed(self, message: OfferSync, peer: str) -> None:
        """From a push we take the pusher's own offer only: anyone can collect thousands
        of validly signed offers of fresh keys, and a provider must be a live peer
        somewhere to enter a book (it publishes, or it syncs, itself)."""
        others = 0
        for signed in message.offers:
            offer = self.book.open(signed, now_ms=self.clock.now_ms())
            if offer is None:
                self._bad("bad-offer", peer, "offer in sync does not verify, has expired, or cannot be dialed")
            elif offer.peer_id != peer:
                others += 1
            else:
                self._take(signed, "sync", peer=peer, opened=offer)  # verified once, just above
        if others:
            self._bad("relayed-offer", peer, f"pushed {others} offers of other peers in sync (only its own is taken)")
        self._take_digests(message.digests, peer)

    async def sync_with(self, peer_id: str, addrs: list[str] | tuple[str, ...] = (), *, push_own: bool = True,
                        want: OfferWant | None = None) -> int:
        """Push our own offer to `peer_id` and take the offers it holds that match `want`,
        every page. Returns how many offers came back. Without `push_own` the answer shows
        what gossip alone brought that peer of ours."""
        own = self.own_offer() if push_own else None
        opened: list[Offer | None] = []
        count = 0
        async with self.p2p.open_stream(peer_id, addrs, OFFER_SYNC_PROTOCOL) as stream:
            request = OfferSync((own,) if own else (), self._digests(), want=want)
            for pages in range(1, MAX_SYNC_PAGES + 1):
                await stream.send(encode_message(request))
                payload = await stream.receive(max_bytes=SYNC_FRAME_BYTES, timeout_s=SYNC_TIMEOUT_S)
                message = decode_message(payload, max_bytes=SYNC_FRAME_BYTES, expect=("offers",))
                held = message.held_ms or (0,) * len(message.offers)
                taken = [self._take(signed, "sync", peer=peer_id, held_ms=h) for signed, h in zip(message.offers, held)]
                opened += taken
                count += len(message.offers)
                if pages == 1:
                    self._take_digests(message.digests, peer_id)
                # The cursor is the last book entry of the page (the answerer's own offer,
                # which leads the first page, is not in its book).
                page = [o for o in taken if o is not None and o.peer_id != peer_id]
                if not message.more or not page:
                    break
                request = OfferSync((), want=want, after=max(o.peer_id for o in page))
        self.last_sync = {"peer": peer_id, "at_ms": self.clock.now_ms(), "offers": [o for o in opened if o is not None]}
        return count


def bootstrap_peer_id(addr: str) -> str:
    """The peer id in a bootstrap address; ValueError with a one-line reason otherwise."""
    from .p2p import check_peer_addr

    return check_peer_addr(addr)
