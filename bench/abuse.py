"""The abuse figures of issue 17 against a live devnet; prints JSON.

- sync: one peer pushes `--pushed` Sybil offers (a push carries the pusher's own offer
  only), `--connected` fresh identities each connect and sync their own irresistible
  offer, then a fresh buyer's sync for its model: offers and bytes it takes, pages, and
  whether its submit settles on honest providers;
- rss: for each `--rss NxM`, N concurrent requests of M MiB against a fresh provider with
  its default request budget: how many were served or answered busy, and the
  provider's resting and peak resident memory (VmHWM).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devnet.attack import (SQUEEZENET_ROW_BYTES, connected_sybil, irresistible_offer,  # noqa: E402
                           job_without_ack, push)
from devnet.launcher import open_devnet, peak_rss_mb  # noqa: E402
from node.buyer import Buyer, SubmitSpec  # noqa: E402
from node.calibrate import reference_model_path  # noqa: E402
from node.config import ProviderConfig  # noqa: E402
from node.gossip import OfferGossip, bootstrap_peer_id  # noqa: E402
from node.offers import OfferBook  # noqa: E402
from node.p2p import open_p2p_node  # noqa: E402
from protocol.job import Delivered  # noqa: E402
from protocol.signing import SigningKey  # noqa: E402
from protocol.stream import OfferWant  # noqa: E402

MODEL = reference_model_path("squeezenet")
MODEL_SHA = hashlib.sha256(MODEL.read_bytes()).hexdigest()


async def wait_for_status(path: Path, *, after_s: float) -> dict:
    """The bootstrap's next status file (it writes one every few seconds)."""
    while not path.exists() or path.stat().st_mtime < after_s:
        await trio.sleep(0.5)
    return json.loads(path.read_text())


async def sync_figures(root: Path, pushed: int, connected: int) -> dict:
    async with open_devnet(2, root=root) as net:
        boot_id, boot_addr = bootstrap_peer_id(net.bootstrap_addr), net.bootstrap_addr
        honest = {p.ready["peer_id"] for p in net.providers}
        started = time.perf_counter()
        async with open_p2p_node(secrets.token_bytes(32), ["/ip4/127.0.0.1/tcp/0"]) as attacker:
            keys = [SigningKey(secrets.token_bytes(32)) for _ in range(pushed)]
            flood = [irresistible_offer(k, (f"/ip4/127.0.0.1/tcp/1/p2p/{k.peer_id}",), MODEL_SHA) for k in keys]
            for i in range(0, len(flood), 4000):
                await push(attacker, boot_id, boot_addr, flood[i:i + 4000])
        # Eight at a time, so that all of them are in the book within one offer lifetime.
        limit = trio.CapacityLimiter(8)

        async def one_sybil() -> None:
            async with limit:
                await connected_sybil(boot_id, boot_addr, MODEL_SHA)

        async with trio.open_nursery() as nursery:
            for _ in range(connected):
                nursery.start_soon(one_sybil)
        attack_s = time.perf_counter() - started
        async with open_p2p_node(secrets.token_bytes(32), ["/ip4/127.0.0.1/tcp/0"]) as reader:
            book = OfferBook()
            started = time.perf_counter()
            count = await OfferGossip(reader, book).sync_with(boot_id, [boot_addr], want=OfferWant(models=(MODEL_SHA,)))
            sync_ms = (time.perf_counter() - started) * 1000
        entries = book.current(now_ms=int(time.time() * 1000))
        status = await wait_for_status(root / "bootstrap" / "status.json", after_s=time.time())
        x = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)
        outcomes, summary = await Buyer(SubmitSpec(model_path=MODEL, inputs={"data_0": x}, count=4,
                                                   bootstrap=[boot_addr], home=root / "buyer",
                                                   out_dir=root / "out")).run()
        return {
            "pushed_sybil_offers": pushed, "connected_sybils": connected, "attack_s": round(attack_s, 1),
            "buyer_sync_offers": count, "buyer_sync_bytes": sum(len(e.signed) for e in entries),
            "buyer_sync_ms": round(sync_ms, 1), "honest_in_sync": len(honest & {e.offer.peer_id for e in entries}),
            "submit_settled": sum(o.state == "settled" for o in outcomes), "submit_jobs": len(outcomes),
            "submit_on_honest": sum(o.provider in honest for o in outcomes),
            "bootstrap_vm_hwm_mb": round(peak_rss_mb(net.bootstrap.process.pid), 1),
            "bootstrap_status": {k: status.get(k) for k in ("offers_held", "offer_bytes", "offers_evicted",
                                                            "offers_refused_full", "refused")},
        }


async def rss_figures(root: Path, requests: int, request_mib: int) -> dict:
    rows = request_mib * 1024 * 1024 // SQUEEZENET_ROW_BYTES
    async with open_devnet(1, root=root) as net:
        provider = net.providers[0].ready
        pid = net.providers[0].process.pid
        resting = round(peak_rss_mb(pid), 1)
        results = []

        async def one(i: int) -> None:
            seed = secrets.token_bytes(32)
            async with open_p2p_node(seed, ["/ip4/127.0.0.1/tcp/0"]) as p2p:
                event, _ = await job_without_ack(p2p, provider["peer_id"], provider["addrs"], SigningKey(seed),
                                                 MODEL, rows=rows, seed=i)
                results.append("served" if isinstance(event, Delivered) else event.code)
                if not isinstance(event, Delivered):
                    print(f"request {i}: {event.code}: {event.message}", file=sys.stderr)

        async with trio.open_nursery() as nursery:
            for i in range(requests):
                nursery.start_soon(one, i)
        budget_mb = ProviderConfig(home=root).request_budget_mb
        peak = round(peak_rss_mb(pid), 1)
        return {"requests": requests, "request_mib": request_mib, "served": results.count("served"),
                "busy": results.count("busy"), "other": [r for r in results if r not in ("served", "busy")],
                "request_budget_mb": budget_mb, "provider_resting_rss_mb": resting, "provider_peak_rss_mb": peak,
                "peak_over_resting_mb": round(peak - resting, 1),
                "documented_ceiling_mb": round(resting + 4 * budget_mb, 1)}


async def main(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="idlemesh-abuse-"))
    out = {"bench": "abuse"}
    if args.connected or args.pushed:
        out["sync"] = await sync_figures(root / "sync", args.pushed, args.connected)
    for spec in args.rss:
        requests, request_mib = (int(v) for v in spec.split("x"))
        out[f"rss_{requests}x{request_mib}mib"] = await rss_figures(root / f"rss-{spec}", requests, request_mib)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushed", type=int, default=2000)
    parser.add_argument("--connected", type=int, default=300)
    parser.add_argument("--rss", nargs="*", default=["4x76", "16x12"],
                        help="concurrent requests x MiB each, one fresh provider per entry (a tensor is capped "
                             "at 64 MiB, so 76 MiB requests are read and decoded, then refused as bad-request)")
    trio.run(main, parser.parse_args())
