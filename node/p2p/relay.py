"""Circuit relay v2 as we use it: bootstraps relay for providers behind NAT, providers
hold a reservation, buyers dial the relayed address. py-libp2p 0.8.1 ships the protocol
(`libp2p.relay.circuit_v2`); shared/notes/relay-nat.md lists what is broken in it, and
this module works around each (the numbers are that note's):

1. the relay kills the newest circuit to a peer when an older one ends (circuits are
   kept in a dict keyed by peer id): our relay loop never touches that dict, and ends
   only its own circuit;
2. circuit slots leak, because a local reset does not wake a reader blocked on the
   other direction: when one direction ends, we cancel the other;
3. reservations of peers that left count until they expire: the limit is raised and
   buyers never reserve (they dial with the STOP role only);
4. and 5. the library's reservation refresher re-reserves in a busy loop when the
   lifetime is short, and spins then gives up after a relay outage: we never start it;
   our own loop reserves on every new connection to the relay and halfway through each
   reservation's lifetime, forgetting the library's 60 s negative dial cache;
6. `RelayDiscovery(auto_reserve=True)` never reserves if it runs before identify: we
   reserve explicitly on the bootstraps we are given;
8. after a hole punch, DCUtR closes the relayed connection 60 s later whatever runs on
   it, so a job streaming its inputs then dies: we close it only once no job stream of
   ours is open on it (new streams take the direct connection: the swarm prefers it);
9. DCUtR gives up on a peer after 3 attempts until the connection closes, so one
   mistimed round keeps a long-lived warm connection relayed for good: every
   HOLE_PUNCH_RETRY_S we give peers still only relayed a fresh round.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import RELAY_CLOSE_GRACE_PERIOD, DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport

log = logging.getLogger("idlemesh.p2p.relay")

# A relayed job moves its inputs and outputs through the relay unless hole punching
# upgrades the connection, so a circuit's budget is generous next to go-libp2p's
# 2 min / 128 KiB (which only suits the hole-punching handshake).
RELAY_LIMITS = RelayLimits(duration=30 * 60, data=512 * 1024 * 1024, max_circuit_conns=64,
                           max_reservations=1024, reservation_ttl=3600)
RELAY_CHUNK = 64 * 1024
RESERVE_RETRY_MIN_S = 0.5
RESERVE_RETRY_MAX_S = 10.0
CONNECTION_POLL_S = 0.5


def is_relayed(addr: str) -> bool:
    return "/p2p-circuit" in addr


def relayed_addr(relay_addr: str, peer_id: str) -> str:
    """Our dialable address through the relay at `relay_addr` (which names its peer id)."""
    return f"{relay_addr}/p2p-circuit/p2p/{peer_id}"


class Relay(CircuitV2Protocol):
    """The library's relay with circuits that end one at a time and give back their slot."""

    def __init__(self, host, limits: RelayLimits = RELAY_LIMITS) -> None:
        super().__init__(host, limits=limits, allow_hop=True)
        self._circuits: dict[frozenset[int], list[trio.CancelScope]] = {}
        self.circuits_ended = 0
        self.bytes_relayed = 0
        self._ended = trio.Event()  # set (and replaced) each time a circuit ends

    async def wait_circuits_ended(self, count: int) -> None:
        """Until `count` circuits have ended (a circuit ends a moment after its peers
        hang up: the relay notices when its reads fail)."""
        while self.circuits_ended < count:
            ended = self._ended
            await ended.wait()

    async def _relay_data(self, src_stream, dst_stream, peer_id: ID, deadline: float | None = None,
                          circuit_data_limit: list[int] | None = None) -> None:
        key = frozenset((id(src_stream), id(dst_stream)))
        scopes = self._circuits.setdefault(key, [])
        with trio.CancelScope() as scope:
            scopes.append(scope)
            while deadline is None or time.monotonic() < deadline:
                try:
                    data = await src_stream.read(RELAY_CHUNK)
                except Exception:  # noqa: BLE001 - a reset, an EOF or a closed connection all end the circuit
                    break
                if not data:
                    break
                if circuit_data_limit is not None:
                    if len(data) > circuit_data_limit[0]:
                        log.info("circuit for %s reached its data limit", peer_id)
                        break
                    circuit_data_limit[0] -= len(data)
                try:
                    with trio.fail_after(self.write_timeout):
                        await dst_stream.write(data)
                except Exception:  # noqa: BLE001 - the other side went away
                    break
                self.bytes_relayed += len(data)
        # One direction ended, so the circuit has: wake the other (its read would block
        # until the connection dies) and reset both streams, this circuit's only.
        for other in scopes:
            other.cancel()
        if self._circuits.pop(key, None) is not None:
            self.circuits_ended += 1
            self._ended.set()
            self._ended = trio.Event()
            for stream in (src_stream, dst_stream):
                with trio.move_on_after(2, shield=True):
                    try:
                        await stream.reset()
                    except Exception:  # noqa: BLE001 - already gone
                        pass
            for peer, pair in list(self._active_relays.items()):
                if pair[0] in (src_stream, dst_stream) or pair[1] in (src_stream, dst_stream):
                    del self._active_relays[peer]


OUR_PROTOCOLS = "/idlemesh/"
RELAYED_LEG_MAX_S = 30 * 60  # the relay's own circuit limit ends it by then anyway
RELAYED_LEG_POLL_S = 2.0
HOLE_PUNCH_RETRY_S = 30.0


def _relayed(conn) -> bool:
    try:
        addrs = conn.get_transport_addresses()
    except Exception:  # noqa: BLE001 - a closing connection
        return False
    return bool(addrs) and all("/p2p-circuit" in str(a) for a in addrs)


def _job_streams(conn) -> int:
    count = 0
    for stream in list(getattr(conn, "get_streams", lambda: [])()):
        protocol = getattr(stream, "get_protocol", lambda: None)()
        if protocol and str(protocol).startswith(OUR_PROTOCOLS):
            count += 1
    return count


class HolePunch(DCUtRProtocol):
    """DCUtR that never cuts a relayed connection a job is still using (bug 8), and
    says when a peer became directly connected."""

    def __init__(self, host, on_direct=None) -> None:
        super().__init__(host)
        self.on_direct = on_direct
        self.upgraded: dict[str, float] = {}  # peer id -> when the direct connection was made

    def _schedule_relay_close(self, peer_id: ID) -> None:
        self.upgraded[peer_id.to_base58()] = time.time()
        if len(self.upgraded) > 10_000:
            self.upgraded.clear()
        if self.on_direct is not None:
            self.on_direct(peer_id.to_base58())
        super()._schedule_relay_close(peer_id)

    async def retry_exhausted(self) -> None:
        """Give peers reached only through a relay, whose attempts ran out, a fresh round
        every HOLE_PUNCH_RETRY_S (the auto-drive loop picks them up again)."""
        while True:
            await trio.sleep(HOLE_PUNCH_RETRY_S)
            network = self.host.get_network()
            for peer_id in list(self._hole_punch_attempts):
                conns = network.connections.get(peer_id) or []
                conns = conns if isinstance(conns, list) else [conns]
                if conns and all(_relayed(c) for c in conns) and peer_id not in self._in_progress:
                    del self._hole_punch_attempts[peer_id]

    async def _close_relayed_conns_after_grace(self, peer_id: ID, grace: float = RELAY_CLOSE_GRACE_PERIOD) -> None:
        await trio.sleep(grace)
        with trio.move_on_after(RELAYED_LEG_MAX_S):
            while True:
                conns = self.host.get_network().connections.get(peer_id) or []
                conns = conns if isinstance(conns, list) else [conns]
                if not any(_relayed(c) and _job_streams(c) for c in conns):
                    break
                await trio.sleep(RELAYED_LEG_POLL_S)
        await super()._close_relayed_conns_after_grace(peer_id, grace=0)


@dataclass
class Reservation:
    relay_addr: str  # the relay's own dialable address, with its /p2p/ id
    relay_id: str
    state: str = "pending"  # pending | reserved | failed
    expires_s: float = 0.0  # wall clock (the relay's voucher says Unix seconds)
    reserved_count: int = 0
    last_error: str | None = None

    def to_json(self) -> dict:
        return {"relay": self.relay_addr, "state": self.state, "expires_in_s":
                max(0, round(self.expires_s - time.time())) if self.state == "reserved" else None,
                "reservations_made": self.reserved_count, "last_error": self.last_error}


@dataclass
class RelayClient:
    """The STOP side (accepting circuits) and, for providers, reservations on relays."""
    host: object
    protocol: CircuitV2Protocol
    transport: CircuitV2Transport
    reservations: dict[str, Reservation] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)

    @classmethod
    def for_host(cls, host) -> "RelayClient":
        protocol = CircuitV2Protocol(host, allow_hop=False)
        # STOP only: a dial through a relay never reserves a slot for the dialer (bug 3).
        transport = CircuitV2Transport(host, protocol, RelayConfig(roles=RelayRole.STOP))
        return cls(host, protocol, transport)

    def relayed_addrs(self, peer_id: str) -> list[str]:
        return [relayed_addr(r.relay_addr, peer_id) for r in self.reservations.values() if r.state == "reserved"]

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def dial(self, addr: str):
        """A connection to the peer at a /p2p-circuit address, through its relay."""
        maddr = multiaddr.Multiaddr(addr)
        # The transport looks the peer's circuit addresses up first (and logs a warning
        # when the peerstore has none): give it this one.
        self.host.get_peerstore().add_addrs(ID.from_base58(addr.rsplit("/p2p/", 1)[-1]), [maddr], 600)
        return await self.transport.dial(maddr)

    async def hold(self, relay_addr: str, forget_failed_dial) -> None:
        """Keep a reservation on the relay at `relay_addr` for as long as we run: reserve
        whenever the connection to it is new (a relay that restarted has forgotten us),
        and again halfway through each reservation's lifetime."""
        relay_id = relay_addr.split("/p2p/")[-1]
        pid = ID.from_base58(relay_id)
        state = self.reservations.setdefault(relay_id, Reservation(relay_addr, relay_id))
        network = self.host.get_network()
        retry_s = RESERVE_RETRY_MIN_S
        reserved_on = None
        renew_at = 0.0
        while True:
            conns = network.connections.get(pid)
            conn = (conns[0] if isinstance(conns, list) and conns else conns) or None
            if conn is None:
                if state.state == "reserved":
                    state.state, state.last_error = "pending", "connection to the relay lost"
                    self._notify()
                reserved_on = None
                await trio.sleep(CONNECTION_POLL_S)  # the bootstrap reconnect loop dials it
                continue
            if conn is reserved_on and time.time() < renew_at:
                await trio.sleep(CONNECTION_POLL_S)
                continue
            forget_failed_dial(self.host, pid)
            ok, why = False, "no answer"
            try:
                with trio.fail_after(15):
                    stream = await self.host.new_stream(pid, [HOP_PROTOCOL_ID])
                    try:
                        ok = await self.transport._make_reservation(stream, pid)
                    finally:
                        with trio.move_on_after(2):
                            await stream.close()
                why = "refused" if not ok else ""
            except trio.TooSlowError:
                why = "timed out"
            except Exception as exc:  # noqa: BLE001 - the library raises many kinds; all mean "retry"
                why = type(exc).__name__
            if ok:
                expires = float(self.transport._reservations.get(pid, 0) or time.time() + 60)
                was = state.state
                state.state, state.expires_s, state.last_error = "reserved", expires, None
                state.reserved_count += 1
                reserved_on = conn
                renew_at = time.time() + max(30.0, (expires - time.time()) / 2)
                retry_s = RESERVE_RETRY_MIN_S
                if was != "reserved":
                    log.info("reserved a relay slot on %s; reachable at %s", relay_addr,
                             relayed_addr(relay_addr, self.host.get_id().to_base58()))
                    self._notify()
                continue
            if state.last_error != why:
                log.info("relay %s: reservation %s; retrying", relay_addr, why)
            if state.state == "reserved":
                self._notify()
            state.state, state.last_error = "failed", why
            await trio.sleep(retry_s)
            retry_s = min(retry_s * 2, RESERVE_RETRY_MAX_S)
