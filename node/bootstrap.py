"""A bootstrap node: a well-known peer that relays gossip and answers offer sync.

Several bootstraps can serve one network: each keeps a connection to the others it is
given (`--bootstrap`), so gossip crosses between them and losing one loses nothing.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import trio

from protocol.errors import DecodeError

from .clock import SYSTEM_CLOCK, Clock
from .gossip import OfferGossip, emit
from .metrics import NodeMetrics
from .identity import load_or_create_seed
from .offers import OfferBook
from .net import OpenNetwork, StreamClosed
from .p2p import check_listen_addrs, open_p2p_node
from .output import write_json_atomic
from .reachability import expand_wildcards, interface_ips
from .refusals import Refusals

log = logging.getLogger("idlemesh.bootstrap")
STATUS_NAME = "status.json"
STATUS_EVERY_S = 5.0



async def run_bootstrap(home: Path, listen: list[str], peers: list[str] = (), metrics: str | None = None,
                        announce: list[str] = ()) -> int:
    """Serve until SIGINT or SIGTERM; returns the signal's number."""
    seed = load_or_create_seed(home)
    check_listen_addrs(listen)
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            node = await nursery.start(lambda task_status: serve_bootstrap(seed, listen, peers, metrics, home=home,
                                                                           announce=announce,
                                                                           task_status=task_status))
            async for signum in signals:
                break
        nursery.cancel_scope.cancel()
    emit("stopped", role="bootstrap", refused=node.refusals.snapshot())
    return signum


@dataclass
class BootstrapNode:
    """What a running bootstrap holds, for its status file and its callers."""

    p2p: object
    book: OfferBook
    gossip: OfferGossip
    refusals: Refusals
    announce: list[str] = field(default_factory=list)

    def dial_addrs(self) -> list[str]:
        """Where others dial us, each with our peer id: the announced addresses, else the
        listen addresses with a wildcard replaced by this machine's own addresses."""
        return [f"{a}/p2p/{self.p2p.peer_id}" for a in self.announce] or \
            expand_wildcards(self.p2p.listen_addrs, interface_ips())

    def status(self, now_ms: int) -> dict:
        return {"role": "bootstrap", "peer_id": self.p2p.peer_id, "addrs": self.dial_addrs(),
                "listen": self.p2p.listen_addrs,
                "offers_held": self.book.count(now_ms=now_ms), "offer_bytes": self.book.bytes,
                "offers_evicted": self.book.evicted, "offers_refused_full": self.book.refused_full,
                "connected_peers": len(self.p2p.connected_peers()), "digests_held": len(self.gossip.reputation.digests),
                "refused": self.refusals.snapshot(), "written_at_ms": now_ms,
                "relay": self.p2p.reach_status().get("relay_serving")}


async def serve_bootstrap(seed: bytes, listen: list[str], peers: list[str] = (), metrics: str | None = None, *,
                          home: Path | None = None, open_network: OpenNetwork = open_p2p_node,
                          clock: Clock = SYSTEM_CLOCK, announce: list[str] = (),
                          task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Relay gossip and answer offer sync until cancelled; started with the network.
    With a `home`, HOME/status.json says what it holds and refused, every few seconds."""
    async with open_network(seed, listen) as p2p:
        p2p.serve_relay()  # providers behind NAT reserve a slot here and are reached through it
        book = OfferBook()
        gossip = OfferGossip(p2p, book, on_new_offer=lambda pid: emit("offer", provider=pid), clock=clock)
        counters = NodeMetrics("bootstrap")
        refusals = Refusals(log, emit=emit, on_count=lambda code: counters.refused.labels(code).inc(), clock=clock)
        gossip.on_bad_input = refusals
        node = BootstrapNode(p2p, book, gossip, refusals, list(announce))
        if metrics:
            counters.offers_held.set_function(lambda: book.count(now_ms=clock.now_ms()))
            counters.connected_peers.set_function(lambda: len(p2p.connected_peers()))
            counters.serve(metrics)

        async def exchange_books(peer_id: str) -> None:
            try:
                await gossip.sync_with(peer_id)
            except (DecodeError, StreamClosed, trio.TooSlowError) as exc:
                log.info("offer sync with bootstrap %s failed: %s", peer_id, exc)

        async def write_status() -> None:
            while True:
                write_json_atomic(home / STATUS_NAME, node.status(clock.now_ms()))
                await trio.sleep(STATUS_EVERY_S)

        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: gossip.run(relay_digests=True, task_status=task_status))
            p2p.keep_connected(list(peers), on_connect=exchange_books)
            for addr, why in (await p2p.first_dials(list(peers))).items():
                log.warning("cannot reach bootstrap %s (%s); retrying", addr, why)
            if home is not None:
                nursery.start_soon(write_status)
            emit("ready", role="bootstrap", peer_id=p2p.peer_id, addrs=node.dial_addrs())
            task_status.started(node)
            await trio.sleep_forever()
