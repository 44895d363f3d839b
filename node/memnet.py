"""An in-memory `node.net.Network`: many nodes in one trio run, for tests of the protocol
under `trio.testing.MockClock`. Not a transport anyone deploys.

What it keeps of the real network: peers are reachable only while their node is open
and only through an address that names them; a stream is a pair of frame queues with
the same caps and read timeouts as a libp2p stream; a node that closes resets its
streams and drops its connections, so the peer sees StreamClosed mid-job; gossip
floods connected subscribers, runs each receiver's validator before delivering and
forwarding, and drops duplicates. What it leaves out: latency (unless `send_delay_s`),
bandwidth, NAT, and the library's faults (those are node/p2p's business and tested
with real processes).
"""

from __future__ import annotations

import itertools
import logging
import math
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

import trio

from protocol.errors import DecodeError
from protocol.signing import SigningKey

from .net import Admit, FrameRefused, StreamClosed, StreamHandler, Validator

log = logging.getLogger("idlemesh.memnet")
RECONNECT_S = 0.5


class MemoryStream:
    """One end of an in-memory stream: frames (payloads) in order, EOF on close."""

    def __init__(self, remote_peer_id: str, inbox: trio.MemoryReceiveChannel, outbox: trio.MemorySendChannel,
                 *, send_delay_s: float = 0.0):
        self.remote_peer_id = remote_peer_id
        self._inbox = inbox
        self._outbox = outbox
        self.send_delay_s = send_delay_s

    async def receive(self, *, max_bytes: int, timeout_s: float, admit: Admit | None = None) -> bytes:
        with trio.fail_after(timeout_s):
            try:
                payload = await self._inbox.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError):
                raise StreamClosed(f"stream from {self.remote_peer_id} closed") from None
        if len(payload) > max_bytes:
            raise DecodeError(f"frame: length {len(payload)} exceeds the cap of {max_bytes}")
        if admit is not None and not admit(len(payload)):
            raise FrameRefused(len(payload))
        return payload

    async def send(self, payload: bytes, *, timeout_s: float = 30.0) -> None:
        if self.send_delay_s:
            await trio.sleep(self.send_delay_s)
        # As a real stream's write: a sender already cancelled sends nothing.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._outbox.send_nowait(payload)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise StreamClosed(f"stream to {self.remote_peer_id} closed") from None

    async def send_raw(self, data: bytes) -> None:
        await self.send(data)

    async def aclose(self) -> None:
        self._outbox.close()
        self._inbox.close()

    async def reset(self) -> None:
        await self.aclose()


def _stream_pair(a: str, b: str, *, delay_a: float, delay_b: float) -> tuple[MemoryStream, MemoryStream]:
    """Two ends: the one held by `a` (talking to b) and the one held by `b`."""
    a_to_b_send, a_to_b_receive = trio.open_memory_channel[bytes](math.inf)
    b_to_a_send, b_to_a_receive = trio.open_memory_channel[bytes](math.inf)
    return (MemoryStream(b, b_to_a_receive, a_to_b_send, send_delay_s=delay_a),
            MemoryStream(a, a_to_b_receive, b_to_a_send, send_delay_s=delay_b))


@dataclass
class MemoryNode:
    network: "MemoryNetwork"
    peer_id: str
    listen_addrs: list[str]
    _nursery: trio.Nursery
    links: dict[str, dict] = field(default_factory=dict)
    send_delay_s: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)
    _handlers: dict[str, StreamHandler] = field(default_factory=dict)
    _validators: dict[str, Validator] = field(default_factory=dict)
    _subscribers: dict[str, list[trio.MemorySendChannel]] = field(default_factory=dict)
    _connected: set[str] = field(default_factory=set)
    _streams: list[MemoryStream] = field(default_factory=list)
    _seen: set[tuple[str, int]] = field(default_factory=set)
    _first_dial_done: dict[str, trio.Event] = field(default_factory=dict)

    # --- gossip -----------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes) -> None:
        message_id = (self.peer_id, next(self.network.sequence))
        self._seen.add(message_id)
        self._forward(topic, self.peer_id, data, message_id, came_from=None)

    def _forward(self, topic: str, origin: str, data: bytes, message_id, came_from: str | None) -> None:
        for peer_id in sorted(self._connected):
            peer = self.network.nodes.get(peer_id)
            if peer is not None and peer_id != came_from and topic in peer._subscribers:
                peer._nursery.start_soon(peer._receive_gossip, topic, origin, data, message_id, self.peer_id)

    async def _receive_gossip(self, topic: str, origin: str, data: bytes, message_id, via: str) -> None:
        if message_id in self._seen or origin == self.peer_id:
            return
        self._seen.add(message_id)
        validator = self._validators.get(topic)
        if validator is not None and not validator(origin, data):
            return
        for channel in self._subscribers.get(topic, ()):
            channel.send_nowait((origin, data))
        self._forward(topic, origin, data, message_id, came_from=via)

    @asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[trio.MemoryReceiveChannel]:
        send, receive = trio.open_memory_channel[tuple[str, bytes]](math.inf)
        self._subscribers.setdefault(topic, []).append(send)
        try:
            yield receive
        finally:
            self._subscribers[topic].remove(send)

    def set_validator(self, topic: str, validator: Validator) -> None:
        self._validators[topic] = validator

    def subscribes(self, peer_id: str, topic: str) -> bool:
        return peer_id in self._connected and topic in getattr(self.network.nodes.get(peer_id), "_subscribers", {})

    async def redial(self, peer_id: str) -> None:
        peer = self.network.nodes.get(peer_id)
        self._connected.discard(peer_id)  # the reconnect loop dials it again
        if peer is not None:
            peer._connected.discard(self.peer_id)

    async def wait_for_subscription(self, peer_id: str, topic: str, timeout_s: float = 10.0) -> None:
        with trio.fail_after(timeout_s):
            while topic not in getattr(self.network.nodes.get(peer_id), "_subscribers", {}):
                await trio.sleep(0.05)

    # --- direct streams ---------------------------------------------------------------

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self._handlers[protocol] = handler

    async def connect(self, peer_id: str, addrs=(), *, timeout_s: float = 10.0) -> None:
        peer = self.network.nodes.get(peer_id)
        if peer is None or peer is self or (addrs and not any(a in peer.listen_addrs for a in addrs)
                                            and peer_id not in self._connected):
            raise StreamClosed(f"cannot connect to {peer_id}: connection refused")
        self._connected.add(peer_id)
        peer._connected.add(self.peer_id)

    @asynccontextmanager
    async def open_stream(self, peer_id: str, addrs, protocol: str, *,
                          timeout_s: float = 10.0) -> AsyncIterator[MemoryStream]:
        if peer_id not in self._connected:
            await self.connect(peer_id, addrs, timeout_s=timeout_s)
        peer = self.network.nodes.get(peer_id)
        handler = peer._handlers.get(protocol) if peer is not None else None
        if handler is None:
            raise StreamClosed(f"could not open {protocol} to {peer_id}: protocol not supported")
        ours, theirs = _stream_pair(self.peer_id, peer_id, delay_a=self.send_delay_s, delay_b=peer.send_delay_s)
        self._streams.append(ours)
        peer._streams.append(theirs)
        peer._nursery.start_soon(peer._serve, handler, theirs)
        try:
            yield ours
        finally:
            await ours.aclose()
            self._streams.remove(ours)

    async def _serve(self, handler: StreamHandler, stream: MemoryStream) -> None:
        try:
            await handler(stream)
        finally:
            await stream.aclose()
            if stream in self._streams:
                self._streams.remove(stream)

    def mesh_peers(self, topic: str) -> list[str]:
        return sorted(p for p in self._connected if topic in getattr(self.network.nodes.get(p), "_subscribers", {}))

    def connected_peers(self) -> list[str]:
        return sorted(self._connected)

    # --- lifetime ---------------------------------------------------------------------

    def keep_connected(self, addrs: list[str], *, on_connect=None) -> None:
        for addr in addrs:
            self._nursery.start_soon(self._reconnect_loop, addr, on_connect)

    # In memory every node reaches every other: no NAT, no relays.
    def offer_addrs(self) -> list[str]:
        return list(self.listen_addrs)

    def reach_status(self) -> dict:
        return {"state": "public", "how": "in-memory network: every node reaches every other"}

    def serve_relay(self) -> None:
        pass

    async def track_reachability(self, relay_addrs, on_change, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    async def first_dials(self, addrs: list[str], timeout_s: float = 12.0) -> dict[str, str]:
        with trio.move_on_after(timeout_s):
            for addr in addrs:
                await self._first_dial_done.setdefault(addr, trio.Event()).wait()
        return {link["addr"]: link.get("last_error") or "no answer yet"
                for link in self.links.values() if not link.get("connected")}

    async def _reconnect_loop(self, addr: str, on_connect) -> None:
        peer_id = addr.rsplit("/p2p/", 1)[-1]
        first = self._first_dial_done.setdefault(addr, trio.Event())
        while True:
            if peer_id not in self._connected:
                self.links[peer_id] = {**self.links.get(peer_id, {}), "addr": addr, "connected": False}
                try:
                    await self.connect(peer_id, [addr])
                except StreamClosed as exc:
                    self.links[peer_id].update(last_error=str(exc).rsplit(": ", 1)[-1])
                    first.set()
                    await trio.sleep(RECONNECT_S)
                    continue
                self.links[peer_id].update(connected=True, last_error=None)
                first.set()
                if on_connect is not None:
                    self._nursery.start_soon(on_connect, peer_id)
            await trio.sleep(RECONNECT_S)

    async def _close(self) -> None:
        for stream in list(self._streams):
            await stream.reset()
        for peer_id in self._connected:
            peer = self.network.nodes.get(peer_id)
            if peer is not None:
                peer._connected.discard(self.peer_id)
        self._connected.clear()


class MemoryNetwork:
    """The registry of open nodes; `open_node` has the signature of `open_p2p_node`."""

    def __init__(self):
        self.nodes: dict[str, MemoryNode] = {}
        self.sequence = itertools.count()
        self._hosts = itertools.count(1)
        self._addrs: dict[str, str] = {}  # a node that restarts comes back at its address
        self.send_delay_s: dict[str, float] = {}  # peer id -> delay on each frame it sends (a slow or paused peer)

    def address(self, peer_id: str) -> str:
        return self.nodes[peer_id].listen_addrs[0]

    @asynccontextmanager
    async def open_node(self, seed: bytes, listen_addrs: list[str]) -> AsyncIterator[MemoryNode]:
        peer_id = SigningKey(seed).peer_id
        if peer_id in self.nodes:
            raise StreamClosed(f"peer {peer_id} is already on this network")
        addr = self._addrs.setdefault(peer_id, f"/ip4/10.0.0.{next(self._hosts)}/tcp/4001/p2p/{peer_id}")
        async with trio.open_nursery() as nursery:
            node = MemoryNode(self, peer_id, [addr], nursery, send_delay_s=self.send_delay_s.get(peer_id, 0.0))
            self.nodes[peer_id] = node
            try:
                yield node
            finally:
                del self.nodes[peer_id]
                await node._close()
                nursery.cancel_scope.cancel()
