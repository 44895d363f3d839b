"""Messages on direct streams (job and offer-sync protocols); pure, no I/O here.

Streams are authenticated by Noise, so these frames are not signed themselves; what
must be provable later (job request, receipt, acknowledgement) travels as a signed
envelope inside them. Every frame is a map with a `kind`.

Frames on the wire are a 4-byte big-endian length followed by that many bytes of
msgpack; `frame_length` checks a header against the reader's cap.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Union

from . import codec
from .errors import DecodeError
from .fields import Fields, bytes_item, hex_item, row, str_item
from .tensors import Tensor

FRAME_HEADER = struct.Struct(">I")
MAX_CONTROL_FRAME_BYTES = 64 * 1024
MAX_MODEL_BYTES = 256 * 1024 * 1024
MAX_SYNC_OFFERS = 4096
# A sync answer is paged: each page stays under this many bytes of offers (a page holds
# at least one offer), far under the frame cap, so no number of valid offers can make
# an answer too big to send.
SYNC_PAGE_BYTES = 1024 * 1024
MAX_WANT_MODELS = 64
MAX_WANT_PROVIDERS = 16
MAX_SYNC_DIGESTS = 256

ERROR_CODES = (
    "bad-request",      # the request did not decode or verify
    "wrong-provider",   # addressed to another provider
    "expired",          # outside its validity window
    "replay",           # this job id was seen before
    "unknown-model",    # the provider neither offers nor holds the model
    "model-invalid",    # the model bytes do not hash to the id, or do not load
    "model-unsupported",  # a valid model this runtime cannot run (opset, operator)
    "too-large",        # the model or the job's memory is over the provider's limits
    "withdrawn",        # the provider is not selling capacity now (owner busy, grid too dirty)
    "rate-limited",     # this peer opened job streams faster than the provider allows
    "bad-input",        # inputs do not fit the model
    "price",            # the job would cost more than its ceiling
    "busy",             # no slot before the request expires, or no room for its bytes now
    "deadline",         # its queue and compute would exceed the request's deadline_ms
    "settle-first",     # the buyer's unacked or rejected work is over the provider's credit
    "execution-failed", # onnxruntime failed on this model and input
    "timeout",          # the job ran past its timeout
    "internal",         # the provider failed for its own reasons
)


def frame_length(header: bytes, *, max_bytes: int) -> int:
    (length,) = FRAME_HEADER.unpack(header)
    if length > max_bytes:
        raise DecodeError(f"frame: length {length} exceeds the cap of {max_bytes}")
    return length


def frame(payload: bytes) -> bytes:
    return FRAME_HEADER.pack(len(payload)) + payload


@dataclass(frozen=True, slots=True)
class SubmitJob:
    request: bytes  # signed job-request envelope
    kind = "submit"


@dataclass(frozen=True, slots=True)
class NeedModel:
    sha256: str
    kind = "need-model"


@dataclass(frozen=True, slots=True)
class ModelBlob:
    sha256: str
    data: bytes
    kind = "model"


@dataclass(frozen=True, slots=True)
class Accepted:
    job_id: str
    queue_position: int
    backlog_ms: float | None = None  # the queue ahead of this job, in the device's ms
    kind = "accepted"


@dataclass(frozen=True, slots=True)
class JobResult:
    job_id: str
    outputs: tuple[Tensor, ...]
    receipt: bytes  # signed receipt envelope
    kind = "result"


@dataclass(frozen=True, slots=True)
class JobError:
    code: str
    message: str
    backlog_ms: float | None = None  # the provider's queue now, in its device's ms
    kind = "error"


@dataclass(frozen=True, slots=True)
class Ack:
    ack: bytes  # signed receipt-ack envelope
    kind = "ack"


RECEIPT_STATUSES = ("accepted", "rejected", "unacked", "missing")
MAX_SETTLE_ENTRIES = 4096
MAX_SETTLE_FRAME_BYTES = 4 << 20  # either frame of the settle protocol: 4,096 acks or entries fit


@dataclass(frozen=True, slots=True)
class Settled:
    """Provider -> buyer, after it applied the buyer's ack durably: the status it holds."""
    job_id: str
    status: str
    kind = "settled"


@dataclass(frozen=True, slots=True)
class HeldReceipt:
    job_id: str
    receipt_sha256: str  # "" when the status is "missing"
    status: str


@dataclass(frozen=True, slots=True)
class SettleAcks:
    """Buyer -> provider on the settle protocol: acks the provider may not hold yet."""
    acks: tuple[bytes, ...]
    kind = "settle-acks"


@dataclass(frozen=True, slots=True)
class SettleHeld:
    """Provider -> buyer: what it holds for each job named (after applying the acks), and
    the jobs of this buyer it holds receipts for that the buyer did not name."""
    entries: tuple[HeldReceipt, ...]
    unnamed: tuple[HeldReceipt, ...] = ()
    kind = "settle-held"


@dataclass(frozen=True, slots=True)
class OfferWant:
    """What a syncing peer asks for: offers of any of `models` (sha256 hex; empty: any),
    on any of `arches` (empty: any), at most `max_price_per_s` (None: any), from any of
    `providers` (peer ids; empty: any; a provider checking its own offer names itself)."""

    models: tuple[str, ...] = ()
    arches: tuple[str, ...] = ()
    max_price_per_s: float | None = None
    providers: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        wire = {"models": list(self.models), "arches": list(self.arches), "max_price_per_s": self.max_price_per_s}
        if self.providers:  # absent when empty: the map of earlier nodes, byte for byte
            wire["providers"] = list(self.providers)
        return wire

    @classmethod
    def from_wire(cls, value: Any, path: str) -> "OfferWant":
        f = Fields(value, path)
        return cls(tuple(f.list("models", hex_item(32), max_len=MAX_WANT_MODELS, default=[])),
                   tuple(f.list("arches", str_item(32), max_len=8, default=[])),
                   f.float("max_price_per_s", min=0.0, max=1e6, default=None),
                   tuple(f.list("providers", str_item(128), max_len=MAX_WANT_PROVIDERS, default=[])))


@dataclass(frozen=True, slots=True)
class OfferSync:
    """Both directions of offer sync, a page at a time on one stream.

    Asking: the sender's own signed offer (a receiver takes no one else's from a push),
    its reputation digests, what it wants, and `after`, the last peer id of the page it
    already has ("" for the first). Answering: a page of signed offers in peer-id order,
    `held_ms` (how long the answerer has held each provider's offers: a hint, unsigned),
    the digests it holds (first page only), and `more` when another page follows."""

    offers: tuple[bytes, ...]
    digests: tuple[bytes, ...] = ()
    want: OfferWant | None = None
    after: str = ""
    more: bool = False
    held_ms: tuple[int, ...] = ()
    kind = "offers"


StreamMessage = Union[SubmitJob, NeedModel, ModelBlob, Accepted, JobResult, JobError, Ack, OfferSync, Settled,
                      SettleAcks, SettleHeld]


def encode_message(msg: StreamMessage) -> bytes:
    if isinstance(msg, SubmitJob):
        body: dict[str, Any] = {"request": msg.request}
    elif isinstance(msg, NeedModel):
        body = {"sha256": msg.sha256}
    elif isinstance(msg, ModelBlob):
        body = {"sha256": msg.sha256, "data": msg.data}
    elif isinstance(msg, Accepted):
        body = {"job_id": msg.job_id, "queue_position": msg.queue_position}
        if msg.backlog_ms is not None:  # absent, not nil: frames without it keep their bytes
            body["backlog_ms"] = msg.backlog_ms
    elif isinstance(msg, JobResult):
        body = {"job_id": msg.job_id, "outputs": [t.to_wire() for t in msg.outputs], "receipt": msg.receipt}
    elif isinstance(msg, JobError):
        body = {"code": msg.code, "message": msg.message}
        if msg.backlog_ms is not None:
            body["backlog_ms"] = msg.backlog_ms
    elif isinstance(msg, Ack):
        body = {"ack": msg.ack}
    elif isinstance(msg, OfferSync):
        body = {"offers": list(msg.offers), "digests": list(msg.digests), "after": msg.after, "more": msg.more,
                "held_ms": list(msg.held_ms)}
        if msg.want is not None:
            body["want"] = msg.want.to_wire()
    elif isinstance(msg, Settled):
        body = {"job_id": msg.job_id, "status": msg.status}
    elif isinstance(msg, SettleAcks):
        body = {"acks": list(msg.acks)}
    elif isinstance(msg, SettleHeld):
        body = {"entries": [_held_to_wire(e) for e in msg.entries],
                "unnamed": [_held_to_wire(e) for e in msg.unnamed]}
    else:  # pragma: no cover - a programming error, not peer input
        raise TypeError(f"not a stream message: {msg!r}")
    body["kind"] = msg.kind
    return codec.encode(body)


# Signed envelopes carried in lists: offers and reputation digests, and acks.
_offer_bytes = _digest_bytes = bytes_item(64 * 1024)


def _held_ms_item(value: Any, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 53:
        raise DecodeError(f"{path}: expected a non-negative int, got {type(value).__name__}")
    return value
_ack_bytes = bytes_item(8 * 1024)


def _held_to_wire(e: HeldReceipt) -> list:
    return [e.job_id, e.receipt_sha256, e.status]


def _held_from_wire(value: Any, path: str) -> HeldReceipt:
    f = row(value, ("job_id", "receipt_sha256", "status"), path)
    job_id = f.hex("job_id", size=16)
    sha = f.hex("receipt_sha256", size=32) if f.str("receipt_sha256", max_len=64) else ""  # "": missing
    return HeldReceipt(job_id, sha, f.str("status", choices=RECEIPT_STATUSES))


def decode_message(data: bytes, *, max_bytes: int, expect: tuple[str, ...]) -> StreamMessage:
    """Decode one frame's payload; `expect` lists the kinds legal at this point of the stream."""
    f = Fields(codec.decode(data, max_bytes=max_bytes, what="frame"), "frame")
    kind = f.str("kind", max_len=32)
    if kind not in expect:
        raise DecodeError(f"frame.kind: expected {'/'.join(expect)}, got {kind!r}")
    if kind == "submit":
        return SubmitJob(f.bytes("request", max_len=max_bytes))
    if kind == "need-model":
        return NeedModel(f.hex("sha256", size=32))
    if kind == "model":
        return ModelBlob(f.hex("sha256", size=32), f.bytes("data", max_len=MAX_MODEL_BYTES))
    if kind == "accepted":
        return Accepted(f.hex("job_id", size=16), f.int("queue_position", min=0, max=1 << 20),
                        f.float("backlog_ms", min=0.0, max=1e9, default=None))
    if kind == "result":
        return JobResult(f.hex("job_id", size=16),
                         tuple(f.list("outputs", Tensor.from_wire, max_len=64)),
                         f.bytes("receipt", max_len=8 * 1024))
    if kind == "error":
        return JobError(f.str("code", choices=ERROR_CODES), f.str("message", max_len=2048),
                        f.float("backlog_ms", min=0.0, max=1e9, default=None))
    if kind == "ack":
        return Ack(f.bytes("ack", max_len=8 * 1024))
    if kind == "offers":
        offers = tuple(f.list("offers", _offer_bytes, max_len=MAX_SYNC_OFFERS))
        held_ms = tuple(f.list("held_ms", _held_ms_item, max_len=MAX_SYNC_OFFERS, default=[]))
        if held_ms and len(held_ms) != len(offers):
            raise DecodeError(f"frame.held_ms: {len(held_ms)} items for {len(offers)} offers")
        want = f.raw("want", default=None)
        return OfferSync(offers, tuple(f.list("digests", _digest_bytes, max_len=MAX_SYNC_DIGESTS, default=[])),
                         None if want is None else OfferWant.from_wire(want, "frame.want"),
                         f.str("after", max_len=128, default=""), f.bool("more", default=False), held_ms)
    if kind == "settled":
        return Settled(f.hex("job_id", size=16), f.str("status", choices=RECEIPT_STATUSES))
    if kind == "settle-acks":
        return SettleAcks(tuple(f.list("acks", _ack_bytes, max_len=MAX_SETTLE_ENTRIES)))
    if kind == "settle-held":
        return SettleHeld(tuple(f.list("entries", _held_from_wire, max_len=MAX_SETTLE_ENTRIES)),
                          tuple(f.list("unnamed", _held_from_wire, max_len=MAX_SETTLE_ENTRIES, default=[])))
    raise DecodeError(f"frame.kind: unknown kind {kind!r}")
