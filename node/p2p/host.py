"""Our adapter over py-libp2p 0.8.1, with the settings measured in shared/notes.

- gossipsub v1.1 only, heartbeat 1 s, library spam protection off (we validate and
  rate-limit ourselves), strict signing on;
- Noise is the only security transport (the library default also accepts plaintext);
- one connection per peer (otherwise every dial waits ~250 ms for happy-eyeballs);
- length-prefixed frames with a cap and a timeout on every read;
- our own reconnect loop for bootstrap peers, since the library does not redial and
  keeps failed peers in a 60 s negative cache;
- shutdown swallows the library's "Nursery is closed to new arrivals" race.
"""

from __future__ import annotations

import logging
import math
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
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_V10
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11 as GOSSIPSUB_V11
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from protocol.errors import DecodeError
from protocol.stream import FRAME_HEADER, frame, frame_length

log = logging.getLogger("idlemesh.p2p")

# Errors a stream can raise when the peer goes away; each becomes StreamClosed.
_STREAM_GONE = (LibStreamClosed, StreamEOF, StreamReset, StreamError, SwarmException, StreamFailure,trio.BrokenResourceError,
                trio.ClosedResourceError, ConnectionError, OSError)


class StreamClosed(Exception):
    """The peer closed or reset the stream, or the connection dropped."""


class FramedStream:
    """Length-prefixed frames over a libp2p stream, with a cap and a timeout per read."""

    def __init__(self, stream, remote_peer_id: str, *, send_delay_s: float = 0.0):
        self._stream = stream
        self.remote_peer_id = remote_peer_id
        self.send_delay_s = send_delay_s  # a simulated link: each frame we send waits this long

    async def _read_exactly(self, size: int) -> bytes:
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

    async def receive(self, *, max_bytes: int, timeout_s: float) -> bytes:
        """One frame's payload. Raises DecodeError (too big), StreamClosed, or trio.TooSlowError."""
        with trio.fail_after(timeout_s):
            header = await self._read_exactly(FRAME_HEADER.size)
            length = frame_length(header, max_bytes=max_bytes)
            return await self._read_exactly(length)

    async def send(self, payload: bytes, *, timeout_s: float = 30.0) -> None:
        if self.send_delay_s:
            await trio.sleep(self.send_delay_s)
        with trio.fail_after(timeout_s):
            try:
                await self._stream.write(frame(payload))
            except _STREAM_GONE as exc:
                raise StreamClosed(f"stream to {self.remote_peer_id} closed: {type(exc).__name__}") from None

    async def send_raw(self, data: bytes) -> None:
        """Bytes as they are, unframed: only for tests that play a hostile peer."""
        try:
            await self._stream.write(data)
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


StreamHandler = Callable[[FramedStream], Awaitable[None]]
Validator = Callable[[str, bytes], bool]


@dataclass
class P2PNode:
    """What the rest of idlemesh sees of the network."""

    host: object
    pubsub: Pubsub
    peer_id: str
    listen_addrs: list[str]
    _nursery: trio.Nursery
    counters: dict[str, int] = field(default_factory=dict)
    # Devnet links: frames this node sends on direct streams wait this long (a round
    # trip's worth of simulated distance); gossip is not delayed.
    send_delay_s: float = 0.0

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    # --- gossip -----------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes) -> None:
        await self.pubsub.publish(topic, data)

    @asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator["trio.MemoryReceiveChannel[tuple[str, bytes]]"]:
        """Messages on `topic` from other peers, as (origin peer id, data)."""
        subscription = await self.pubsub.subscribe(topic)
        send, receive = trio.open_memory_channel[tuple[str, bytes]](math.inf)
        own_id = self.peer_id

        async def pump() -> None:
            # Drain the library's 32-slot queue promptly; it drops when full.
            while True:
                message = await subscription.get()
                origin = ID(message.from_id).to_base58()
                if origin == own_id:  # py-libp2p delivers our own publishes back to us
                    continue
                send.send_nowait((origin, bytes(message.data)))

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
            return validator(origin, bytes(message.data))

        self.pubsub.set_topic_validator(topic, check, False)

    async def wait_for_subscription(self, peer_id: str, topic: str, timeout_s: float = 10.0) -> None:
        """Wait until `peer_id` has told us it subscribes to `topic` (event-based, no polling)."""
        pid = ID.from_base58(peer_id)
        await self.pubsub.wait_for_peer(pid, timeout=timeout_s)
        await self.pubsub.wait_for_subscription(pid, topic, timeout=timeout_s)

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
        infos = [_peer_info(peer_id, a) for a in addrs]
        if not infos:
            raise ConnectionError(f"no address for peer {peer_id}")
        with trio.fail_after(timeout_s):
            try:
                await self.host.connect(PeerInfo(infos[0].peer_id, [i.addrs[0] for i in infos]))
            except _STREAM_GONE as exc:
                raise StreamClosed(f"cannot connect to {peer_id}: {exc}") from None

    @asynccontextmanager
    async def open_stream(self, peer_id: str, addrs: list[str] | tuple[str, ...], protocol: str,
                          *, timeout_s: float = 10.0) -> AsyncIterator[FramedStream]:
        pid = ID.from_base58(peer_id)
        if addrs and not self.host.get_network().connections.get(pid):
            await self.connect(peer_id, addrs, timeout_s=timeout_s)
        with trio.fail_after(timeout_s):
            try:
                stream = await self.host.new_stream(pid, [TProtocol(protocol)])
            except _STREAM_GONE as exc:
                raise StreamClosed(f"could not open {protocol} to {peer_id}: {exc}") from None
        framed = FramedStream(stream, peer_id, send_delay_s=self.send_delay_s)
        try:
            yield framed
        finally:
            await framed.aclose()

    def connected_peers(self) -> list[str]:
        return [pid.to_base58() for pid in self.host.get_network().connections]

    # --- lifetime ---------------------------------------------------------------------

    def keep_connected(self, addrs: list[str], *, on_connect: Callable[[str], Awaitable[None]] | None = None) -> None:
        """Dial each bootstrap address now and again whenever the connection drops."""
        for addr in addrs:
            self._nursery.start_soon(self._reconnect_loop, addr, on_connect)

    async def _reconnect_loop(self, addr: str, on_connect) -> None:
        info = _peer_info(None, addr)
        delay_s = 0.2
        while True:
            network = self.host.get_network()
            if not network.connections.get(info.peer_id):
                # The library refuses redials for 60 s after a failure; forget that.
                cache = getattr(network, "_negative_peer_cache", None)
                if cache is not None and hasattr(cache, "pop"):
                    cache.pop(info.peer_id, None)
                try:
                    with trio.fail_after(10):
                        await self.host.connect(info)
                    delay_s = 0.2
                    log.info("connected to bootstrap %s", addr)
                    if on_connect is not None:
                        self._nursery.start_soon(on_connect, info.peer_id.to_base58())
                except (trio.TooSlowError, *_STREAM_GONE, Exception) as exc:  # noqa: BLE001 - dial errors are many and all mean "retry later"
                    log.info("bootstrap %s unreachable (%s); retrying in %.1f s", addr, type(exc).__name__, delay_s)
                    await trio.sleep(delay_s)
                    delay_s = min(delay_s * 2, 5.0)
                    continue
            await trio.sleep(1.0)


def _peer_info(peer_id: str | None, addr: str) -> PeerInfo:
    maddr = multiaddr.Multiaddr(addr)
    if "/p2p/" in addr:
        info = info_from_p2p_addr(maddr)
        if peer_id is not None and info.peer_id.to_base58() != peer_id:
            raise DecodeError(f"address {addr} names another peer than {peer_id}")
        return info
    if peer_id is None:
        raise DecodeError(f"address {addr} has no /p2p/ peer id")
    return PeerInfo(ID.from_base58(peer_id), [maddr])


def quiet_libp2p_logs(level: int = logging.ERROR) -> None:
    """libp2p warns loudly about normal events; keep operators' eyes on our own lines."""
    logging.getLogger("libp2p").setLevel(level)
    logging.getLogger("multiaddr").setLevel(level)


@asynccontextmanager
async def open_p2p_node(seed: bytes, listen_addrs: list[str]) -> AsyncIterator[P2PNode]:
    """A running libp2p host with gossipsub. `seed` is the node's 32-byte Ed25519 seed."""
    key_pair = create_new_key_pair(seed)
    noise_key = create_x25519_key_pair()
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=noise_key.private_key)},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        listen_addrs=[multiaddr.Multiaddr(a) for a in listen_addrs],
    )
    gossipsub = GossipSub(
        protocols=[GOSSIPSUB_V11, GOSSIPSUB_V10],
        degree=6, degree_low=4, degree_high=12,
        heartbeat_interval=1,
        spam_protection_enabled=False,
    )
    pubsub = Pubsub(host, gossipsub, strict_signing=True)
    try:
        async with host.run([multiaddr.Multiaddr(a) for a in listen_addrs]):
            async with background_trio_service(pubsub), background_trio_service(gossipsub):
                await pubsub.wait_until_ready()
                async with trio.open_nursery() as nursery:
                    node = P2PNode(
                        host=host, pubsub=pubsub, peer_id=host.get_id().to_base58(),
                        listen_addrs=[str(a) for a in host.get_addrs()],
                        _nursery=nursery,
                    )
                    try:
                        yield node
                    finally:
                        nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Known shutdown race in py-libp2p (pubsub continuously_read_stream): harmless.
        rest = group.subgroup(lambda e: not (isinstance(e, RuntimeError) and "Nursery is closed" in str(e))
                              and not isinstance(e, trio.Cancelled))
        if rest is not None:
            raise rest
