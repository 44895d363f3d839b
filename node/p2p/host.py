"""Our adapter over py-libp2p 0.8.1, with the settings measured in shared/notes.

- gossipsub v1.1 only, heartbeat 1 s, library spam protection off (we validate and
  rate-limit ourselves), strict signing on;
- Noise is the only security transport (the library default also accepts plaintext);
- one connection per peer (otherwise every dial waits ~250 ms for happy-eyeballs), and
  no auto-connector (it redials departed peers to keep 50 connections open);
- length-prefixed frames with a cap and a timeout on every read;
- our own reconnect loop for bootstrap peers, since the library does not redial and
  keeps failed peers in a 60 s negative cache (we evict our own entry before each dial);
- inbound connections give back their slot when they close: the library's handler
  holds its slot for the swarm's lifetime (250 of them), so after 250 buyers had come
  and gone a bootstrap refused every new connection;
- the peerstore never evicts our own key (after 1,000 peers it did, and identify broke);
- a listen port already taken is an error at start: the library binds with
  SO_REUSEPORT, so a second node on the same port would start and share it;
- shutdown swallows the library's "Nursery is closed to new arrivals" race.
"""

from __future__ import annotations

import contextvars
import errno
import logging
import os
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamClosed as LibStreamClosed
from libp2p.network.stream.exceptions import StreamEOF, StreamError, StreamReset
from libp2p.host.exceptions import StreamFailure
from libp2p.exceptions import ParseError
from libp2p.io.exceptions import IncompleteReadError, MessageTooLarge
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.protocol_muxer.exceptions import MultiselectClientError, MultiselectCommunicatorError
from libp2p.protocol_muxer.multiselect_client import (MULTISELECT_PROTOCOL_ID, PROTOCOL_NOT_FOUND_MSG,
                                                      MultiselectClient)
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_V10
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11 as GOSSIPSUB_V11
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub import pubsub as pubsub_module
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import encode_delim, read_varint_prefixed_bytes_limited

from protocol.errors import DecodeError
from protocol.stream import FRAME_HEADER, frame, frame_length

from .. import reachability
from ..clock import SYSTEM_CLOCK
from ..net import Admit, FrameRefused, StreamClosed, StreamHandler, Validator
from . import yamux
from .relay import HolePunch, Relay, RelayClient, is_relayed

yamux.install()  # py-libp2p yamux faults mended (node/p2p/yamux.py says which)

log = logging.getLogger("idlemesh.p2p")
PENDING_MESSAGES_PER_PEER = 16
PENDING_MESSAGES_TTL_S = 2.0
RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 2.0   # a restarted bootstrap is found again within this
RECONNECT_POLL_S = 0.5  # how often a link is checked while it is up
SUBSCRIPTION_QUEUE = 4096  # validated messages waiting per topic
DIALBACK_PROTOCOL = "/idlemesh/dialback/1.0.0"
DIALBACK_CONNECT_S = 3.0   # a fresh TCP connection to a reachable port opens well within this
DIALBACK_MAX_PORTS = 4
DIALBACK_MIN_INTERVAL_S = 5.0  # per asking peer: a bootstrap is nobody's port scanner
DIALBACK_CONCURRENCY = 8
DIALBACK_RETRY_S = 5.0     # when no bootstrap answered a dial-back yet
DIRECT_FIRST_S = 5.0       # how long a direct dial may take before the relayed address is tried
RELAY_FIRST_WAIT_S = 10.0  # how long a node behind NAT waits for its first relay slot before it says ready
# IDLEMESH_HOLE_PUNCH=0 keeps relayed connections relayed (DCUtR off): for measuring the
# relayed path, or where an operator does not want peers dialling its NAT's ports.
HOLE_PUNCH_ENV = "IDLEMESH_HOLE_PUNCH"

# A listener's multistream answer is a protocol name; anything longer is not one.
MAX_SELECT_ANSWER_BYTES = 1024

# Errors a stream can raise when the peer goes away; each becomes StreamClosed.
_STREAM_GONE = (LibStreamClosed, StreamEOF, StreamReset, StreamError, SwarmException, StreamFailure,trio.BrokenResourceError,
                trio.ClosedResourceError, ConnectionError, OSError)


class FramedStream:
    """Length-prefixed frames over a libp2p stream, with a cap and a timeout per read."""

    def __init__(self, stream, remote_peer_id: str, *, send_delay_s: float = 0.0, selecting: str | None = None):
        self._stream = stream
        self.remote_peer_id = remote_peer_id
        self.send_delay_s = send_delay_s  # a simulated link: each frame we send waits this long
        self._selecting = selecting  # opened lazily: the listener's answer to this protocol is unread
        # ...and our proposal goes out with the first bytes we write.
        self._unsent = (encode_delim(MULTISELECT_PROTOCOL_ID.encode()) + encode_delim(selecting.encode())
                        if selecting else b"")

    async def _write(self, data: bytes) -> None:
        data, self._unsent = self._unsent + data, b""
        await self._stream.write(data)

    async def _confirm_protocol(self) -> None:
        """Read the listener's multistream answers to a lazily opened stream, before its
        first frame: a peer that does not serve the protocol ends the stream here."""
        protocol, self._selecting = self._selecting, None
        try:
            handshake = await read_varint_prefixed_bytes_limited(self._stream, MAX_SELECT_ANSWER_BYTES)
            answer = await read_varint_prefixed_bytes_limited(self._stream, MAX_SELECT_ANSWER_BYTES)
        except (*_STREAM_GONE, IncompleteReadError, ParseError, MessageTooLarge) as exc:
            raise StreamClosed(f"{self.remote_peer_id} ended the stream before accepting {protocol}: "
                               f"{type(exc).__name__}") from None
        if handshake != MULTISELECT_PROTOCOL_ID.encode() + b"\n" or not answer.endswith(b"\n"):
            raise StreamClosed(f"{self.remote_peer_id} answered {handshake!r} to the multistream handshake")
        if answer[:-1].decode(errors="replace") != protocol:
            raise StreamClosed(f"{self.remote_peer_id} does not serve {protocol} "
                               f"(it answered {answer[:-1].decode(errors='replace')!r})")

    async def _read_exactly(self, size: int) -> bytes:
        if self._selecting is not None:
            if self._unsent:
                try:
                    await self._write(b"")
                except _STREAM_GONE as exc:
                    raise StreamClosed(f"stream to {self.remote_peer_id} closed: {type(exc).__name__}") from None
            await self._confirm_protocol()
        # stream.read(n) may return fewer bytes than asked: loop until whole.
        chunks: list[bytes] = []
        remaining = size
        while remaining:
            try:
                chunk = await self._stream.read(min(remaining, 1 << 20))
            except _STREAM_GONE as exc:
                raise StreamClosed(f"stream from {self.remote_peer_id} closed: {type(exc).__name__}") from None
            if not chunk:
                raise StreamClosed(f"stream from {self.remote_peer_id} ended mid-frame")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    async def receive(self, *, max_bytes: int, timeout_s: float, admit: Admit | None = None) -> bytes:
        """One frame's payload. Raises DecodeError (too big), StreamClosed, trio.TooSlowError,
        or FrameRefused (its bytes read and dropped a chunk at a time)."""
        with trio.fail_after(timeout_s):
            header = await self._read_exactly(FRAME_HEADER.size)
            length = frame_length(header, max_bytes=max_bytes)
            if admit is not None and not admit(length):
                remaining = length
                while remaining:
                    remaining -= len(await self._read_exactly(min(remaining, 1 << 20)))
                raise FrameRefused(length)
            return await self._read_exactly(length)

    async def send(self, payload: bytes, *, timeout_s: float = 30.0) -> None:
        if self.send_delay_s:
            await trio.sleep(self.send_delay_s)
        with trio.fail_after(timeout_s):
            try:
                await self._write(frame(payload))
            except _STREAM_GONE as exc:
                if self._selecting is not None:
                    # A listener that does not serve the protocol resets the stream as our
                    # frame arrives, and its answer is lost with it.
                    raise StreamClosed(f"stream to {self.remote_peer_id} for {self._selecting} closed: "
                                       f"{type(exc).__name__} (also how a peer that does not serve "
                                       f"{self._selecting} answers)") from None
                raise StreamClosed(f"stream to {self.remote_peer_id} closed: {type(exc).__name__}") from None

    async def send_raw(self, data: bytes) -> None:
        """Bytes as they are, unframed: only for tests that play a hostile peer."""
        try:
            await self._write(data)
        except _STREAM_GONE as exc:
            raise StreamClosed(str(exc)) from None

    async def aclose(self) -> None:
        with trio.move_on_after(2):
            try:
                await self._stream.close()
            except _STREAM_GONE:
                pass

    async def reset(self) -> None:
        try:
            await self._stream.reset()
        except _STREAM_GONE:
            pass




@dataclass
class P2PNode:
    """The libp2p implementation of `node.net.Network`."""

    host: object
    pubsub: Pubsub
    peer_id: str
    listen_addrs: list[str]
    _nursery: trio.Nursery
    counters: dict[str, int] = field(default_factory=dict)
    # Devnet links: frames this node sends on direct streams wait this long (a round
    # trip's worth of simulated distance); gossip is not delayed.
    send_delay_s: float = 0.0
    # Bootstrap links we keep: peer id -> {addr, connected, connected_at_ms, last_error}.
    links: dict[str, dict] = field(default_factory=dict)
    _first_dial_done: dict[str, trio.Event] = field(default_factory=dict)
    relay_client: RelayClient | None = None
    relay: Relay | None = None  # bootstraps relay circuits for nodes behind NAT
    hole_punch: HolePunch | None = None
    on_direct: Callable[[str], None] | None = None  # a relayed peer is now directly connected
    reach: reachability.Reachability = field(default_factory=reachability.Reachability)
    announce: list[str] = field(default_factory=list)
    _dialback_asked_s: dict[str, float] = field(default_factory=dict)
    _dialback_slots: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(DIALBACK_CONCURRENCY))

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    # --- gossip -----------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes) -> None:
        await self.pubsub.publish(topic, data)

    @asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator["trio.MemoryReceiveChannel[tuple[str, bytes]]"]:
        """Messages on `topic` from other peers, as (origin peer id, data)."""
        # The library's queue per topic holds 32 messages and drops the rest: a burst of
        # 200 valid offers (one RPC) once stored only 33. Messages are validated (and
        # rate-limited per origin) before they are queued, so a deeper queue is bounded
        # by the peers we hear from.
        pubsub_module.SUBSCRIPTION_CHANNEL_SIZE = SUBSCRIPTION_QUEUE
        subscription = await self.pubsub.subscribe(topic)
        send, receive = trio.open_memory_channel[tuple[str, bytes]](SUBSCRIPTION_QUEUE)
        own_id = self.peer_id

        async def pump() -> None:
            while True:
                message = await subscription.get()
                origin = ID(message.from_id).to_base58()
                if origin == own_id:  # py-libp2p delivers our own publishes back to us
                    continue
                try:
                    send.send_nowait((origin, bytes(message.data)))
                except trio.WouldBlock:
                    self.counters["subscription-overflow"] = self.counters.get("subscription-overflow", 0) + 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            try:
                yield receive
            finally:
                nursery.cancel_scope.cancel()

    def set_validator(self, topic: str, validator: Validator) -> None:
        """`validator(origin_peer_id, data) -> bool` decides before a message is forwarded."""

        def check(forwarder: ID, message) -> bool:
            try:
                origin = ID(message.from_id).to_base58()
            except (ValueError, TypeError):
                return False
            if validator(origin, bytes(message.data)):
                return True
            # The library marks only accepted messages as seen, so a refused one is
            # asked for again on every heartbeat's IHAVE, validated (and counted against
            # its origin's rate) each time: once refused, it is seen.
            self.pubsub._mark_msg_seen(message)
            return False

        self.pubsub.set_topic_validator(topic, check, False)

    async def wait_for_subscription(self, peer_id: str, topic: str, timeout_s: float = 10.0) -> None:
        """Wait until `peer_id` has told us it subscribes to `topic` (event-based, no polling)."""
        pid = ID.from_base58(peer_id)
        await self.pubsub.wait_for_peer(pid, timeout=timeout_s)
        await self.pubsub.wait_for_subscription(pid, topic, timeout=timeout_s)

    def subscribes(self, peer_id: str, topic: str) -> bool:
        """Whether `peer_id` has told us (and we still hold) that it subscribes to `topic`:
        what a publisher that does not subscribe itself needs, to send it anything."""
        return ID.from_base58(peer_id) in self.pubsub.peer_topics.get(topic, ())

    async def redial(self, peer_id: str) -> None:
        """Close our connections to `peer_id`; keep_connected dials it again, and pubsub
        greets it afresh on the new connection. py-libp2p forgets a peer's
        subscriptions when one read on its pubsub stream fails (`_handle_dead_peer`)
        and never asks again while the connection stays up: measured on a 100-node
        devnet started on 2 cores, 21 providers had lost their bootstrap's and could
        publish nothing to it."""
        await self.host.disconnect(ID.from_base58(peer_id))

    # --- direct streams ---------------------------------------------------------------

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        async def on_stream(stream) -> None:
            remote = stream.muxed_conn.peer_id.to_base58()
            framed = FramedStream(stream, remote, send_delay_s=self.send_delay_s)
            try:
                await handler(framed)
            finally:
                await framed.aclose()

        self.host.set_stream_handler(TProtocol(protocol), on_stream)

    async def connect(self, peer_id: str, addrs: list[str] | tuple[str, ...], *, timeout_s: float = 10.0) -> None:
        """Connect by the first path that works: direct addresses first, then relayed
        ones (/p2p-circuit), so a job never fails only because the first path did."""
        infos = [_peer_info(peer_id, a) for a in addrs]
        if not infos:
            raise ConnectionError(f"no address for peer {peer_id}")
        pid = infos[0].peer_id
        direct = [i.addrs[0] for i, a in zip(infos, addrs) if not is_relayed(a)]
        relayed = [a for a in addrs if is_relayed(a)]
        errors = []
        if direct:
            _forget_failed_dial(self.host, pid)
            with trio.move_on_after(min(timeout_s, DIRECT_FIRST_S) if relayed else timeout_s) as scope:
                try:
                    await self.host.connect(PeerInfo(pid, direct))
                    return
                except _STREAM_GONE as exc:
                    errors.append(_dial_error(exc))
            if scope.cancelled_caught:
                errors.append("timed out")
        for addr in relayed:
            with trio.move_on_after(timeout_s) as scope:
                try:
                    await self.relay_client.dial(addr)
                    self._count("relayed-dials")
                    return
                except Exception as exc:  # noqa: BLE001 - the relay transport raises many kinds
                    errors.append(f"via relay: {_dial_error(exc) if isinstance(exc, _STREAM_GONE) else exc}")
            if scope.cancelled_caught:
                errors.append("via relay: timed out")
        if errors == ["timed out"]:
            raise trio.TooSlowError()  # as before relays: callers tell a silent peer from a refusal
        raise StreamClosed(f"cannot connect to {peer_id}: {'; '.join(errors)}")

    @asynccontextmanager
    async def open_stream(self, peer_id: str, addrs: list[str] | tuple[str, ...], protocol: str,
                          *, timeout_s: float = 10.0) -> AsyncIterator[FramedStream]:
        pid = ID.from_base58(peer_id)
        if addrs and not self.host.get_network().connections.get(pid):
            await self.connect(peer_id, addrs, timeout_s=timeout_s)
        with trio.fail_after(timeout_s):
            try:
                stream = await self.host.get_network().new_stream(pid)
            except _STREAM_GONE as exc:
                raise StreamClosed(f"could not open {protocol} to {peer_id}: {exc}") from None
        # Lazy multistream-select (go-libp2p's default): the handshake and the protocol go
        # with our first frame and the listener's answers are read before its first one,
        # so a new stream costs no round trip before the request leaves. Every protocol
        # we open speaks first; a peer that does not serve it ends the stream at our
        # first read (FramedStream._confirm_protocol).
        stream.set_protocol(TProtocol(protocol))
        framed = FramedStream(stream, peer_id, send_delay_s=self.send_delay_s, selecting=protocol)
        try:
            yield framed
        finally:
            await framed.aclose()

    # --- reachability and relays ----------------------------------------------------

    def offer_addrs(self) -> list[str]:
        """What our offer carries: direct addresses that work, then relayed ones."""
        relayed = self.relay_client.relayed_addrs(self.peer_id) if self.relay_client else []
        return reachability.offer_addrs(self.listen_addrs, self.announce, self.reach, relayed)

    def reach_status(self) -> dict:
        relays = [r.relay_addr for r in (self.relay_client.reservations.values() if self.relay_client else ())
                  if r.state == "reserved"]
        return {**self.reach.to_json(), "announce": self.announce,
                "how": reachability.how_reached(self.reach, relays, self.announce, self.listen_addrs),
                "relays": [r.to_json() for r in (self.relay_client.reservations.values() if self.relay_client
                                                 else ())],
                "hole_punched": self.counters.get("hole-punched", 0),
                "relay_serving": {"circuits_ended": self.relay.circuits_ended,
                                  "bytes_relayed": self.relay.bytes_relayed} if self.relay else None}

    def _direct(self, peer_id: str) -> None:
        self._count("hole-punched")
        log.info("direct connection to %s by hole punching (it was relayed)", peer_id)
        if self.on_direct is not None:
            self.on_direct(peer_id)

    def serve_relay(self, limits=None) -> None:
        """Relay circuits for nodes behind NAT, and answer dial-backs (bootstraps)."""
        self.relay = Relay(self.host, **({"limits": limits} if limits else {}))

        async def run_relay() -> None:
            async with background_trio_service(self.relay):
                await trio.sleep_forever()

        self._nursery.start_soon(run_relay)
        self.host.set_stream_handler(TProtocol(DIALBACK_PROTOCOL), self._serve_dialback)

    async def _serve_dialback(self, stream) -> None:
        """Open a fresh TCP connection to the asker's observed address at each port it
        names, and say which connected. Only ever the asker's own address."""
        import msgpack

        remote = stream.muxed_conn.peer_id.to_base58()
        framed = FramedStream(stream, remote)
        try:
            observed = stream.get_remote_address()
            request = msgpack.unpackb(await framed.receive(max_bytes=256, timeout_s=5.0))
            ports = request.get("ports") if isinstance(request, dict) else None
            if (not isinstance(ports, list) or len(ports) > DIALBACK_MAX_PORTS
                    or not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in ports)):
                await framed.send(msgpack.packb({"error": f"expected {{'ports': [1-65535, ...]}}, at most "
                                                          f"{DIALBACK_MAX_PORTS}"}))
                return
            now = trio.current_time()
            if now - self._dialback_asked_s.get(remote, -1e9) < DIALBACK_MIN_INTERVAL_S or observed is None:
                await framed.send(msgpack.packb({"error": "asked too often" if observed else "no observed address"}))
                return
            self._dialback_asked_s[remote] = now
            if len(self._dialback_asked_s) > 10_000:
                self._dialback_asked_s.clear()
            ip = observed[0]
            reachable = []
            async with self._dialback_slots:
                for port in ports:
                    with trio.move_on_after(DIALBACK_CONNECT_S):
                        try:
                            probe = await trio.open_tcp_stream(ip, port)
                            await probe.aclose()
                            reachable.append(port)
                        except OSError:
                            pass
            self._count("dialbacks")
            await framed.send(msgpack.packb({"observed": ip, "reachable": reachable}))
        except (DecodeError, StreamClosed, trio.TooSlowError, ValueError, msgpack.UnpackException):
            pass
        finally:
            await framed.aclose()

    async def check_reachability(self, bootstrap_peer_id: str) -> bool:
        """Ask a bootstrap to dial us back; True if how we are reached changed."""
        import msgpack

        ports = reachability.listen_ports([*self.listen_addrs, *self.announce])[:DIALBACK_MAX_PORTS]
        async with self.open_stream(bootstrap_peer_id, [], DIALBACK_PROTOCOL) as stream:
            await stream.send(msgpack.packb({"ports": ports}))
            answer = msgpack.unpackb(await stream.receive(max_bytes=1024, timeout_s=DIALBACK_CONNECT_S
                                                          * DIALBACK_MAX_PORTS + 5))
        if not isinstance(answer, dict) or "error" in answer or not isinstance(answer.get("reachable"), list):
            raise DecodeError(f"dial-back from {bootstrap_peer_id}: {answer.get('error') if isinstance(answer, dict) else answer!r}")
        observed = answer.get("observed") if isinstance(answer.get("observed"), str) else None
        reachable = [p for p in answer["reachable"] if isinstance(p, int) and p in ports]
        return self.reach.update(observed, reachable, bootstrap_peer_id, SYSTEM_CLOCK.now_ms())

    async def track_reachability(self, relay_addrs: list[str], on_change: Callable[[], Awaitable[None]],
                                 *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Learn at start and every RECHECK_S whether we are publicly reachable; behind
        NAT, hold a relay slot on each bootstrap. Started once the first check answered
        (and, behind NAT, the first slot is held or RELAY_FIRST_WAIT_S passed)."""
        started = False
        holding = False
        retry_s = DIALBACK_RETRY_S

        async def follow_relays() -> None:
            while True:
                changed = self.relay_client.changed
                await changed.wait()
                await on_change()

        if self.relay_client is not None:
            self._nursery.start_soon(follow_relays)
        while True:
            answered, changed = False, False
            for peer_id, link in list(self.links.items()):
                if not link.get("connected"):
                    continue
                try:
                    changed = await self.check_reachability(peer_id)
                    answered = True
                    break
                except (DecodeError, StreamClosed, trio.TooSlowError, ValueError, TypeError) as exc:
                    self.reach.error = f"dial-back by {peer_id}: {exc}"
            if not answered and not self.links:
                answered = True  # no bootstrap to ask: nobody to sell to anyway
            if self.reach.state == "private" and not holding and self.relay_client is not None:
                holding = True
                log.info("behind NAT (seen as %s); reserving relay slots on %d bootstraps", self.reach.observed_ip,
                         len(relay_addrs))
                for addr in relay_addrs:
                    self._nursery.start_soon(self.relay_client.hold, addr, _forget_failed_dial)
                with trio.move_on_after(RELAY_FIRST_WAIT_S):
                    while not self.relay_client.relayed_addrs(self.peer_id):
                        await self.relay_client.changed.wait()
            if changed:
                log.info("reachability: %s", self.reach_status()["how"])
                await on_change()
            if answered and not started:
                started = True
                task_status.started()
            # No answer (no bootstrap up, or none that serves dial-backs): ask again
            # soon, then less and less often.
            retry_s = DIALBACK_RETRY_S if answered else min(retry_s * 2, reachability.RECHECK_S)
            await trio.sleep(reachability.RECHECK_S if answered else retry_s)

    def mesh_peers(self, topic: str) -> list[str]:
        """Peers our messages on `topic` go to: our gossipsub mesh for it, or, publishing
        without subscribing (a provider), our fanout."""
        router = self.pubsub.router
        return sorted(pid.to_base58() for pid in router.mesh.get(topic) or router.fanout.get(topic, ()))

    def connected_peers(self) -> list[str]:
        return [pid.to_base58() for pid in self.host.get_network().connections]

    # --- lifetime ---------------------------------------------------------------------

    def keep_connected(self, addrs: list[str], *, on_connect: Callable[[str], Awaitable[None]] | None = None) -> None:
        """Dial each bootstrap address now and again whenever the connection drops."""
        for addr in addrs:
            self._nursery.start_soon(self._reconnect_loop, addr, on_connect)

    async def first_dials(self, addrs: list[str], timeout_s: float = 12.0) -> dict[str, str]:
        """Wait for the first dial of each kept address; returns the unreachable ones
        (address -> why), so a node can say so before it reports ready."""
        with trio.move_on_after(timeout_s):
            for addr in addrs:
                await self._first_dial_done.setdefault(addr, trio.Event()).wait()
        unreachable = {}
        for link in self.links.values():
            if not link.get("connected"):
                unreachable[link["addr"]] = link.get("last_error") or "no answer yet"
        return unreachable

    async def _reconnect_loop(self, addr: str, on_connect) -> None:
        info = _peer_info(None, addr)
        peer_id = info.peer_id.to_base58()
        delay_s = RECONNECT_MIN_S
        first = self._first_dial_done.setdefault(addr, trio.Event())
        while True:
            network = self.host.get_network()
            if not network.connections.get(info.peer_id):
                self.links[peer_id] = {**self.links.get(peer_id, {}), "addr": addr, "connected": False}
                # The library refuses redials for 60 s after a failure; a bootstrap that
                # restarts must be found again within seconds, so forget that first.
                _forget_failed_dial(self.host, info.peer_id)
                try:
                    with trio.fail_after(10):
                        await self.host.connect(info)
                except (trio.TooSlowError, *_STREAM_GONE, Exception) as exc:  # noqa: BLE001 - dial errors are many and all mean "retry later"
                    reason = "timed out" if isinstance(exc, trio.TooSlowError) else _dial_error(exc)
                    # One line per outage (or change of cause), not one per retry.
                    say = log.info if reason != self.links[peer_id].get("last_error") else log.debug
                    self.links[peer_id].update(last_error=reason, last_error_ms=SYSTEM_CLOCK.now_ms())
                    first.set()
                    say("cannot reach bootstrap %s (%s); retrying every %.1f s at most", addr, reason, RECONNECT_MAX_S)
                    await trio.sleep(delay_s)
                    delay_s = min(delay_s * 2, RECONNECT_MAX_S)
                    continue
                delay_s = RECONNECT_MIN_S
                self.links[peer_id].update(connected=True, connected_at_ms=SYSTEM_CLOCK.now_ms(), last_error=None)
                first.set()
                log.info("connected to bootstrap %s", addr)
                if on_connect is not None:
                    self._nursery.start_soon(on_connect, peer_id)
            await trio.sleep(RECONNECT_POLL_S)


class PipelinedMultiselectClient(MultiselectClient):
    """multistream-select with the handshake and the one protocol we ask for sent in one
    go, then both answers read: one round trip per new stream instead of two. The
    protocol allows it (the listener reads messages in order; go-libp2p and rust-libp2p
    negotiate this way), and every stream we open names exactly one protocol. A warm
    client opens a stream per job, so this is a round trip off every job."""

    async def select_one_of(self, protocols, communicator, negotiate_timeout: int = 30):
        if len(protocols) != 1:
            return await super().select_one_of(protocols, communicator, negotiate_timeout)
        (protocol,) = protocols
        with trio.move_on_after(negotiate_timeout):
            try:
                await communicator.write(MULTISELECT_PROTOCOL_ID)
                await communicator.write(protocol)
                handshake = await communicator.read()
                answer = await communicator.read()
            except MultiselectCommunicatorError as exc:
                raise MultiselectClientError(f"negotiating {protocol}: {exc}") from exc
            if handshake != MULTISELECT_PROTOCOL_ID:
                raise MultiselectClientError(f"multistream handshake answered {handshake!r}")
            if answer == protocol:
                return protocol
            if answer == PROTOCOL_NOT_FOUND_MSG:
                raise MultiselectClientError(f"the peer does not speak {protocol}")
            raise MultiselectClientError(f"asked for {protocol}, the peer answered {answer!r}")
        raise MultiselectClientError(f"negotiating {protocol} timed out after {negotiate_timeout}s")


def _forget_failed_dial(host, peer_id: ID) -> None:
    cache = getattr(host.get_network(), "_negative_peer_cache", None)
    if cache is not None:
        cache.evict(str(peer_id))


def _dial_error(exc: BaseException) -> str:
    """The root cause of a dial failure in a few words (the library nests it deeply, in
    exception chains, groups and its own MultiError)."""
    pending, seen = [exc], set()
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, (TimeoutError, trio.TooSlowError)):
            return "timed out"
        if isinstance(e, OSError) and e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "host unreachable"
        pending += [e.__cause__, e.__context__, *getattr(e, "exceptions", ()), *getattr(e, "errors", ())]
    return "no answer"


def check_listen_addrs(addrs: list[str]) -> None:
    """Raise ListenError for an address we cannot listen on. The library binds with
    SO_REUSEPORT, so without this a second node on a taken port starts and shares it."""
    for addr in addrs:
        try:
            maddr = multiaddr.Multiaddr(addr)
            host = maddr.value_for_protocol("ip4") if "/ip4/" in addr else maddr.value_for_protocol("ip6")
            port = int(maddr.value_for_protocol("tcp"))
        except Exception:  # noqa: BLE001 - multiaddr raises many types for bad text
            raise ListenError(f"bad listen address {addr!r}: expected e.g. /ip4/0.0.0.0/tcp/4001") from None
        if port == 0:
            continue
        family = socket.AF_INET6 if "/ip6/" in addr else socket.AF_INET
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may leave TIME_WAIT
            probe.bind((host, port))
        except OSError as exc:
            why = "already in use (is another node running there?)" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ListenError(f"cannot listen on {addr}: port {port} {why}") from None
        finally:
            probe.close()


def check_peer_addr(addr: str) -> str:
    """The peer id of a dialable address such as /ip4/1.2.3.4/tcp/4000/p2p/12D3Koo...;
    ValueError with a one-line reason otherwise."""
    if "/p2p/" not in addr:
        raise ValueError(f"address {addr!r} has no /p2p/<peer id>: copy the whole address the node printed at start")
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(addr)).peer_id.to_base58()
    except Exception:  # noqa: BLE001 - multiaddr and the peer id parser raise many types
        raise ValueError(f"address {addr!r} is not a valid multiaddr with a peer id") from None


def check_offer_addr(addr: str, peer_id: str) -> None:
    """An address in an offer must parse, and name no other peer than the offer's;
    ValueError otherwise (the offer is dropped before it enters any book)."""
    try:
        maddr = multiaddr.Multiaddr(addr)
        named = info_from_p2p_addr(maddr).peer_id.to_base58() if "/p2p/" in addr else peer_id
    except Exception:  # noqa: BLE001 - multiaddr and the peer id parser raise many types
        raise ValueError(f"address {addr[:200]!r} is not a valid multiaddr") from None
    if named != peer_id:
        raise ValueError(f"address {addr[:200]!r} names another peer than the offer's")


class ListenError(Exception):
    """A listen address that cannot be used; the message says which and why."""


class _InboundConnectionEnded(Exception):
    """Raised inside the library's inbound handler once its connection has closed."""


_HOLD_UNTIL_CLOSED = contextvars.ContextVar("idlemesh_hold_until_closed", default=False)


def _release_inbound_slots_on_close(host) -> None:
    """py-libp2p 0.8.1's inbound handler, after upgrading a connection, waits for the
    whole swarm to finish before it returns and gives back its inbound slot, so slots
    (max_connections - min_connections = 250) run out after 250 short-lived peers.
    Make that handler wait for its own connection instead: the upgrade, when called
    from the handler, waits until the connection closes and then ends the handler."""
    swarm = host.get_network()
    handle = swarm._do_handle_inbound_connection
    upgrade = swarm.upgrade_inbound_raw_conn

    async def handle_inbound(*args, **kwargs):
        _HOLD_UNTIL_CLOSED.set(True)  # this task only: each inbound connection has its own
        await handle(*args, **kwargs)

    async def upgrade_then_hold(raw_conn, maddr):
        muxed = await upgrade(raw_conn, maddr)
        if not _HOLD_UNTIL_CLOSED.get():
            return muxed  # other callers (hole punching) want the connection back
        closed = getattr(muxed, "event_closed", None)
        if closed is not None:
            await closed.wait()
        else:
            while not getattr(muxed, "is_closed", True):
                await trio.sleep(1.0)
        raise _InboundConnectionEnded()  # the handler closes the raw socket and returns its slot

    swarm._do_handle_inbound_connection = handle_inbound
    swarm.upgrade_inbound_raw_conn = upgrade_then_hold


async def _close_connections(host) -> None:
    for conns in list(host.get_network().connections.values()):
        for conn in list(conns) if isinstance(conns, (list, tuple, set)) else [conns]:
            try:
                await conn.close()
            except Exception as exc:  # noqa: BLE001 - best effort on the way out
                log.debug("closing a connection: %s", exc)


def _keep_own_and_connected_peers(host) -> None:
    """The library's peerstore holds at most 1,000 peers and evicts entries without
    addresses first, and our own entry has none: after 1,000 buyers had come and gone a
    bootstrap lost its own key, identify failed on every new connection and nobody could
    reach it. After each eviction, put back our own entry and those of connected peers."""
    store = host.get_peerstore()
    enforce = store._enforce_peer_limit

    def enforce_keeping_ours() -> None:
        keep = [host.get_id(), *host.get_network().connections]
        kept = {pid: store.peer_data_map[pid] for pid in keep if pid in store.peer_data_map}
        enforce()
        for pid, data in kept.items():
            store.peer_data_map.setdefault(pid, data)

    store._enforce_peer_limit = enforce_keeping_ours


def _peer_info(peer_id: str | None, addr: str) -> PeerInfo:
    try:
        maddr = multiaddr.Multiaddr(addr)
    except Exception:  # noqa: BLE001 - the multiaddr parser raises many types
        raise DecodeError(f"address {addr[:200]!r} is not a valid multiaddr") from None
    if "/p2p/" in addr:
        info = info_from_p2p_addr(maddr)
        if peer_id is not None and info.peer_id.to_base58() != peer_id:
            raise DecodeError(f"address {addr} names another peer than {peer_id}")
        return info
    if peer_id is None:
        raise DecodeError(f"address {addr} has no /p2p/ peer id")
    return PeerInfo(ID.from_base58(peer_id), [maddr])


async def _run_service(service, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with background_trio_service(service):
        task_status.started()
        await trio.sleep_forever()


def quiet_libp2p_logs(level: int = logging.CRITICAL) -> None:
    """libp2p logs normal events (a refused dial, a peer that left) at ERROR, once per
    attempt; our own lines say what matters, with the peer id."""
    logging.getLogger("libp2p").setLevel(level)
    logging.getLogger("multiaddr").setLevel(level)


@asynccontextmanager
async def open_p2p_node(seed: bytes, listen_addrs: list[str], *, announce: list[str] = ()) -> AsyncIterator[P2PNode]:
    """A running libp2p host with gossipsub. `seed` is the node's 32-byte Ed25519 seed;
    `announce`: addresses others reach us at (a port forward, a public name), given by
    the operator."""
    check_listen_addrs(listen_addrs)
    key_pair = create_new_key_pair(seed)
    noise_key = create_x25519_key_pair()
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=noise_key.private_key)},
        # min_connections=0: the library's auto-connector would otherwise keep dialing
        # peers it once knew (buyers long gone, addresses behind NAT) to hold 50 open.
        connection_config=ConnectionConfig(max_connections_per_peer=1, min_connections=0, low_watermark=0),
        listen_addrs=[multiaddr.Multiaddr(a) for a in listen_addrs],
    )
    gossipsub = GossipSub(
        protocols=[GOSSIPSUB_V11, GOSSIPSUB_V10],
        degree=6, degree_low=4, degree_high=12,
        heartbeat_interval=1,
        spam_protection_enabled=False,
        # The library keeps a copy of every message it forwards for each connected peer
        # not (yet) known to subscribe, in case its subscription is late: up to 100 for
        # 30 s, the whole list rebuilt per peer per message. Providers publish without
        # subscribing, so a bootstrap of 100 providers spent a quarter of its CPU there
        # (py-spy, 100-node devnet); a subscription late by more than 2 s misses only
        # what an offer sync on connect brings anyway.
        max_pending_messages_per_peer=PENDING_MESSAGES_PER_PEER, pending_messages_ttl=PENDING_MESSAGES_TTL_S,
    )
    host.multiselect_client = PipelinedMultiselectClient()
    _release_inbound_slots_on_close(host)
    _keep_own_and_connected_peers(host)
    pubsub = Pubsub(host, gossipsub, strict_signing=True)
    try:
        async with host.run([multiaddr.Multiaddr(a) for a in listen_addrs]):
            async with background_trio_service(pubsub), background_trio_service(gossipsub):
                await pubsub.wait_until_ready()
                async with trio.open_nursery() as nursery:
                    node = P2PNode(
                        host=host, pubsub=pubsub, peer_id=host.get_id().to_base58(),
                        listen_addrs=[str(a) for a in host.get_addrs()],
                        _nursery=nursery, announce=list(announce),
                    )
                    node.relay_client = RelayClient.for_host(host)
                    await nursery.start(_run_service, node.relay_client.protocol)
                    if os.environ.get(HOLE_PUNCH_ENV, "1") != "0":
                        node.hole_punch = HolePunch(host, on_direct=node._direct)
                        await nursery.start(_run_service, node.hole_punch)
                        nursery.start_soon(node.hole_punch.retry_exhausted)
                    try:
                        yield node
                    finally:
                        nursery.cancel_scope.cancel()
                        # Say goodbye on every connection: the library leaves the sockets
                        # open, and a peer would hold their resources until we exit.
                        with trio.move_on_after(2, shield=True):
                            await _close_connections(host)
                            # The library leaves its listening sockets open after the host
                            # stops: a node restarted in the same process could not bind.
                            for listener in list(host.get_network().listeners.values()):
                                try:
                                    await listener.close()
                                except Exception as exc:  # noqa: BLE001 - best effort on the way out
                                    log.debug("closing a listener: %s", exc)
    except BaseExceptionGroup as group:
        # Known shutdown race in py-libp2p (pubsub continuously_read_stream): harmless.
        rest = group.subgroup(lambda e: not (isinstance(e, RuntimeError) and "Nursery is closed" in str(e))
                              and not isinstance(e, trio.Cancelled))
        if rest is not None:
            raise rest
