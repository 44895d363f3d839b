"""The only package that imports libp2p. Everything else sees `P2PNode` and `FramedStream`."""

from .host import (
    FramedStream, ListenError, P2PNode, StreamClosed, check_listen_addrs, check_offer_addr, check_peer_addr,
    open_p2p_node,
)

__all__ = ["FramedStream", "ListenError", "P2PNode", "StreamClosed", "check_listen_addrs", "check_offer_addr", "check_peer_addr", "open_p2p_node"]
