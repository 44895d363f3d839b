"""Ed25519 envelopes over canonical bytes, one domain string per message type (pure).

An envelope carries the signed body as bytes. Verification runs over exactly those
received bytes under the domain of the type the reader expects, so a signature made
for one message type can never verify as another, and nothing is re-encoded to check.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from . import codec
from .errors import DecodeError, LocalProtocolError, SignatureError
from .fields import Fields

ENVELOPE_VERSION = 1

# Each message type that is signed has its own domain. Appending a type is fine;
# changing a domain string invalidates every signature of that type.
DOMAINS: dict[str, bytes] = {
    "offer": b"idlemesh/v1/offer\x00",
    "job-request": b"idlemesh/v1/job-request\x00",
    "receipt": b"idlemesh/v1/receipt\x00",
    "receipt-ack": b"idlemesh/v1/receipt-ack\x00",
    "statement": b"idlemesh/v1/statement\x00",
    "dispute": b"idlemesh/v1/dispute\x00",
    "disagreements": b"idlemesh/v1/disagreements\x00",
    "reputation": b"idlemesh/v1/reputation\x00",
}


class SigningKey:
    """A node's Ed25519 key. Built from a 32-byte seed that the caller supplies."""

    __slots__ = ("_private", "public_key")

    def __init__(self, seed: bytes):
        if len(seed) != 32:
            raise LocalProtocolError(f"signing key seed must be 32 bytes, got {len(seed)}")
        self._private = Ed25519PrivateKey.from_private_bytes(seed)
        self.public_key: bytes = self._private.public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw
        )

    def sign(self, domain: bytes, body: bytes) -> bytes:
        return self._private.sign(domain + body)

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)


def verify(public_key: bytes, domain: bytes, body: bytes, signature: bytes) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, domain + body)
    except (InvalidSignature, ValueError):
        raise SignatureError("signature does not verify") from None


@dataclass(frozen=True, slots=True)
class Envelope:
    """A verified envelope: who signed which body bytes of which type."""

    type: str
    signer: bytes
    body: bytes
    signature: bytes


def seal(key: SigningKey, msg_type: str, body: bytes) -> bytes:
    """Sign `body` (canonical bytes of a message) and wrap it for the wire."""
    if msg_type not in DOMAINS:
        raise LocalProtocolError(f"no signing domain for message type {msg_type!r}")
    signature = key.sign(DOMAINS[msg_type], body)
    return codec.encode({
        "v": ENVELOPE_VERSION,
        "type": msg_type,
        "signer": key.public_key,
        "body": body,
        "sig": signature,
    })


def open_envelope(data: bytes, expected_type: str, *, max_bytes: int) -> Envelope:
    """Decode and verify an envelope of `expected_type`, or raise DecodeError/SignatureError."""
    raw = codec.decode(data, max_bytes=max_bytes, what=f"{expected_type} envelope")
    fields = Fields(raw, expected_type)
    version = fields.int("v")
    if version != ENVELOPE_VERSION:
        raise DecodeError(f"{expected_type}.v: expected {ENVELOPE_VERSION}, got {version}")
    msg_type = fields.str("type", max_len=64)
    if msg_type != expected_type:
        raise DecodeError(f"{expected_type}.type: expected {expected_type!r}, got {msg_type!r}")
    signer = fields.bytes("signer", size=32)
    body = fields.bytes("body", max_len=max_bytes)
    signature = fields.bytes("sig", size=64)
    verify(signer, DOMAINS[expected_type], body, signature)
    # One message, one encoding: a signed envelope or body in any other form is refused,
    # so its sha256 (receipt ids in acks, ledgers, disputes) names exactly one message.
    codec.check_canonical(data, f"{expected_type} envelope")
    codec.check_canonical(body, f"{expected_type} body")
    return Envelope(msg_type, signer, body, signature)


# --- libp2p peer ids, derived purely so a relayed offer's peer id can be checked ------

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _base58(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    out = ""
    while number:
        number, rem = divmod(number, 58)
        out = _B58[rem] + out
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + out


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id of an Ed25519 key: identity multihash of the protobuf key."""
    if len(public_key) != 32:
        raise DecodeError(f"public key: expected 32 bytes, got {len(public_key)}")
    protobuf_key = b"\x08\x01\x12\x20" + public_key  # KeyType=Ed25519, Data=32 bytes
    return _base58(b"\x00" + bytes([len(protobuf_key)]) + protobuf_key)
