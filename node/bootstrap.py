"""A bootstrap node: a well-known peer that relays gossip and answers offer sync."""

from __future__ import annotations

import signal
from pathlib import Path

import trio

from .gossip import OfferGossip, emit
from .identity import load_or_create_seed
from .offers import OfferBook
from .p2p import open_p2p_node


async def run_bootstrap(home: Path, listen: list[str]) -> None:
    seed = load_or_create_seed(home)
    async with open_p2p_node(seed, listen) as p2p:
        gossip = OfferGossip(p2p, OfferBook(), on_new_offer=lambda pid: emit("offer", provider=pid))
        gossip.on_bad_input = lambda code, peer, detail: emit("refused", code=code, peer=peer)
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: gossip.run(relay_digests=True, task_status=task_status))
            emit("ready", role="bootstrap", peer_id=p2p.peer_id, addrs=p2p.listen_addrs)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()
    emit("stopped", role="bootstrap")
