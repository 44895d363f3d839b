"""A network that stands: real processes kept alive across several offer lifetimes, with a
kill -9 and restart of the bootstrap and of a provider in the middle, and a bootstrap
that serves 1,000 buyers coming and going.

No fixed sleeps: each step waits for the event that proves it (an offer refreshed past a
lifetime boundary, an offer heard by gossip, a reconnect), under a generous guard
against hangs. Offers live OFFER_TTL_S here (set through provider config) so that the
test outlives four lifetimes in well under a minute.
"""

from __future__ import annotations

import json
import secrets
import signal
import sys
import time

import numpy as np
import onnxruntime as ort
import trio
from libp2p.peer.id import ID

from devnet.launcher import open_devnet
from node.buyer import Buyer, SubmitSpec
from node.calibrate import reference_model_path
from node.gossip import OfferGossip
from node.offers import OfferBook
from node.p2p import StreamClosed, open_p2p_node
from protocol.topics import OFFERS_TOPIC

MODEL = reference_model_path("squeezenet")
OFFER_TTL_S = 6.0
GUARD_S = 60.0  # a hang guard, not a measurement: every awaited event comes far sooner


def _now_ms() -> int:
    return int(time.time() * 1000)


async def _wait_for(child, predicate, what: str, timeout_s: float = GUARD_S) -> dict:
    with trio.fail_after(timeout_s):
        async for event in child.events:
            if predicate(event):
                return event
    raise AssertionError(f"{child.name} exited while waiting for {what}")


async def _all_refreshed_past(providers, boundary_ms: int) -> None:
    """Every provider has published an offer issued at or after `boundary_ms`, and heard
    no one else's by gossip on the way (providers publish without subscribing)."""
    def published(e: dict) -> bool:
        assert not (e.get("event") == "offer-heard" and e.get("via") == "gossip"), e
        return e.get("event") == "offer-published" and e["issued_at_ms"] >= boundary_ms

    for child in providers:
        await _wait_for(child, published, f"an offer issued after {boundary_ms}")


async def _heard_by_gossip(bootstrap, provider_ids: set[str], after_ms: int) -> None:
    """The bootstrap heard each provider's offer by gossip (not by a sync push)."""
    waiting = set(provider_ids)
    await _wait_for(bootstrap, lambda e: e.get("event") == "offer-heard" and e["via"] == "gossip"
                    and e["issued_at_ms"] >= after_ms and waiting.discard(e["provider"]) is None and not waiting,
                    f"gossip of {len(provider_ids)} offers")


async def _status(home) -> dict:
    done = await trio.run_process([sys.executable, "-m", "node.cli", "provider", "status", "--home", str(home),
                                   "--json"], capture_stdout=True)
    return json.loads(done.stdout)


async def _fresh_buyer_settles(net, tmp_path, label: str, x: np.ndarray, expected: np.ndarray, jobs: int = 4):
    spec = SubmitSpec(model_path=MODEL, inputs={"data_0": x}, count=jobs, bootstrap=[net.bootstrap_addr],
                      home=tmp_path / f"buyer-{label}", out_dir=tmp_path / f"out-{label}")
    outcomes, summary = await Buyer(spec).run()
    assert [o.state for o in outcomes] == ["settled"] * jobs, (label, [o.error for o in outcomes])
    for o in outcomes:
        np.testing.assert_allclose(np.load(o.output_path), expected, rtol=1e-5, atol=1e-6)
    return outcomes, summary


async def test_offers_live_as_long_as_their_providers_across_restarts(tmp_path):
    x = np.random.default_rng(11).random((1, 3, 224, 224), dtype=np.float32)
    expected = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"]).run(None, {"data_0": x})[0]
    ttl = ["--offer-ttl-s", str(OFFER_TTL_S)]
    async with open_devnet(3, root=tmp_path / "net", extra_args={0: ttl, 1: ttl, 2: ttl}) as net:
        ids = {c.ready["peer_id"] for c in net.providers}
        start_ms = _now_ms()
        ttl_ms = int(OFFER_TTL_S * 1000)
        for lifetime in (1, 2):
            await _all_refreshed_past(net.providers, start_ms + lifetime * ttl_ms)
            # Gossip alone carries each refresh to the bootstrap, lifetime after lifetime.
            await _heard_by_gossip(net.bootstrap, ids, start_ms + (lifetime - 1) * ttl_ms)
            outcomes, summary = await _fresh_buyer_settles(net, tmp_path, f"lifetime-{lifetime}", x, expected)
            assert summary["offers"] == 3

        # The operator sees it: once per lifetime each provider asks the bootstrap what it
        # holds of its offer (gossip brought it), and `provider status` says so.
        child = net.providers[0]
        checked = await _wait_for(child, lambda e: e.get("event") == "offer-checked", "a visibility check")
        assert checked["bootstrap"] == net.bootstrap.ready["peer_id"] and checked["stale"] is False
        status = await _status(child.home)
        offer = status["offer"]
        assert status["running"] and status["selling"] and offer["warnings"] == []
        assert offer["ttl_s"] == OFFER_TTL_S and offer["published"] >= 3
        (boot_view,) = offer["bootstraps"]
        assert boot_view["connected"] and boot_view["stale"] is False
        assert 0 <= boot_view["offer_age_ms"] <= 2 * OFFER_TTL_S * 1000 / 3
        assert offer["mesh_peers"] == [net.bootstrap.ready["peer_id"]]

        # kill -9 the bootstrap and start it again on the same home and port: every
        # provider is back within its reconnect backoff (not the library's 60 s cache).
        boot = net.bootstrap
        boot.process.send_signal(signal.SIGKILL)
        await boot.process.wait()
        killed_ms = _now_ms()
        boot = await net.restart(boot)
        for child in net.providers:
            await _wait_for(child, lambda e: e.get("event") == "announced", "a reconnect to the bootstrap", 30)
        # ... and gossip flows through the restarted bootstrap again.
        await _all_refreshed_past(net.providers, _now_ms())
        await _heard_by_gossip(boot, ids, killed_ms)
        await _fresh_buyer_settles(net, tmp_path, "after-bootstrap-restart", x, expected)

        # kill -9 a provider and restart it: its new offer reaches the network.
        victim = net.providers[0]
        victim.process.send_signal(signal.SIGKILL)
        await victim.process.wait()
        victim = await net.restart(victim)
        await _wait_for(victim, lambda e: e.get("event") == "announced", "the restarted provider's announce")
        restarted_ms = _now_ms()
        await _all_refreshed_past(net.providers, restarted_ms + ttl_ms)
        await _heard_by_gossip(boot, ids, restarted_ms)
        _, summary = await _fresh_buyer_settles(net, tmp_path, "after-provider-restart", x, expected)
        assert summary["offers"] == 3  # the restarted provider's offer among them

        # A provider that stops is gone from every book within one lifetime.
        stopped = net.providers[2]
        stopped_id = stopped.ready["peer_id"]
        stopped.process.send_signal(signal.SIGTERM)
        await stopped.process.wait()
        gone_by_ms = _now_ms() + ttl_ms
        await _all_refreshed_past(net.providers[:2], gone_by_ms)
        _, summary = await _fresh_buyer_settles(net, tmp_path, "after-provider-stop", x, expected, jobs=2)
        assert summary["offers"] == 2

        # A relayed copy of a provider's current, validly signed offer, published by
        # another node, is refused (and counted) by the bootstrap.
        book = OfferBook()
        boot_id = boot.ready["peer_id"]
        async with open_p2p_node(secrets.token_bytes(32), ["/ip4/127.0.0.1/tcp/0"]) as reader:
            await reader.connect(boot_id, [net.bootstrap_addr])
            await OfferGossip(reader, book).sync_with(boot_id)
        assert stopped_id not in {e.offer.peer_id for e in book.current(now_ms=_now_ms())}
        genuine = book.current(now_ms=_now_ms())[0].signed
        async with open_p2p_node(secrets.token_bytes(32), ["/ip4/127.0.0.1/tcp/0"]) as relayer:
            await relayer.connect(boot_id, [net.bootstrap_addr])
            await relayer.wait_for_subscription(boot_id, OFFERS_TOPIC, timeout_s=GUARD_S)
            await relayer.publish(OFFERS_TOPIC, genuine)
            refused = await _wait_for(boot, lambda e: e.get("event") == "refused" and e.get("peer") == relayer.peer_id,
                                      "the relayed offer's refusal")
        assert refused == {"event": "refused", "code": "relayed-offer", "peer": relayer.peer_id}


def _only(exc: BaseException, kinds: tuple[type, ...]) -> bool:
    """`exc` is one of `kinds`, or a group (trio nurseries wrap) of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(kinds)[1] is None
    return isinstance(exc, kinds)


async def test_a_bootstrap_serves_a_thousand_short_buyer_sessions(tmp_path):
    """Each session dials the bootstrap, syncs and closes, 8 at a time; the bootstrap gives
    every connection back (the library's 250 inbound slots used to run out), and a
    fresh buyer still settles jobs afterwards."""
    x = np.random.default_rng(12).random((1, 3, 224, 224), dtype=np.float32)
    expected = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"]).run(None, {"data_0": x})[0]
    async with open_devnet(1, root=tmp_path / "net") as net:
        boot_id = net.bootstrap.ready["peer_id"]
        synced = []
        limiter = trio.CapacityLimiter(8)

        async def session() -> None:
            # Like a buyer, a session may try again (a loaded machine can drop one dial);
            # a bootstrap that stops serving fails every attempt of every later session.
            async with limiter:
                for attempt in range(3):
                    try:
                        async with open_p2p_node(secrets.token_bytes(32), ["/ip4/127.0.0.1/tcp/0"]) as p2p:
                            await p2p.connect(boot_id, [net.bootstrap_addr])
                            synced.append(await OfferGossip(p2p, OfferBook()).sync_with(boot_id))
                            return
                    except BaseException as exc:  # noqa: BLE001 - re-raised unless a dropped dial
                        if attempt == 2 or not _only(exc, (StreamClosed, trio.TooSlowError)):
                            raise

        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                for _ in range(1000):
                    nursery.start_soon(session)
        assert synced == [1] * 1000  # every session got the one provider's offer
        await _fresh_buyer_settles(net, tmp_path, "after-1000", x, expected, jobs=2)


async def test_losing_one_of_two_bootstraps_loses_nothing(tmp_path):
    x = np.random.default_rng(13).random((1, 3, 224, 224), dtype=np.float32)
    expected = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"]).run(None, {"data_0": x})[0]
    ttl = ["--offer-ttl-s", str(OFFER_TTL_S)]
    async with open_devnet(2, root=tmp_path / "net", n_bootstraps=2, extra_args={0: ttl, 1: ttl}) as net:
        first, second = net.bootstrap_addrs
        survivor = next(c for c in net.children if c.name == "bootstrap-1")
        ids = {c.ready["peer_id"] for c in net.providers}
        net.bootstrap.process.send_signal(signal.SIGKILL)
        await net.bootstrap.process.wait()
        killed_ms = _now_ms()
        # A lifetime later every offer is still refreshed through the survivor ...
        await _all_refreshed_past(net.providers, killed_ms + int(OFFER_TTL_S * 1000))
        await _heard_by_gossip(survivor, ids, killed_ms)
        # ... and buyers settle, given both addresses (the first one dead) or only the survivor.
        for label, addrs in (("both", [first, second]), ("survivor", [second])):
            spec = SubmitSpec(model_path=MODEL, inputs={"data_0": x}, count=2, bootstrap=addrs,
                              home=tmp_path / f"buyer-{label}", out_dir=tmp_path / f"out-{label}")
            outcomes, summary = await Buyer(spec).run()
            assert summary["offers"] == 2, label
            assert [o.state for o in outcomes] == ["settled"] * 2, (label, [o.error for o in outcomes])
            for o in outcomes:
                np.testing.assert_allclose(np.load(o.output_path), expected, rtol=1e-5, atol=1e-6)


async def test_a_warm_client_stays_usable_across_offer_lifetimes_and_restarts(tmp_path):
    """An application keeps one Client open for hours: its book follows gossip past every
    offer lifetime, and a kill -9 of the bootstrap and of a provider costs it nothing
    but the time they take to come back."""
    from node.client import Client

    x = np.random.default_rng(13).random((1, 3, 224, 224), dtype=np.float32)
    expected = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"]).run(None, {"data_0": x})[0]
    ttl = ["--offer-ttl-s", str(OFFER_TTL_S)]
    ttl_ms = int(OFFER_TTL_S * 1000)

    async def settles(client, n: int) -> set[str]:
        answers = []

        async def one() -> None:
            answers.append(await client.infer(MODEL, {"data_0": x}))

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
        for answer in answers:
            np.testing.assert_allclose(answer.outputs["softmaxout_1"], expected, rtol=1e-5, atol=1e-6)
        return {a.provider for a in answers}

    async with open_devnet(2, root=tmp_path / "net", extra_args={0: ttl, 1: ttl}) as net:
        ids = {c.ready["peer_id"] for c in net.providers}
        async with Client(tmp_path / "app", [net.bootstrap_addr]) as client:
            start_ms = _now_ms()
            assert await settles(client, 2) <= ids
            # Two lifetimes later every offer the client first took has expired; gossip
            # brought it the refreshed ones without a sync.
            await _all_refreshed_past(net.providers, start_ms + 2 * ttl_ms)
            await _heard_by_gossip(net.bootstrap, ids, start_ms + ttl_ms)
            held = {e.offer.peer_id: e.offer.issued_at_ms for e in client.book.current(now_ms=_now_ms())}
            assert set(held) == ids and min(held.values()) >= start_ms + ttl_ms
            assert await settles(client, 2) <= ids

            # kill -9 the bootstrap and a provider; both come back on the same homes.
            for child in (net.bootstrap, net.providers[0]):
                child.process.send_signal(signal.SIGKILL)
                await child.process.wait()
            boot = await net.restart(net.bootstrap)
            victim = await net.restart(net.providers[0])
            await _wait_for(victim, lambda e: e.get("event") == "announced", "the restarted provider's announce")
            back_ms = _now_ms()
            await _all_refreshed_past(net.providers, back_ms)
            await _heard_by_gossip(boot, ids, back_ms)
            assert await settles(client, 4) <= ids
        ledger = client.ledger.__class__(tmp_path / "app" / "ledger.sqlite", client.key.public_key)
        assert [s for s, _ in ledger.db.execute("SELECT status, COUNT(*) FROM receipts GROUP BY status")] == ["accepted"]
        ledger.close()


async def test_a_publisher_that_does_not_subscribe_reaches_the_bootstrap_and_heals_a_lost_subscription():
    """Providers publish offers without subscribing (gossipsub fanout). py-libp2p forgets
    a peer's subscriptions when one read on its pubsub stream fails and never asks again
    on that connection; a redial greets afresh and gossip flows again (real hosts)."""
    topic = "idlemesh-test/fanout/1"
    async with open_p2p_node(secrets.token_bytes(32), ["/ip4/127.0.0.1/tcp/0"]) as boot, \
            open_p2p_node(secrets.token_bytes(32), ["/ip4/127.0.0.1/tcp/0"]) as provider:
        addr = f"{boot.listen_addrs[0].split('/p2p/')[0]}/p2p/{boot.peer_id}"
        async with boot.subscribe(topic) as heard:
            provider.keep_connected([addr])
            await provider.wait_for_subscription(boot.peer_id, topic, timeout_s=GUARD_S)

            async def delivered(payload: bytes) -> None:
                with trio.fail_after(GUARD_S):
                    while True:  # a publish just after the greeting may find no fanout yet: again
                        await provider.publish(topic, payload)
                        with trio.move_on_after(1.0):
                            while True:
                                origin, data = await heard.receive()
                                if data == payload:
                                    assert origin == provider.peer_id
                                    return

            await delivered(b"first")
            assert provider.mesh_peers(topic) == [boot.peer_id]  # its fanout: it is in no mesh
            # The library's own fault path: the bootstrap's subscription is forgotten.
            provider.pubsub._handle_dead_peer(ID.from_base58(boot.peer_id))
            assert not provider.subscribes(boot.peer_id, topic)
            await provider.redial(boot.peer_id)
            await provider.wait_for_subscription(boot.peer_id, topic, timeout_s=GUARD_S)
            assert provider.subscribes(boot.peer_id, topic)
            await delivered(b"after the redial")
