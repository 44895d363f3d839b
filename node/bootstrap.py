"""A bootstrap node: a well-known peer that relays gossip and answers offer sync.

Several bootstraps can serve one network: each keeps a connection to the others it is
given (`--bootstrap`), so gossip crosses between them and losing one loses nothing.
"""

from __future__ import annotations

import logging
import signal
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

log = logging.getLogger("idlemesh.bootstrap")


async def run_bootstrap(home: Path, listen: list[str], peers: list[str] = (), metrics: str | None = None) -> int:
    """Serve until SIGINT or SIGTERM; returns the signal's number."""
    seed = load_or_create_seed(home)
    check_listen_addrs(listen)
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            await nursery.start(lambda task_status: serve_bootstrap(seed, listen, peers, metrics,
                                                                    task_status=task_status))
            async for signum in signals:
                break
        nursery.cancel_scope.cancel()
    emit("stopped", role="bootstrap")
    return signum


async def serve_bootstrap(seed: bytes, listen: list[str], peers: list[str] = (), metrics: str | None = None, *,
                          open_network: OpenNetwork = open_p2p_node, clock: Clock = SYSTEM_CLOCK,
                          task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Relay gossip and answer offer sync until cancelled; started with the network."""
    async with open_network(seed, listen) as p2p:
        book = OfferBook()
        gossip = OfferGossip(p2p, book, on_new_offer=lambda pid: emit("offer", provider=pid), clock=clock)
        counters = NodeMetrics("bootstrap")

        def refused(code: str, peer: str, detail: object) -> None:
            counters.refused.labels(code).inc()
            emit("refused", code=code, peer=peer)

        gossip.on_bad_input = refused
        if metrics:
            counters.offers_held.set_function(lambda: book.count(now_ms=clock.now_ms()))
            counters.connected_peers.set_function(lambda: len(p2p.connected_peers()))
            counters.serve(metrics)

        async def exchange_books(peer_id: str) -> None:
            try:
                await gossip.sync_with(peer_id)
            except (DecodeError, StreamClosed, trio.TooSlowError) as exc:
                log.info("offer sync with bootstrap %s failed: %s", peer_id, exc)

        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: gossip.run(relay_digests=True, task_status=task_status))
            p2p.keep_connected(list(peers), on_connect=exchange_books)
            for addr, why in (await p2p.first_dials(list(peers))).items():
                log.warning("cannot reach bootstrap %s (%s); retrying", addr, why)
            emit("ready", role="bootstrap", peer_id=p2p.peer_id, addrs=p2p.listen_addrs)
            task_status.started(p2p)
            await trio.sleep_forever()
