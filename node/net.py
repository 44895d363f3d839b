"""The network as buyer, provider, bootstrap and gossip see it: publish, subscribe,
direct streams of frames, connect, peer id. No libp2p here.

`node/p2p` implements it over libp2p; `node/memnet` implements it in memory, so the
protocol's own tests run a buyer and providers in one process under MockClock. An
`open_network(seed, listen_addrs)` callable is what a node is given to get one.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import AsyncIterator, Awaitable, Callable, Protocol

import trio


class StreamClosed(Exception):
    """The peer closed or reset the stream, or the connection dropped."""


class FrameRefused(Exception):
    """A frame the reader's `admit` turned down by its length: its bytes were read and
    dropped, never held, and the stream is still usable for an answer."""

    def __init__(self, length: int):
        super().__init__(f"a frame of {length} bytes was not admitted")
        self.length = length


Admit = Callable[[int], bool]


class Stream(Protocol):
    """Frames over one direct stream, with a cap and a timeout on every read."""

    remote_peer_id: str

    async def receive(self, *, max_bytes: int, timeout_s: float, admit: Admit | None = None) -> bytes:
        """One frame's payload. Raises DecodeError (too big), StreamClosed or trio.TooSlowError;
        FrameRefused when `admit(length)`, asked before the body is read, says no."""

    async def send(self, payload: bytes, *, timeout_s: float = 30.0) -> None: ...

    async def aclose(self) -> None: ...

    async def reset(self) -> None: ...


StreamHandler = Callable[[Stream], Awaitable[None]]
Validator = Callable[[str, bytes], bool]


class Network(Protocol):
    peer_id: str
    listen_addrs: list[str]
    links: dict[str, dict]  # kept bootstrap links: peer id -> {addr, connected, last_error, ...}
    send_delay_s: float

    async def publish(self, topic: str, data: bytes) -> None: ...

    def subscribe(self, topic: str) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel]:
        """Messages on `topic` from other peers, as (origin peer id, data)."""

    def set_validator(self, topic: str, validator: Validator) -> None: ...

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None: ...

    async def connect(self, peer_id: str, addrs, *, timeout_s: float = 10.0) -> None: ...

    def open_stream(self, peer_id: str, addrs, protocol: str, *,
                    timeout_s: float = 10.0) -> AbstractAsyncContextManager[Stream]: ...

    def mesh_peers(self, topic: str) -> list[str]: ...

    async def wait_for_subscription(self, peer_id: str, topic: str, timeout_s: float = 10.0) -> None: ...

    def subscribes(self, peer_id: str, topic: str) -> bool:
        """Whether `peer_id` told us it subscribes to `topic` (what a publisher that does
        not subscribe needs to reach it)."""

    async def redial(self, peer_id: str) -> None:
        """Drop our connections to `peer_id`; the kept link dials it again."""

    def connected_peers(self) -> list[str]: ...

    def keep_connected(self, addrs: list[str], *, on_connect=None) -> None: ...

    async def first_dials(self, addrs: list[str], timeout_s: float = 12.0) -> dict[str, str]: ...

    def offer_addrs(self) -> list[str]:
        """The addresses our offer carries: direct ones that work, then relayed ones."""

    def reach_status(self) -> dict:
        """How others reach us ("public", "private" behind NAT, "unknown"), with a line for operators."""

    def serve_relay(self) -> None:
        """Relay circuits for nodes behind NAT and answer their dial-backs (bootstraps)."""

    async def track_reachability(self, relay_addrs: list[str], on_change, *, task_status=...) -> None:
        """Learn whether we are reachable; behind NAT, hold relay slots on `relay_addrs`."""


OpenNetwork = Callable[[bytes, list[str]], AbstractAsyncContextManager[Network]]
__all__ = ["Admit", "AsyncIterator", "FrameRefused", "Network", "OpenNetwork", "Stream", "StreamClosed", "StreamHandler", "Validator"]
