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

from .gossip import OfferGossip, emit, now_ms
from .metrics import NodeMetrics
from .identity import load_or_create_seed
from .offers import OfferBook
from .p2p import StreamClosed, check_listen_addrs, open_p2p_node

log = logging.getLogger("idlemesh.bootstrap")


async def run_bootstrap(home: Path, listen: list[str], peers: list[str] = (), metrics: str | None = None) -> int:
    """Serve until SIGINT or SIGTERM; returns the signal's number."""
    seed = load_or_create_seed(home)
    check_listen_addrs(listen)
    async with open_p2p_node(seed, listen) as p2p:
        book = OfferBook()
        gossip = OfferGossip(p2p, book, on_new_offer=lambda pid: emit("offer", provider=pid))
        counters = NodeMetrics("bootstrap")

        def refused(code: str, peer: str, detail: object) -> None:
            counters.refused.labels(code).inc()
            emit("refused", code=code, peer=peer)

        gossip.on_bad_input = refused
        if metrics:
            counters.offers_held.set_function(lambda: book.count(now_ms=now_ms()))
            counters.connected_peers.set_function(lambda: len(p2p.host.get_network().connections))
            counters.serve(metrics)

        async def exchange_books(peer_id: str) -> None:
            try:
                await gossip.sync_with(peer_id)
            except (DecodeError, StreamClosed, trio.TooSlowError) as exc:
                log.info("offer sync with bootstrap %s failed: %s", peer_id, exc)

        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: gossip.run(relay_digests=True, task_status=task_status))
            p2p.keep_connected(list(peers), on_connect=exchange_books)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                for addr, why in (await p2p.first_dials(list(peers))).items():
                    log.warning("cannot reach bootstrap %s (%s); retrying", addr, why)
                emit("ready", role="bootstrap", peer_id=p2p.peer_id, addrs=p2p.listen_addrs)
                async for signum in signals:
                    break
            nursery.cancel_scope.cancel()
    emit("stopped", role="bootstrap")
    return signum
