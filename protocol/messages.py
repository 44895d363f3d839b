"""Wire messages of idlemesh v1 (pure; no I/O, no clock here).

Each message is a frozen dataclass with `to_wire()` (plain data for the canonical
codec) and `from_wire(value, path)` that checks every field's type, range and size.
Schema evolution: new fields get defaults and are appended; nothing is reordered or
reused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import codec
from .errors import DecodeError, ExpiredError
from .fields import Fields, row, str_item
from .pricing import batch_job_s
from .signing import Envelope, SigningKey, open_envelope, peer_id_from_public_key, seal
from .tensors import Tensor

# The architectures an offer may name and a job may ask for: the one list (matcher,
# config flags and devnet fleets import it).
ARCHES = ("cuda", "arm64", "x86_64")
# How a power or energy figure was obtained. `estimated` means taken from a table of
# published device figures, not from this machine.
POWER_SOURCES = ("measured-nvml", "measured-rapl", "declared", "estimated", "simulated")
THROUGHPUT_SOURCES = ("measured", "simulated", "declared")
MAX_MODELS_PER_OFFER = 256
MAX_ADDRS = 16
MAX_OFFER_BYTES = 64 * 1024
# The longest offer lifetime a receiver accepts: a provider that stops is gone from every
# book within it (node.config's offer_ttl_s range ends here).
MAX_OFFER_TTL_MS = 120_000
MAX_REQUEST_BYTES = 80 * 1024 * 1024
MAX_RECEIPT_BYTES = 8 * 1024
MAX_INPUTS = 16
# A micro-batched job carries at most this many members (JobRequest.parts), so its
# receipt, one hash pair per member, stays within MAX_RECEIPT_BYTES.
MAX_PARTS = 32


# --- offers ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PowerProfile:
    idle_w: float
    busy_w: float
    marginal_w_per_slot: float
    idle_source: str
    busy_source: str
    marginal_source: str

    def to_wire(self) -> dict[str, Any]:
        return {"idle_w": self.idle_w, "busy_w": self.busy_w,
                "marginal_w_per_slot": self.marginal_w_per_slot,
                "idle_source": self.idle_source, "busy_source": self.busy_source,
                "marginal_source": self.marginal_source}

    @classmethod
    def from_wire(cls, value: Any, path: str) -> "PowerProfile":
        f = Fields(value, path)
        return cls(
            idle_w=f.float("idle_w", min=0.0, max=1e5),
            busy_w=f.float("busy_w", min=0.0, max=1e5),
            marginal_w_per_slot=f.float("marginal_w_per_slot", min=0.0, max=1e5),
            idle_source=f.str("idle_source", choices=POWER_SOURCES),
            busy_source=f.str("busy_source", choices=POWER_SOURCES),
            marginal_source=f.str("marginal_source", choices=POWER_SOURCES),
        )


@dataclass(frozen=True, slots=True)
class Device:
    arch: str
    name: str
    memory_mb: int

    def to_wire(self) -> dict[str, Any]:
        return {"arch": self.arch, "name": self.name, "memory_mb": self.memory_mb}

    @classmethod
    def from_wire(cls, value: Any, path: str) -> "Device":
        f = Fields(value, path)
        return cls(f.str("arch", choices=ARCHES), f.str("name", max_len=128),
                   f.int("memory_mb", min=0, max=1 << 30))


@dataclass(frozen=True, slots=True)
class ModelCapability:
    """A model a provider runs, by content hash, with throughput in items/s per slot:
    `items_per_s` one item at a time, and `peak_items_per_s` (optional) what large
    batches approach. A job of n items then takes a fixed part plus n times the peak's
    per-item time (`job_s`): batching pays where the fixed part is large (GPUs)."""

    name: str
    sha256: str
    items_per_s: float
    throughput_source: str
    peak_items_per_s: float | None = None

    def to_wire(self) -> dict[str, Any]:
        wire = {"name": self.name, "sha256": self.sha256, "items_per_s": self.items_per_s,
                "throughput_source": self.throughput_source}
        if self.peak_items_per_s is not None:  # absent, not nil: offers without one keep their bytes
            wire["peak_items_per_s"] = self.peak_items_per_s
        return wire

    @classmethod
    def from_wire(cls, value: Any, path: str) -> "ModelCapability":
        f = Fields(value, path)
        rate = f.float("items_per_s", min=1e-9, max=1e9)
        return cls(f.str("name", max_len=128), f.hex("sha256", size=32), rate,
                   f.str("throughput_source", choices=THROUGHPUT_SOURCES),
                   f.float("peak_items_per_s", min=rate, max=1e9, default=None))

    def job_s(self, items: int) -> float:
        """Seconds one job of `items` rows takes on a slot (protocol.pricing.batch_job_s)."""
        return batch_job_s(items, self.items_per_s, self.peak_items_per_s)

    def rate(self, items: int) -> float:
        """Items/s a job of `items` rows sees."""
        return items / self.job_s(items)


@dataclass(frozen=True, slots=True)
class Offer:
    provider: bytes  # Ed25519 public key, 32 bytes
    peer_id: str
    addrs: tuple[str, ...]
    device: Device
    slots: int
    models: tuple[ModelCapability, ...]
    power: PowerProfile
    carbon_g_per_kwh: float
    carbon_source: str
    price_per_s: float
    backlog_ms: float
    issued_at_ms: int
    expires_at_ms: int
    idle_only: bool = False
    execution_provider: str = "CPUExecutionProvider"
    # False while the provider withdraws its capacity (owner busy, grid over its carbon
    # ceiling): the offer stays current so buyers learn it at once, but places nothing.
    available: bool = True
    carbon_ceiling_g_per_kwh: float | None = None
    # Set when the provider also runs models it does not list (sent by hash on demand):
    # the items/s it assumes for them, a conservative estimate from its slowest listed one.
    open_models_items_per_s: float | None = None
    # A simulated link's round trip (devnet), so placement sees the distance it will pay.
    link_rtt_ms: float | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "provider": self.provider, "peer_id": self.peer_id, "addrs": list(self.addrs),
            "device": self.device.to_wire(), "slots": self.slots,
            "models": [m.to_wire() for m in self.models], "power": self.power.to_wire(),
            "carbon_g_per_kwh": self.carbon_g_per_kwh, "carbon_source": self.carbon_source,
            "price_per_s": self.price_per_s, "backlog_ms": self.backlog_ms,
            "issued_at_ms": self.issued_at_ms, "expires_at_ms": self.expires_at_ms,
            "idle_only": self.idle_only, "execution_provider": self.execution_provider,
            "available": self.available, "carbon_ceiling_g_per_kwh": self.carbon_ceiling_g_per_kwh,
            "open_models_items_per_s": self.open_models_items_per_s, "link_rtt_ms": self.link_rtt_ms,
        }

    @classmethod
    def from_wire(cls, value: Any, path: str = "offer") -> "Offer":
        f = Fields(value, path)
        provider = f.bytes("provider", size=32)
        peer_id = f.str("peer_id", max_len=128)
        if peer_id != peer_id_from_public_key(provider):
            raise DecodeError(f"{path}.peer_id: does not derive from {path}.provider")
        issued = f.int("issued_at_ms", min=0)
        expires = f.int("expires_at_ms", min=0)
        if expires <= issued:
            raise DecodeError(f"{path}.expires_at_ms: expected > issued_at_ms ({issued}), got {expires}")
        models = tuple(f.list("models", ModelCapability.from_wire, max_len=MAX_MODELS_PER_OFFER))
        if len({m.sha256 for m in models}) != len(models):
            raise DecodeError(f"{path}.models: a model sha256 is listed twice")
        return cls(
            provider=provider, peer_id=peer_id,
            addrs=tuple(f.list("addrs", str_item(256), max_len=MAX_ADDRS)),
            device=Device.from_wire(f.raw("device"), f"{path}.device"),
            slots=f.int("slots", min=1, max=1024),
            models=models,
            power=PowerProfile.from_wire(f.raw("power"), f"{path}.power"),
            carbon_g_per_kwh=f.float("carbon_g_per_kwh", min=0.0, max=5000.0),
            carbon_source=f.str("carbon_source", max_len=128),
            price_per_s=f.float("price_per_s", min=0.0, max=1e6),
            backlog_ms=f.float("backlog_ms", min=0.0, max=1e9),
            issued_at_ms=issued, expires_at_ms=expires,
            idle_only=f.bool("idle_only", default=False),
            execution_provider=f.str("execution_provider", max_len=64, default="CPUExecutionProvider"),
            available=f.bool("available", default=True),
            carbon_ceiling_g_per_kwh=f.float("carbon_ceiling_g_per_kwh", min=0.0, max=5000.0, default=None),
            open_models_items_per_s=f.float("open_models_items_per_s", min=1e-9, max=1e9, default=None),
            link_rtt_ms=f.float("link_rtt_ms", min=0.0, max=1e6, default=None),
        )

    def model(self, sha256: str) -> ModelCapability | None:
        for m in self.models:
            if m.sha256 == sha256:
                return m
        return None

    def items_per_s(self, sha256: str, items: int = 1) -> float | None:
        """Throughput a job of `items` rows sees for a model: listed, else the
        open-model estimate, else None."""
        listed = self.model(sha256)
        return listed.rate(items) if listed else self.open_models_items_per_s


def sign_offer(key: SigningKey, offer: Offer) -> bytes:
    return seal(key, "offer", codec.encode(offer.to_wire()))


def open_offer(data: bytes, *, now_ms: int, max_ttl_ms: int = MAX_OFFER_TTL_MS,
               max_skew_ms: int = 30_000) -> Offer:
    """Verify a signed offer and its validity window at `now_ms`."""
    env = open_envelope(data, "offer", max_bytes=MAX_OFFER_BYTES)
    offer = Offer.from_wire(codec.decode(env.body, max_bytes=MAX_OFFER_BYTES, what="offer body"))
    if offer.provider != env.signer:
        raise DecodeError("offer.provider: is not the key that signed the offer")
    check_window("offer", offer.issued_at_ms, offer.expires_at_ms, now_ms=now_ms,
                 max_ttl_ms=max_ttl_ms, max_skew_ms=max_skew_ms)
    return offer


def check_window(what: str, issued_at_ms: int, expires_at_ms: int, *, now_ms: int,
                 max_ttl_ms: int, max_skew_ms: int) -> None:
    if expires_at_ms <= now_ms:
        raise ExpiredError(f"{what}: expired {now_ms - expires_at_ms} ms ago")
    if issued_at_ms > now_ms + max_skew_ms:
        raise ExpiredError(f"{what}: issued {issued_at_ms - now_ms} ms in the future (skew cap {max_skew_ms} ms)")
    if expires_at_ms - issued_at_ms > max_ttl_ms:
        raise ExpiredError(f"{what}: lifetime {expires_at_ms - issued_at_ms} ms exceeds {max_ttl_ms} ms")


# --- jobs -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobRequest:
    """What a buyer asks one provider to run; signed by the buyer."""

    job_id: str  # 16 random bytes, hex; also the receipt's id
    buyer: bytes
    provider: bytes
    model_sha256: str
    model_name: str
    inputs: tuple[Tensor, ...]
    items: int
    max_price: float
    issued_at_ms: int
    expires_at_ms: int
    timeout_ms: int = 60_000
    # The time the buyer still allows for queue and compute, counted from when the
    # provider reads the request (relative, so no two clocks need to agree). A provider
    # that cannot finish within it refuses at once (`deadline`). None: no deadline.
    deadline_ms: float | None = None
    # A micro-batch: the rows of each member request, in order along the batch axis of
    # every input; the receipt then commits to each member's inputs and outputs
    # (Receipt.parts), so each gets a share it can verify alone. None: one request.
    parts: tuple[int, ...] | None = None

    def to_wire(self) -> dict[str, Any]:
        wire = {
            "job_id": self.job_id, "buyer": self.buyer, "provider": self.provider,
            "model_sha256": self.model_sha256, "model_name": self.model_name,
            "inputs": [t.to_wire() for t in self.inputs], "items": self.items,
            "max_price": self.max_price, "issued_at_ms": self.issued_at_ms,
            "expires_at_ms": self.expires_at_ms, "timeout_ms": self.timeout_ms,
        }
        if self.deadline_ms is not None:  # absent, not nil: requests without one keep their bytes
            wire["deadline_ms"] = self.deadline_ms
        if self.parts is not None:
            wire["parts"] = list(self.parts)
        return wire

    @classmethod
    def from_wire(cls, value: Any, path: str = "job") -> "JobRequest":
        f = Fields(value, path)
        issued = f.int("issued_at_ms", min=0)
        expires = f.int("expires_at_ms", min=0)
        if expires <= issued:
            raise DecodeError(f"{path}.expires_at_ms: expected > issued_at_ms ({issued}), got {expires}")
        inputs = tuple(f.list("inputs", Tensor.from_wire, max_len=MAX_INPUTS))
        return cls(
            job_id=f.hex("job_id", size=16), buyer=f.bytes("buyer", size=32),
            provider=f.bytes("provider", size=32), model_sha256=f.hex("model_sha256", size=32),
            model_name=f.str("model_name", max_len=128),
            inputs=inputs,
            items=f.int("items", min=1, max=1 << 30),
            max_price=f.float("max_price", min=0.0, max=1e9),
            issued_at_ms=issued, expires_at_ms=expires,
            timeout_ms=f.int("timeout_ms", min=1, max=3_600_000, default=60_000),
            deadline_ms=f.float("deadline_ms", min=0.0, max=3.6e6, default=None),
            parts=_parts(f, inputs),
        )


def _parts(f: Fields, inputs: tuple[Tensor, ...]) -> tuple[int, ...] | None:
    raw = f.raw("parts", default=None)
    if raw is None:
        return None
    parts = tuple(f.list("parts", _part_rows, max_len=MAX_PARTS))
    total = sum(parts)
    if len(parts) < 2 or any(not t.shape or t.shape[0] != total for t in inputs):
        raise DecodeError(f"{f.path}.parts: expected 2-{MAX_PARTS} row counts summing to every input's "
                          f"leading axis, got {list(parts)} for inputs {[list(t.shape) for t in inputs]}")
    return parts


def _part_rows(value: Any, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1 << 30:
        raise DecodeError(f"{path}: expected a row count >= 1, got {value!r:.40}")
    return value


def sign_job_request(key: SigningKey, request: JobRequest) -> bytes:
    return seal(key, "job-request", codec.encode(request.to_wire()))


def open_job_request(data: bytes) -> tuple[Envelope, JobRequest]:
    env = open_envelope(data, "job-request", max_bytes=MAX_REQUEST_BYTES)
    request = JobRequest.from_wire(codec.decode(env.body, max_bytes=MAX_REQUEST_BYTES, what="job body"))
    if request.buyer != env.signer:
        raise DecodeError("job.buyer: is not the key that signed the request")
    return env, request


@dataclass(frozen=True, slots=True)
class ReceiptPart:
    """One member's share of a micro-batched job's receipt."""

    rows: int
    input_sha256: str
    output_sha256: str

    @classmethod
    def from_wire(cls, value: Any, path: str) -> "ReceiptPart":
        f = row(value, ("rows", "input_sha256", "output_sha256"), path)
        return cls(f.int("rows", min=1, max=1 << 30), f.hex("input_sha256", size=32),
                   f.hex("output_sha256", size=32))


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a provider did for a job; signed by the provider. Its id is the job id."""

    job_id: str
    buyer: bytes
    provider: bytes
    model_sha256: str
    input_sha256: str
    output_sha256: str
    queue_ms: float
    compute_ms: float
    energy_j: float
    energy_source: str
    price: float
    issued_at_ms: int
    execution_provider: str = "CPUExecutionProvider"
    # For a micro-batched job: each member's (rows, inputs sha256, outputs sha256), in
    # the request's order; a member checks its own rows against its entry alone.
    parts: tuple[ReceiptPart, ...] | None = None

    def to_wire(self) -> dict[str, Any]:
        wire = {
            "job_id": self.job_id, "buyer": self.buyer, "provider": self.provider,
            "model_sha256": self.model_sha256, "input_sha256": self.input_sha256,
            "output_sha256": self.output_sha256, "queue_ms": self.queue_ms,
            "compute_ms": self.compute_ms, "energy_j": self.energy_j,
            "energy_source": self.energy_source, "price": self.price,
            "issued_at_ms": self.issued_at_ms, "execution_provider": self.execution_provider,
        }
        if self.parts is not None:  # absent, not nil: receipts of single jobs keep their bytes
            wire["parts"] = [[p.rows, p.input_sha256, p.output_sha256] for p in self.parts]
        return wire

    @classmethod
    def from_wire(cls, value: Any, path: str = "receipt") -> "Receipt":
        f = Fields(value, path)
        return cls(
            job_id=f.hex("job_id", size=16), buyer=f.bytes("buyer", size=32),
            provider=f.bytes("provider", size=32), model_sha256=f.hex("model_sha256", size=32),
            input_sha256=f.hex("input_sha256", size=32), output_sha256=f.hex("output_sha256", size=32),
            queue_ms=f.float("queue_ms", min=0.0, max=1e9), compute_ms=f.float("compute_ms", min=0.0, max=1e9),
            energy_j=f.float("energy_j", min=0.0, max=1e12),
            energy_source=f.str("energy_source", choices=POWER_SOURCES),
            price=f.float("price", min=0.0, max=1e9), issued_at_ms=f.int("issued_at_ms", min=0),
            execution_provider=f.str("execution_provider", max_len=64, default="CPUExecutionProvider"),
            parts=(None if f.raw("parts", default=None) is None
                   else tuple(f.list("parts", ReceiptPart.from_wire, max_len=MAX_PARTS))),
        )


def sign_receipt(key: SigningKey, receipt: Receipt) -> bytes:
    return seal(key, "receipt", codec.encode(receipt.to_wire()))


def open_receipt(data: bytes) -> tuple[Envelope, Receipt]:
    env = open_envelope(data, "receipt", max_bytes=MAX_RECEIPT_BYTES)
    receipt = Receipt.from_wire(codec.decode(env.body, max_bytes=MAX_RECEIPT_BYTES, what="receipt body"))
    if receipt.provider != env.signer:
        raise DecodeError("receipt.provider: is not the key that signed the receipt")
    return env, receipt


@dataclass(frozen=True, slots=True)
class ReceiptAck:
    """The buyer's countersignature: accept, or reject with a reason."""

    job_id: str
    receipt_sha256: str  # sha256 of the receipt envelope's signed body bytes
    accepted: bool
    reason: str
    issued_at_ms: int

    def to_wire(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "receipt_sha256": self.receipt_sha256,
                "accepted": self.accepted, "reason": self.reason, "issued_at_ms": self.issued_at_ms}

    @classmethod
    def from_wire(cls, value: Any, path: str = "ack") -> "ReceiptAck":
        f = Fields(value, path)
        return cls(f.hex("job_id", size=16), f.hex("receipt_sha256", size=32), f.bool("accepted"),
                   f.str("reason", max_len=512), f.int("issued_at_ms", min=0))


def sign_receipt_ack(key: SigningKey, ack: ReceiptAck) -> bytes:
    return seal(key, "receipt-ack", codec.encode(ack.to_wire()))


def open_receipt_ack(data: bytes) -> tuple[Envelope, ReceiptAck]:
    env = open_envelope(data, "receipt-ack", max_bytes=MAX_RECEIPT_BYTES)
    return env, ReceiptAck.from_wire(codec.decode(env.body, max_bytes=MAX_RECEIPT_BYTES, what="ack body"))


@dataclass(frozen=True, slots=True)
class SignedReceipt:
    """A receipt as it travels and is stored: the exact signed bytes plus the parsed view."""

    envelope_bytes: bytes
    envelope: Envelope
    receipt: Receipt = field(compare=False)

    @classmethod
    def parse(cls, data: bytes) -> "SignedReceipt":
        env, receipt = open_receipt(data)
        return cls(data, env, receipt)

    @property
    def body_sha256(self) -> str:
        return codec.sha256_hex(self.envelope.body)
