"""Settlement messages (pure): netted statements, disputes, reputation digests, and a
reader that verifies any signed idlemesh message offline.

Each is signed under its own domain (protocol/signing.py), so no signature of one type
can pass as another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import codec
from .errors import DecodeError
from .fields import Fields, row
from .messages import (
    MAX_OFFER_BYTES, MAX_RECEIPT_BYTES, Offer, Receipt, ReceiptAck, open_offer, open_receipt, open_receipt_ack,
)
from .signing import Envelope, SigningKey, open_envelope, seal

MAX_STATEMENT_BYTES = 8 * 1024
MAX_DIGEST_BYTES = 64 * 1024
MAX_DIGEST_ENTRIES = 512


@dataclass(frozen=True, slots=True)
class Statement:
    """The issuer's netted balance with one counterparty over a set of receipts.
    net_price > 0: the counterparty owes the issuer."""

    issuer: bytes
    counterparty: bytes
    receipts: int
    net_price: float
    energy_j: float
    receipts_sha256: str  # sha256 of the sorted receipt body hashes, concatenated
    as_of_ms: int

    def to_wire(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "counterparty": self.counterparty, "receipts": self.receipts,
                "net_price": self.net_price, "energy_j": self.energy_j,
                "receipts_sha256": self.receipts_sha256, "as_of_ms": self.as_of_ms}

    @classmethod
    def from_wire(cls, value: Any, path: str = "statement") -> "Statement":
        f = Fields(value, path)
        return cls(f.bytes("issuer", size=32), f.bytes("counterparty", size=32), f.int("receipts", min=0),
                   f.float("net_price", min=-1e15, max=1e15), f.float("energy_j", min=0.0, max=1e15),
                   f.hex("receipts_sha256", size=32), f.int("as_of_ms", min=0))


DISAGREEMENT_STATUSES = ("accepted", "rejected", "unacked", "missing")
MAX_DISAGREEMENTS = 4096


@dataclass(frozen=True, slots=True)
class Disagreement:
    job_id: str
    ours: str     # the issuer's status for this job's receipt (or "missing")
    theirs: str   # the counterparty's, as it answered a settle exchange
    same_receipt: bool

    def to_wire(self) -> list:
        return [self.job_id, self.ours, self.theirs, self.same_receipt]

    @classmethod
    def from_wire(cls, value: Any, path: str) -> "Disagreement":
        f = row(value, ("job_id", "ours", "theirs", "same_receipt"), path)
        return cls(f.hex("job_id", size=16), f.str("ours", choices=DISAGREEMENT_STATUSES),
                   f.str("theirs", choices=DISAGREEMENT_STATUSES), f.bool("same_receipt"))


@dataclass(frozen=True, slots=True)
class Disagreements:
    """After a settle exchange, the jobs on which two ledgers still differ: signed by the
    issuer, job by job, so a third party can see exactly what is contested."""

    issuer: bytes
    counterparty: bytes
    entries: tuple[Disagreement, ...]
    as_of_ms: int

    def to_wire(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "counterparty": self.counterparty,
                "entries": [e.to_wire() for e in self.entries], "as_of_ms": self.as_of_ms}

    @classmethod
    def from_wire(cls, value: Any, path: str = "disagreements") -> "Disagreements":
        f = Fields(value, path)
        return cls(f.bytes("issuer", size=32), f.bytes("counterparty", size=32),
                   tuple(f.list("entries", Disagreement.from_wire, max_len=MAX_DISAGREEMENTS)), f.int("as_of_ms", min=0))


@dataclass(frozen=True, slots=True)
class Dispute:
    """A buyer's claim that a provider's output disagrees with a second provider's."""

    job_id: str
    provider: bytes
    receipt_sha256: str
    check_provider: bytes
    check_receipt_sha256: str
    max_abs_diff: float
    tolerance: float
    issued_at_ms: int

    def to_wire(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "provider": self.provider, "receipt_sha256": self.receipt_sha256,
                "check_provider": self.check_provider, "check_receipt_sha256": self.check_receipt_sha256,
                "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance, "issued_at_ms": self.issued_at_ms}

    @classmethod
    def from_wire(cls, value: Any, path: str = "dispute") -> "Dispute":
        f = Fields(value, path)
        return cls(f.hex("job_id", size=16), f.bytes("provider", size=32), f.hex("receipt_sha256", size=32),
                   f.bytes("check_provider", size=32), f.hex("check_receipt_sha256", size=32),
                   f.float("max_abs_diff", min=0.0), f.float("tolerance", min=0.0), f.int("issued_at_ms", min=0))


@dataclass(frozen=True, slots=True)
class ReputationEntry:
    provider: bytes
    accepted: int
    rejected: int
    disputed: int

    def to_wire(self) -> list:
        return [self.provider, self.accepted, self.rejected, self.disputed]

    @classmethod
    def from_wire(cls, value: Any, path: str) -> "ReputationEntry":
        f = row(value, ("provider", "accepted", "rejected", "disputed"), path)
        return cls(f.bytes("provider", size=32), f.int("accepted", min=0), f.int("rejected", min=0),
                   f.int("disputed", min=0))


@dataclass(frozen=True, slots=True)
class ReputationDigest:
    """What one buyer saw of providers: counts of accepted, rejected, disputed receipts."""

    issuer: bytes
    entries: tuple[ReputationEntry, ...]
    issued_at_ms: int
    expires_at_ms: int

    def to_wire(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "entries": [e.to_wire() for e in self.entries],
                "issued_at_ms": self.issued_at_ms, "expires_at_ms": self.expires_at_ms}

    @classmethod
    def from_wire(cls, value: Any, path: str = "reputation") -> "ReputationDigest":
        f = Fields(value, path)
        return cls(f.bytes("issuer", size=32),
                   tuple(f.list("entries", ReputationEntry.from_wire, max_len=MAX_DIGEST_ENTRIES)),
                   f.int("issued_at_ms", min=0), f.int("expires_at_ms", min=0))


def _sign(key: SigningKey, kind: str, message) -> bytes:
    return seal(key, kind, codec.encode(message.to_wire()))


def sign_statement(key: SigningKey, statement: Statement) -> bytes:
    return _sign(key, "statement", statement)


def sign_disagreements(key: SigningKey, disagreements: Disagreements) -> bytes:
    return _sign(key, "disagreements", disagreements)


def open_disagreements(data: bytes) -> tuple[Envelope, Disagreements]:
    return _open(data, "disagreements", Disagreements, MAX_DIGEST_BYTES * 4, "issuer")


def sign_dispute(key: SigningKey, dispute: Dispute) -> bytes:
    return _sign(key, "dispute", dispute)


def sign_reputation(key: SigningKey, digest: ReputationDigest) -> bytes:
    return _sign(key, "reputation", digest)


def _open(data: bytes, kind: str, cls, max_bytes: int, signer_field: str | None) -> tuple[Envelope, Any]:
    env = open_envelope(data, kind, max_bytes=max_bytes)
    message = cls.from_wire(codec.decode(env.body, max_bytes=max_bytes, what=f"{kind} body"))
    if signer_field and getattr(message, signer_field) != env.signer:
        raise DecodeError(f"{kind}.{signer_field}: is not the key that signed it")
    return env, message


def open_statement(data: bytes) -> tuple[Envelope, Statement]:
    return _open(data, "statement", Statement, MAX_STATEMENT_BYTES, "issuer")


def open_dispute(data: bytes) -> tuple[Envelope, Dispute]:
    return _open(data, "dispute", Dispute, MAX_STATEMENT_BYTES, None)


def open_reputation(data: bytes) -> tuple[Envelope, ReputationDigest]:
    return _open(data, "reputation", ReputationDigest, MAX_DIGEST_BYTES, "issuer")


def receipts_digest(body_sha256s: list[str]) -> str:
    return codec.sha256_hex("".join(sorted(body_sha256s)).encode())


OPENERS = {
    "receipt": open_receipt, "receipt-ack": open_receipt_ack, "statement": open_statement,
    "dispute": open_dispute, "reputation": open_reputation, "disagreements": open_disagreements,
}


def open_any(data: bytes, *, now_ms: int) -> tuple[str, Envelope, Any]:
    """Verify any signed idlemesh message; (type, envelope, message) or DecodeError/SignatureError."""
    raw = codec.decode(data, max_bytes=max(MAX_OFFER_BYTES, MAX_DIGEST_BYTES * 4, MAX_RECEIPT_BYTES), what="envelope")
    kind = Fields(raw, "envelope").str("type", max_len=64)
    if kind == "offer":
        # An offer is also checked for its validity window, against the caller's clock.
        offer: Offer = open_offer(data, now_ms=now_ms)
        return kind, open_envelope(data, "offer", max_bytes=MAX_OFFER_BYTES), offer
    opener = OPENERS.get(kind)
    if opener is None:
        raise DecodeError(f"envelope.type: {kind!r} is not a message idlemesh signs")
    env, message = opener(data)
    return kind, env, message


__all__ = ["Statement", "Disagreement", "Disagreements", "sign_disagreements", "open_disagreements", "Dispute", "ReputationDigest", "ReputationEntry", "Receipt", "ReceiptAck",
           "sign_statement", "sign_dispute", "sign_reputation", "open_statement", "open_dispute",
           "open_reputation", "open_any", "receipts_digest"]
