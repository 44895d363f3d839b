"""Offer discovery at 1,000, 10,000 and 100,000 providers: a model calibrated on this
machine. Prints JSON.

Measured here, with real code:
- `validate_ms`: CPU to open an offer (decode, Ed25519 check) and store it in a book;
- `gossip_ms`: CPU a py-libp2p node spends per gossip message it receives (a receiver
  process subscribed to a bench topic, offer-sized messages at a steady rate, its CPU
  time from /proc, idle CPU taken off), and `idle_cpu_pct` of that node;
- `sync_per_offer_ms` and `sync_fixed_ms`: wall time for a fresh node to sync offers of
  one model from a node serving offer sync from a book of `--book` offers (a few, and
  many, wanted), both in this process over real libp2p streams.

Modelled from those figures, per node, for the design we run today (`current`: every
provider re-gossips its whole offer every 20 s on one topic; providers publish to it
without subscribing, so the bootstraps and live buyers, subscribed, validate every
offer; a fresh buyer pages every offer of its model) and the one in docs/discovery.md
(`proposed`: one topic per model, subscribed to by the bootstraps that hold it (sharded),
offers republished only when they change, liveness told to the bootstraps instead of
gossiped, buyers pulling the changes among the best offers of their models, a fresh
buyer asking for the best 20). Costs are per role: provider, buyer, bootstrap. The assumptions (models in the market, models per provider, change rate,
gossip duplicates) are arguments and are printed with the result.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devnet.attack import now_ms  # noqa: E402
from node.gossip import OfferGossip  # noqa: E402
from node.offers import OfferBook  # noqa: E402
from node.p2p import open_p2p_node  # noqa: E402
from node.p2p.host import quiet_libp2p_logs  # noqa: E402
from protocol.messages import Device, ModelCapability, Offer, PowerProfile, sign_offer  # noqa: E402
from protocol.signing import SigningKey  # noqa: E402
from protocol.stream import OfferWant  # noqa: E402

BENCH_TOPIC = "idlemesh-bench/scale/1"
REFRESH_S = 20.0  # today: offer_ttl_s 60 / 3


def offer(i: int, models: list[str], *, ttl_ms: int = 60_000) -> bytes:
    """A realistic signed offer: 3 models, one address of its own (the book bounds offers
    per host)."""
    key = SigningKey(i.to_bytes(4, "big") + secrets.token_bytes(28))
    issued = now_ms()
    caps = tuple(ModelCapability(f"model-{m[:6]}", m, 100.0 + i % 50, "measured") for m in models)
    return sign_offer(key, Offer(
        provider=key.public_key, peer_id=key.peer_id, addrs=(f"/ip4/10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/tcp/4001",),
        device=Device("cuda", f"bench-gpu-{i}", 24_000), slots=2, models=caps,
        power=PowerProfile(30.0, 300.0, 135.0, "declared", "declared", "declared"), carbon_g_per_kwh=300.0,
        carbon_source="declared", price_per_s=0.0001, backlog_ms=0.0, issued_at_ms=issued,
        expires_at_ms=issued + ttl_ms))


def measure_validate(n: int) -> tuple[float, int]:
    models = [f"{m:064x}" for m in range(1, 4)]
    signed = [offer(i, models) for i in range(n)]
    book = OfferBook(max_offers=n + 1)
    started = time.process_time()
    for s in signed:
        book.add(s, now_ms=now_ms())
    return (time.process_time() - started) * 1000 / n, sum(len(s) for s in signed) // n


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def receiver(expected: int, idle_s: float) -> None:
    """The receiving node (run as a child process): prints its address, then its idle CPU
    and the CPU spent on `expected` messages."""
    quiet_libp2p_logs()
    async with open_p2p_node(secrets.token_bytes(32), ["/ip4/127.0.0.1/tcp/0"]) as node:
        async with node.subscribe(BENCH_TOPIC) as messages:
            print(json.dumps({"addr": f"{node.listen_addrs[0].split('/p2p/')[0]}/p2p/{node.peer_id}"}), flush=True)
            first = await messages.receive()  # the publisher's "start": idle begins
            idle_from = _cpu_s()
            await trio.sleep(idle_s)
            idle_cpu = _cpu_s() - idle_from
            print(json.dumps({"idle": True}), flush=True)
            started = _cpu_s()
            wall = time.perf_counter()
            got = 0
            while got < expected:
                await messages.receive()
                got += 1
            spent = _cpu_s() - started
            elapsed = time.perf_counter() - wall
            print(json.dumps({"first": len(first[1]), "got": got, "cpu_s": spent, "wall_s": elapsed,
                              "idle_cpu_s_per_s": idle_cpu / idle_s}), flush=True)


async def measure_gossip(messages: int, rate: float, size: int, idle_s: float) -> dict:
    proc = await trio.lowlevel.open_process([sys.executable, __file__, "--receiver", str(messages), str(idle_s)],
                                            stdout=subprocess.PIPE)
    lines = _lines(proc.stdout)
    addr = json.loads(await lines.__anext__())["addr"]
    async with open_p2p_node(secrets.token_bytes(32), ["/ip4/127.0.0.1/tcp/0"]) as pub:
        peer = addr.rsplit("/p2p/", 1)[-1]
        await pub.connect(peer, [addr])
        async with pub.subscribe(BENCH_TOPIC):
            await pub.wait_for_subscription(peer, BENCH_TOPIC, timeout_s=30)
            with trio.fail_after(30):
                while peer not in pub.mesh_peers(BENCH_TOPIC):
                    await trio.sleep(0.1)  # the mesh forms on a heartbeat (1 s)
            await pub.publish(BENCH_TOPIC, b"start")
            await lines.__anext__()  # its idle measurement is over
            for i in range(messages):
                await pub.publish(BENCH_TOPIC, i.to_bytes(4, "big") + os.urandom(size - 4))
                await trio.sleep(1 / rate)
            result = json.loads(await lines.__anext__())
    await proc.wait()
    idle = result["idle_cpu_s_per_s"]
    per_msg_ms = (result["cpu_s"] - idle * result["wall_s"]) * 1000 / result["got"]
    return {"gossip_ms": round(per_msg_ms, 3), "idle_cpu_pct": round(100 * idle, 3), "messages": result["got"],
            "rate_per_s": rate, "bytes": size}


async def _lines(stream):
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line


async def measure_sync(book_size: int, wanted: list[int]) -> dict:
    """A node serving offer sync from a book of `book_size` offers (filled directly: a
    real bootstrap keeps only offers their own providers pushed or gossiped); a fresh
    node, in the same process, syncs the offers of one model over real libp2p streams."""
    shas = {n: f"{n:064x}" for n in wanted}
    rest = f"{99:064x}"
    book = OfferBook(max_offers=book_size + 1)
    for i in range(book_size):
        book.add(offer(i, [sha for n, sha in shas.items() if i < n] + [rest]), now_ms=now_ms())
    result = {}
    async with open_p2p_node(secrets.token_bytes(32), ["/ip4/127.0.0.1/tcp/0"]) as server, trio.open_nursery() as nursery:
        await nursery.start(OfferGossip(server, book).run)
        addr = f"{server.listen_addrs[0].split('/p2p/')[0]}/p2p/{server.peer_id}"
        for n in sorted(wanted):
            async with open_p2p_node(secrets.token_bytes(32), ["/ip4/127.0.0.1/tcp/0"]) as reader:
                await reader.connect(server.peer_id, [addr])
                started = time.perf_counter()
                got = await OfferGossip(reader, OfferBook()).sync_with(server.peer_id, push_own=False,
                                                                       want=OfferWant(models=(shas[n],)))
                result[n] = {"offers": got, "ms": round((time.perf_counter() - started) * 1000, 1)}
        nursery.cancel_scope.cancel()
    (_, a), (_, b) = sorted(result.items())[0], sorted(result.items())[-1]
    per_offer = (b["ms"] - a["ms"]) / max(1, b["offers"] - a["offers"])
    return {"book": book_size, "syncs": result, "sync_per_offer_ms": round(per_offer, 3),
            "sync_fixed_ms": round(a["ms"] - per_offer * a["offers"], 1)}


def model(n: int, m: dict, a: argparse.Namespace) -> dict:
    """Per-node discovery cost and a fresh buyer's time to 20 candidates, both designs."""
    per_msg_ms = m["gossip_ms"] * (1 + a.duplicate_cost * (a.duplicates - 1)) + m["validate_ms"]
    per_synced_ms = m["sync_per_offer_ms"] + m["validate_ms"]
    serving = n * a.models_per_provider / a.models  # providers selling one model

    def cost(rate: float, ms_each: float, bytes_each: float) -> dict:
        return {"messages_per_s": round(rate, 2), "cpu_pct_of_core": round(rate * ms_each / 10, 3),
                "kbit_per_s": round(rate * bytes_each * 8 / 1000, 1)}

    # Today: providers publish their refresh and hear nothing; every subscribed node
    # (bootstrap, live buyer) hears and validates every provider's refresh; a fresh buyer
    # pages every offer of its model. Idle: the node's measured baseline on top.
    current_subscriber = cost(n / REFRESH_S, per_msg_ms, m["offer_bytes"] * a.duplicates)
    current_provider = cost(1 / REFRESH_S, m["gossip_ms"], m["offer_bytes"])
    for role in (current_subscriber, current_provider):
        role["idle_cpu_pct_of_core"] = round(role["cpu_pct_of_core"] + m["idle_cpu_pct"], 3)
    # docs/discovery.md: offers go on one topic per model, republished only on change;
    # bootstraps, sharded by model (each topic on `replicas` of them), are the only
    # subscribers. Providers subscribe to nothing. Buyers pull what changed in their
    # models every buyer_refresh_s (one round trip), and a fresh buyer asks for the best 20.
    change_rate = serving * a.change_per_provider_per_s  # offers changing per second, per model
    topics_per_bootstrap = a.models * a.replicas / a.bootstraps
    provider = cost(a.models_per_provider * a.change_per_provider_per_s + 1 / a.digest_s, m["gossip_ms"],
                    m["offer_bytes"])
    # A buyer keeps the best `buyer_keep` offers of each model (the bootstrap ranks by
    # energy per item, as the want asks) and pulls only their changes.
    buyer_offers_per_s = a.buyer_models * min(serving, a.buyer_keep) * a.change_per_provider_per_s
    buyer = cost(buyer_offers_per_s, per_synced_ms, m["offer_bytes"])
    buyer["fresh_buyer_20_candidates_ms"] = round(m["sync_fixed_ms"] + min(serving, 20) * m["sync_per_offer_ms"], 1)
    bootstrap = cost(topics_per_bootstrap * change_rate, per_msg_ms, m["offer_bytes"] * a.duplicates)
    return {
        "providers": n, "providers_per_model": round(serving),
        "current": {"provider": current_provider, "bootstrap_and_live_buyer": current_subscriber,
                    "fresh_buyer_20_candidates_ms": round(m["sync_fixed_ms"] + serving * m["sync_per_offer_ms"], 1),
                    "offer_staleness": f"up to {REFRESH_S:g} s (the next refresh) + delivery"},
        "proposed": {"provider": provider, "buyer": buyer, "bootstrap": bootstrap,
                     "offer_staleness": f"a change: delivery to the bootstraps, then up to {a.buyer_refresh_s:g} s "
                                        f"until a warm buyer's next pull; a provider gone: up to {a.digest_s:g} s"},
    }


async def main(a: argparse.Namespace) -> None:
    quiet_libp2p_logs()
    validate_ms, offer_bytes = measure_validate(a.validate_offers)
    print(f"validate: {validate_ms:.3f} ms per offer ({offer_bytes} B)", file=sys.stderr, flush=True)
    gossip = await measure_gossip(a.messages, a.rate, offer_bytes, a.idle_s)
    print(f"gossip: {gossip}", file=sys.stderr, flush=True)
    sync = await measure_sync(a.book, [20, a.book // 2])
    print(f"sync: {sync}", file=sys.stderr, flush=True)
    measured = {"validate_ms": round(validate_ms, 3), "offer_bytes": offer_bytes, **gossip, **sync}
    print(json.dumps({
        "bench": "scale", "measured": measured,
        "assumptions": {"models_in_market": a.models, "models_per_provider": a.models_per_provider,
                        "offer_changes_per_provider_per_s": a.change_per_provider_per_s,
                        "gossip_copies_per_message": a.duplicates,
                        "duplicate_cost_vs_first_copy": a.duplicate_cost, "bootstraps": a.bootstraps,
                        "liveness_s": a.digest_s, "bootstrap_shards": a.bootstraps, "replicas_per_topic": a.replicas,
                        "models_per_buyer": a.buyer_models, "buyer_refresh_s": a.buyer_refresh_s,
                        "buyer_keeps_best": a.buyer_keep},
        # 100: the size of the real devnet (`bench/soak.py --providers 100`) that checks it.
        "modelled": [model(n, measured, a) for n in (100, 1_000, 10_000, 100_000)],
        "targets": {"cpu_pct_of_core": 2.0, "fresh_buyer_20_candidates_ms": 1000.0},
    }, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--receiver":
        trio.run(receiver, int(sys.argv[2]), float(sys.argv[3]))
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--validate-offers", type=int, default=2000)
    ap.add_argument("--messages", type=int, default=400)
    ap.add_argument("--rate", type=float, default=40.0, help="gossip messages per second to the receiver")
    ap.add_argument("--idle-s", type=float, default=5.0)
    ap.add_argument("--book", type=int, default=2000, help="offers the bootstrap holds for the sync measurement")
    ap.add_argument("--models", type=int, default=50, help="models bought and sold in the market")
    ap.add_argument("--models-per-provider", type=int, default=3)
    ap.add_argument("--change-per-provider-per-s", type=float, default=1 / 120,
                    help="offer changes a provider publishes per second (its queue moving, availability)")
    ap.add_argument("--duplicates", type=float, default=3.0, help="copies of each gossip message a node receives")
    ap.add_argument("--duplicate-cost", type=float, default=0.3, help="CPU of a duplicate copy vs the first")
    ap.add_argument("--bootstraps", type=int, default=16, help="bootstraps sharing the model topics")
    ap.add_argument("--replicas", type=int, default=2, help="bootstraps holding each model topic")
    ap.add_argument("--digest-s", type=float, default=30.0,
                    help="liveness: how often a provider tells its bootstraps it is alive (no gossip)")
    ap.add_argument("--buyer-models", type=int, default=2, help="models a buyer buys")
    ap.add_argument("--buyer-refresh-s", type=float, default=10.0, help="how often a warm buyer pulls changes")
    ap.add_argument("--buyer-keep", type=int, default=100, help="best offers per model a warm buyer follows")
    trio.run(main, ap.parse_args())
