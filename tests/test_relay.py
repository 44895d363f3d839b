"""Circuit relay v2 as a provider behind NAT uses it, with real libp2p hosts on loopback:
the provider is dialled only at its relayed address.

Each test would catch a py-libp2p 0.8.1 fault we work around again (see node/p2p/relay.py
and shared/notes/relay-nat.md): circuits to one provider that end one at a time leave
the others alive (the stock relay killed the newest when an older ended), finished
circuits give back their slot (the stock relay leaked them until the provider was
refused), and a relay that restarts gets the provider's reservation back.
"""

from __future__ import annotations

import secrets

import pytest
import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.resources import RelayLimits

from node.net import StreamClosed
from node.p2p import open_p2p_node
from node.p2p.host import HOLE_PUNCH_ENV, _forget_failed_dial

ECHO = "/idlemesh-test/echo/1"


@pytest.fixture(autouse=True)
def _no_hole_punching(monkeypatch):
    """These tests are about the relay. On loopback every node's own address is reachable,
    so DCUtR's first step (a direct dial to the addresses identify gave) soon moves a
    buyer's connection off the relay, and the next round trip makes no circuit: the
    counts below then wait for circuits that never come (seen under load)."""
    monkeypatch.setenv(HOLE_PUNCH_ENV, "0")
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
GUARD_S = 30.0  # a hang guard, not a measurement


async def _echo(stream) -> None:
    data = await stream.receive(max_bytes=1 << 20, timeout_s=10)
    await stream.send(data)


async def _round_trip(buyer, peer_id: str, addrs: list[str], payload: bytes) -> bytes:
    async with buyer.open_stream(peer_id, addrs, ECHO) as stream:
        await stream.send(payload)
        return await stream.receive(max_bytes=1 << 20, timeout_s=10)


async def _relayed_provider(relay, provider) -> str:
    """The provider's relayed address, once it holds a slot on `relay`."""
    relay_addr = f"{relay.listen_addrs[0].split('/p2p/')[0]}/p2p/{relay.peer_id}"
    provider.set_stream_handler(ECHO, _echo)
    provider.keep_connected([relay_addr])
    provider._nursery.start_soon(provider.relay_client.hold, relay_addr, _forget_failed_dial)
    with trio.fail_after(GUARD_S):
        while not provider.relay_client.relayed_addrs(provider.peer_id):
            await provider.relay_client.changed.wait()
    (addr,) = provider.relay_client.relayed_addrs(provider.peer_id)
    return addr


async def _disconnect(node, peer_id: str) -> None:
    await node.host.disconnect(ID.from_base58(peer_id))


async def test_relayed_circuits_end_one_at_a_time_and_give_back_their_slots():
    limits = RelayLimits(duration=600, data=64 << 20, max_circuit_conns=3, max_reservations=16)
    async with open_p2p_node(secrets.token_bytes(32), LOOPBACK) as relay, \
            open_p2p_node(secrets.token_bytes(32), LOOPBACK) as provider, \
            open_p2p_node(secrets.token_bytes(32), LOOPBACK) as first, \
            open_p2p_node(secrets.token_bytes(32), LOOPBACK) as second:
        relay.serve_relay(limits)
        addr = await _relayed_provider(relay, provider)
        assert addr.endswith(f"/p2p/{relay.peer_id}/p2p-circuit/p2p/{provider.peer_id}")
        # Two circuits to the provider at once; the older ends, the newer must live on.
        with trio.fail_after(GUARD_S):
            assert await _round_trip(first, provider.peer_id, [addr], b"one") == b"one"
            assert await _round_trip(second, provider.peer_id, [addr], b"two") == b"two"
            await _disconnect(first, provider.peer_id)
            await _disconnect(first, relay.peer_id)
            for i in range(3):
                assert await _round_trip(second, provider.peer_id, [addr], b"still %d" % i) == b"still %d" % i
            await _disconnect(second, provider.peer_id)
            await relay.relay.wait_circuits_ended(2)
        # Three slots, ten circuits one after another: each must end and give its slot
        # back (the stock relay never ended one whose other direction was still reading).
        for i in range(10):
            buyer = (first, second)[i % 2]
            with trio.fail_after(GUARD_S):
                assert await _round_trip(buyer, provider.peer_id, [addr], b"job %d" % i) == b"job %d" % i
                await _disconnect(buyer, provider.peer_id)
                await relay.relay.wait_circuits_ended(3 + i)
        # Relayed dials only (the buyers never had the provider's own address), and one
        # reservation: buyers dial with the STOP role only.
        assert first.counters["relayed-dials"] >= 1 and second.counters["relayed-dials"] >= 1
        assert provider.counters.get("relayed-dials", 0) == 0  # the provider never dialled anyone
        assert list(relay.relay.resource_manager._reservations) == [ID.from_base58(provider.peer_id)]


async def test_a_direct_address_that_fails_falls_back_to_the_relayed_one():
    async with open_p2p_node(secrets.token_bytes(32), LOOPBACK) as relay, \
            open_p2p_node(secrets.token_bytes(32), LOOPBACK) as provider, \
            open_p2p_node(secrets.token_bytes(32), LOOPBACK) as buyer:
        relay.serve_relay()
        addr = await _relayed_provider(relay, provider)
        # A closed port stands for the provider's unreachable private address.
        probe = trio.socket.socket()
        await probe.bind(("127.0.0.1", 0))
        dead = f"/ip4/127.0.0.1/tcp/{probe.getsockname()[1]}"
        probe.close()
        with trio.fail_after(GUARD_S):
            assert await _round_trip(buyer, provider.peer_id, [dead, addr], b"x" * 300_000) == b"x" * 300_000
        assert buyer.counters["relayed-dials"] == 1


async def test_a_provider_reserves_again_when_its_relay_comes_back():
    relay_seed = secrets.token_bytes(32)
    async with open_p2p_node(secrets.token_bytes(32), LOOPBACK) as provider, \
            open_p2p_node(secrets.token_bytes(32), LOOPBACK) as buyer:
        async with open_p2p_node(relay_seed, LOOPBACK) as relay:
            relay.serve_relay()
            listen = relay.listen_addrs[0].split("/p2p/")[0]
            addr = await _relayed_provider(relay, provider)
            first_count = next(iter(provider.relay_client.reservations.values())).reserved_count
        # The relay is gone: the provider notices the lost connection...
        with trio.fail_after(GUARD_S):
            while provider.relay_client.relayed_addrs(provider.peer_id):
                await provider.relay_client.changed.wait()
        # ...and reserves again on the same relay (same key and port) once it is back,
        # without the library's refresher spinning or its 60 s negative dial cache.
        async with open_p2p_node(relay_seed, [listen]) as relay:
            relay.serve_relay()
            with trio.fail_after(GUARD_S):
                while not provider.relay_client.relayed_addrs(provider.peer_id):
                    await provider.relay_client.changed.wait()
            reservation = next(iter(provider.relay_client.reservations.values()))
            assert reservation.reserved_count == first_count + 1 and reservation.state == "reserved"
            with trio.fail_after(GUARD_S):
                assert await _round_trip(buyer, provider.peer_id, [addr], b"back") == b"back"


async def test_a_lazily_opened_stream_to_a_peer_that_does_not_serve_the_protocol_is_a_clear_error():
    """Streams open lazily (the protocol goes with the first frame, no round trip before
    it): a peer that does not serve the protocol is a StreamClosed that names it, and
    the next stream on the same connection works."""
    async with open_p2p_node(secrets.token_bytes(32), LOOPBACK) as server, \
            open_p2p_node(secrets.token_bytes(32), LOOPBACK) as client:
        server.set_stream_handler(ECHO, _echo)
        with trio.fail_after(GUARD_S):
            # Its refusal is read before our first frame, or lost in the reset that meets
            # our frame: the error names the protocol either way.
            async with client.open_stream(server.peer_id, server.listen_addrs, "/idlemesh-test/nobody/1") as stream:
                with pytest.raises(StreamClosed, match="not serve /idlemesh-test/nobody/1"):
                    await stream.send(b"x" * 300_000)
                    await stream.receive(max_bytes=1 << 20, timeout_s=10)
            async with client.open_stream(server.peer_id, server.listen_addrs, "/idlemesh-test/nobody/1") as stream:
                with pytest.raises(StreamClosed, match="does not serve /idlemesh-test/nobody/1"):
                    await stream.receive(max_bytes=1 << 20, timeout_s=10)
            assert await _round_trip(client, server.peer_id, server.listen_addrs, b"after") == b"after"


class _Stream:
    def __init__(self, protocol: str) -> None:
        self.protocol = protocol

    def get_protocol(self) -> str:
        return self.protocol


class _Conn:
    def __init__(self, addr: str, streams: list[_Stream]) -> None:
        self.addr, self.streams, self.closed = addr, streams, False

    def get_transport_addresses(self):
        return [self.addr]

    def get_streams(self):
        return list(self.streams)

    async def close(self) -> None:
        self.closed = True


class _Host:
    def __init__(self, connections: dict) -> None:
        self.connections = connections

    def get_network(self):
        return self

    def get_id(self):
        return ID.from_base58("12D3KooWPjAT5XstSRcqPSwtvfkKaGRRbcqJDxDoiaE7Fs4CJFfU")


async def test_after_hole_punching_the_relayed_connection_lives_until_its_jobs_are_done(autojump_clock):
    """DCUtR in py-libp2p 0.8.1 closes the relayed connection 60 s after the upgrade,
    jobs and all; ours waits for the job streams on it to end (under a mock clock)."""
    from node.p2p.relay import HolePunch

    peer = ID.from_base58("12D3KooWKcRNs48qbY8E1YbYi5jAQ3Qmiwra9w4x8sRKzCpQVRTW")
    job = _Stream("/idlemesh/job/1.0.0")
    relayed = _Conn("/ip4/100.64.0.2/tcp/4001/p2p/X/p2p-circuit", [_Stream("/meshsub/1.1.0"), job])
    direct = _Conn("/ip4/100.64.0.4/tcp/4001", [])
    punch = HolePunch(_Host({peer: [relayed, direct]}))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(punch._close_relayed_conns_after_grace, peer)
        await trio.sleep(10 * 60)  # a long job: ten minutes after the upgrade
        assert not relayed.closed and not direct.closed
        relayed.streams.remove(job)  # the job ends; gossip streams do not hold the leg
        await trio.sleep(5)
        assert relayed.closed and not direct.closed


async def test_peers_left_relayed_get_a_fresh_round_of_hole_punching(autojump_clock):
    """DCUtR stops after 3 attempts until the connection closes; a warm connection that
    stayed relayed gets another round every HOLE_PUNCH_RETRY_S (mock clock)."""
    from node.p2p.relay import HOLE_PUNCH_RETRY_S, HolePunch

    relayed_only = ID.from_base58("12D3KooWKcRNs48qbY8E1YbYi5jAQ3Qmiwra9w4x8sRKzCpQVRTW")
    upgraded = ID.from_base58("12D3KooWC7L2kycad4Wr9xWGesiR7YgqJeRgyhunhBAneHqoS7by")
    circuit = "/ip4/100.64.0.2/tcp/4001/p2p/X/p2p-circuit"
    punch = HolePunch(_Host({relayed_only: [_Conn(circuit, [])],
                             upgraded: [_Conn(circuit, []), _Conn("/ip4/100.64.0.4/tcp/4001", [])]}))
    punch._hole_punch_attempts.update({relayed_only: 3, upgraded: 3})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(punch.retry_exhausted)
        await trio.sleep(HOLE_PUNCH_RETRY_S - 1)
        assert punch._hole_punch_attempts == {relayed_only: 3, upgraded: 3}
        await trio.sleep(2)
        assert punch._hole_punch_attempts == {upgraded: 3}
        nursery.cancel_scope.cancel()
