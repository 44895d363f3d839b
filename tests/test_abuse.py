"""A network that holds under abuse, against real processes: Sybil offers, max-size
offers, a broken address and forged reputation leave honest buyers working; a provider
bounds the request bytes it holds; a buyer that never acks is cut off after its credit."""

from __future__ import annotations

import hashlib
import secrets

import numpy as np
import trio

from devnet.attack import (SQUEEZENET_ROW_BYTES, connected_sybil, forged_digest, irresistible_offer,
                           job_without_ack, now_ms, public_key_of, push, squeezenet_job, until_result)
from devnet.launcher import open_devnet, peak_rss_mb
from node.buyer import Buyer, SubmitSpec
from node.client import Client
from node.calibrate import reference_model_path
from node.gossip import OfferGossip, bootstrap_peer_id
from node.offers import OfferBook
from node.p2p import open_p2p_node
from protocol.job import Delivered, Refused
from protocol.signing import SigningKey
from protocol.stream import OfferWant, SettleAcks, decode_message, encode_message
from protocol.topics import JOB_PROTOCOL, SETTLE_PROTOCOL

MODEL = reference_model_path("squeezenet")
MODEL_SHA = hashlib.sha256(MODEL.read_bytes()).hexdigest()


async def test_sybil_and_max_size_offers_a_broken_address_and_forged_digests_leave_honest_buyers_working(tmp_path):
    async with open_devnet(2, root=tmp_path / "net") as net:
        boot_id, boot_addr = bootstrap_peer_id(net.bootstrap_addr), net.bootstrap_addr
        honest = {p.ready["peer_id"] for p in net.providers}
        honest_keys = [public_key_of(pid) for pid in honest]
        async with open_p2p_node(secrets.token_bytes(32), ["/ip4/127.0.0.1/tcp/0"]) as attacker:
            # 2,000 Sybil offers and 200 max-size ones, pushed in sync by one peer, with 100
            # forged digests: a push carries the pusher's own offer only.
            sybils = [SigningKey(secrets.token_bytes(32)) for _ in range(2200)]
            flood = [irresistible_offer(k, (f"/ip4/127.0.0.1/tcp/1/p2p/{k.peer_id}",), MODEL_SHA,
                                        pad_models=0 if i < 2000 else 250) for i, k in enumerate(sybils)]
            assert all(len(signed) > 60_000 for signed in flood[2000:])
            await push(attacker, boot_id, boot_addr, flood[:2000], [forged_digest(honest_keys)
                                                                   for _ in range(100)])
            for chunk in (flood[2000:2100], flood[2100:]):
                await push(attacker, boot_id, boot_addr, chunk)
        # Sybils that do connect, each syncing its own irresistible offer (half of them
        # max-size), then vanish: their offers stay in the book until they expire.
        for i in range(40):
            await connected_sybil(boot_id, boot_addr, MODEL_SHA, pad_models=250 if i % 2 else 0)
        # A provider whose offer names an address no buyer can parse.
        await connected_sybil(boot_id, boot_addr, MODEL_SHA, addrs=("/ip4/not-an-address/tcp/1",))

        # A fresh reader's sync still works: paged, it brings every offer it asked for.
        async with open_p2p_node(secrets.token_bytes(32), ["/ip4/127.0.0.1/tcp/0"]) as reader:
            book = OfferBook()
            count = await OfferGossip(reader, book).sync_with(boot_id, [boot_addr],
                                                             want=OfferWant(models=(MODEL_SHA,)))
        held = {e.offer.peer_id for e in book.current(now_ms=now_ms())}
        assert honest <= held and len(held) == count == 42  # 2 honest + 40 connected Sybils

        # The honest buyer places, fails over from the vanished Sybils, and settles.
        x = np.random.default_rng(5).random((1, 3, 224, 224), dtype=np.float32)
        spec = SubmitSpec(model_path=MODEL, inputs={"data_0": x}, count=6, bootstrap=[boot_addr],
                          home=tmp_path / "buyer", out_dir=tmp_path / "out")
        outcomes, summary = await Buyer(spec).run()
        assert [o.state for o in outcomes] == ["settled"] * 6, [o.error for o in outcomes]
        assert {o.provider for o in outcomes} <= honest
        assert summary["excluded_by_reputation"] == {}  # 100 forged digests moved nothing
        # The bootstrap counted what it refused (and did not log each one).
        codes = set()
        with trio.fail_after(30):
            async for event in net.bootstrap.events:
                if event.get("event") == "refused":
                    codes.add(event["code"])
                if {"relayed-offer", "bad-offer"} <= codes:
                    break


async def test_a_buyer_that_never_acks_gets_settle_first_after_its_credit_and_service_once_it_acks(tmp_path):
    # A credit of 1 ms of compute: the first unacked job uses it up.
    async with open_devnet(1, root=tmp_path / "net", extra_args={0: ["--credit-s", "0.001"]}) as net:
        provider = net.providers[0].ready
        seed = secrets.token_bytes(32)
        key = SigningKey(seed)
        async with open_p2p_node(seed, ["/ip4/127.0.0.1/tcp/0"]) as p2p:
            first, withheld_ack = await job_without_ack(p2p, provider["peer_id"], provider["addrs"], key, MODEL)
            assert isinstance(first, Delivered)
            second, _ = await job_without_ack(p2p, provider["peer_id"], provider["addrs"], key, MODEL, seed=1)
            assert isinstance(second, Refused) and second.code == "settle-first", second
            assert "unacked" in second.message
            # The ack, delivered late by the settle protocol, restores service.
            async with p2p.open_stream(provider["peer_id"], provider["addrs"], SETTLE_PROTOCOL) as stream:
                ack = decode_message(withheld_ack[0], max_bytes=1 << 16, expect=("ack",)).ack
                await stream.send(encode_message(SettleAcks((ack,))))
                held = decode_message(await stream.receive(max_bytes=1 << 20, timeout_s=30), max_bytes=1 << 20,
                                      expect=("settle-held",))
            assert [e.status for e in held.entries] == ["accepted"]
            third, _ = await job_without_ack(p2p, provider["peer_id"], provider["addrs"], key, MODEL, seed=2)
            assert isinstance(third, Delivered)


async def test_a_provider_holds_at_most_its_request_budget_and_answers_busy_beyond_it(tmp_path):
    """With an 80 MiB budget, a 50 MiB request held (the provider awaits its buyer's ack)
    leaves no room for a second: that one is read, dropped, and answered `busy`; once the
    first is settled, requests get in again. The provider's peak RSS stays under its
    documented ceiling (README: 4 x the budget over its resting size)."""
    rows = 50 * 1024 * 1024 // SQUEEZENET_ROW_BYTES
    async with open_devnet(1, root=tmp_path / "net", extra_args={0: ["--request-budget-mb", "80"]}) as net:
        provider = net.providers[0].ready
        pid = net.providers[0].process.pid
        resting_mb = peak_rss_mb(pid)
        seed = secrets.token_bytes(32)
        key = SigningKey(seed)
        async with open_p2p_node(seed, ["/ip4/127.0.0.1/tcp/0"]) as p2p:
            where = (provider["peer_id"], provider["addrs"])
            async with p2p.open_stream(*where, JOB_PROTOCOL) as held_stream:
                first, ack = await until_result(held_stream, squeezenet_job(key, where[0], MODEL, rows=rows))
                assert isinstance(first, Delivered)
                second, _ = await job_without_ack(p2p, *where, key, MODEL, rows=rows, seed=1)
                assert isinstance(second, Refused) and second.code == "busy", second
                assert "MiB of requests" in second.message
                # A client's request meets `busy` too: full is not failing, so it waits
                # about the queue the provider told it of and asks the same provider again
                # (the only one) instead of spending a try on it.
                x = np.random.default_rng(3).random((rows, 3, 224, 224), dtype=np.float32)
                answers = []
                async with Client(tmp_path / "app", [net.bootstrap_addr]) as client, trio.open_nursery() as n:
                    n.start_soon(lambda: _append(answers, client.infer(MODEL, {"data_0": x})))
                    with trio.fail_after(60):
                        async for event in net.providers[0].events:
                            if event.get("event") == "refused" and event.get("code") == "busy" \
                                    and event.get("peer") == client.key.peer_id:
                                break
                    for frame in ack:
                        await held_stream.send(frame)
                    settled = decode_message(await held_stream.receive(max_bytes=1 << 16, timeout_s=30),
                                             max_bytes=1 << 16, expect=("settled",))
                    assert settled.status == "accepted"
                (answer,) = answers
                assert answer.outcome.attempts[0] == answer.outcome.attempts[-1] == where[0]
                assert len(answer.outcome.attempts) >= 2 and answer.outcome.state == "settled"
            # The client's job was settled and acked: the budget is free again.
            for attempt in range(10):
                third, _ = await job_without_ack(p2p, *where, key, MODEL, rows=rows, seed=2)
                if not (isinstance(third, Refused) and third.code == "busy"):
                    break
            assert isinstance(third, Delivered), third
        peak_mb = peak_rss_mb(pid)
    assert peak_mb - resting_mb < 4 * 80, (resting_mb, peak_mb)


async def _append(into: list, awaitable) -> None:
    into.append(await awaitable)


def test_refusals_are_counted_exactly_by_reason_and_peer_but_logged_in_bounded_bursts(caplog):
    import logging

    from node.refusals import BURST, EVERY_S, Refusals

    class Steps:
        now = 0.0

        def elapsed_s(self) -> float:
            return self.now

    clock, events = Steps(), []
    refusals = Refusals(logging.getLogger("test.refusals"), emit=lambda name, **f: events.append(f), clock=clock)
    with caplog.at_level(logging.INFO, logger="test.refusals"):
        for i in range(4096):  # one 8 MiB sync frame of bad offers, from one peer
            refusals("bad-offer", "12D3KooWattacker", f"offer {i}")
        refusals("rate-limited", "12D3KooWother", "too fast")
        clock.now = EVERY_S
        refusals("bad-offer", "12D3KooWattacker", "one more")
    assert refusals.by_reason == {"bad-offer": 4097, "rate-limited": 1}
    assert refusals.by_peer == {"12D3KooWattacker": 4097, "12D3KooWother": 1}
    assert len(caplog.records) == len(events) == BURST + 2
    assert events[-1]["not_logged"] == 4096 - BURST  # the next line says how many were held back
    assert refusals.snapshot()["top_peers"]["12D3KooWattacker"] == 4097
