"""The only package that imports libp2p. Everything else sees `P2PNode` and `FramedStream`."""

from .host import FramedStream, P2PNode, StreamClosed, open_p2p_node

__all__ = ["FramedStream", "P2PNode", "StreamClosed", "open_p2p_node"]
