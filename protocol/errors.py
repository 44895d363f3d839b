"""Error families of the protocol (pure; no I/O here).

Two families, as in h11: `DecodeError` is a remote peer (or a file) sending bytes that
break the protocol; `LocalProtocolError` is our own program misusing the protocol.
Everything from the network becomes a DecodeError, never another exception.
"""


class ProtocolError(Exception):
    """Base of every error this package raises on purpose."""


class DecodeError(ProtocolError):
    """Bytes or values from outside do not form a valid message. Says what was expected and what came."""


class SignatureError(DecodeError):
    """A signature does not verify over the received bytes under the expected domain."""


class ExpiredError(DecodeError):
    """A message is outside its validity window (expired, or dated too far ahead)."""


class LocalProtocolError(ProtocolError):
    """Our own code asked for something the protocol does not allow (an illegal transition, say)."""
