"""Write spec/vectors/*.json from the reference code: python spec/make_vectors.py [DIR].

Deterministic (keys from fixed seeds, fixed times; Ed25519 signatures are
deterministic), so the files change only when the wire does; tests/test_wire_spec.py
regenerates them and fails on any difference.

JSON cannot tell bytes from text or 1.0 from 1, so values are written typed: bytes as
{"bin": hex}, floats as {"float": x}; ints, str, bool, null, lists and maps as themselves.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from protocol import codec  # noqa: E402
from protocol.messages import (  # noqa: E402
    Device, JobRequest, ModelCapability, Offer, PowerProfile, Receipt, ReceiptAck, sign_job_request, sign_offer,
    sign_receipt, sign_receipt_ack,
)
from protocol.settlement import (  # noqa: E402
    Disagreement, Disagreements, Dispute, ReputationDigest, ReputationEntry, Statement, receipts_digest,
    sign_disagreements, sign_dispute, sign_reputation, sign_statement,
)
from protocol.signing import DOMAINS, SigningKey  # noqa: E402
from protocol.stream import (  # noqa: E402
    Accepted, Ack, HeldReceipt, JobError, JobResult, ModelBlob, NeedModel, OfferSync, OfferWant, SettleAcks,
    SettleHeld, Settled, SubmitJob, encode_message, frame,
)
from protocol.tensors import Tensor, tensors_sha256  # noqa: E402

NOW_MS = 1_800_000_000_000
SEEDS = {"provider": bytes(range(32)), "buyer": bytes(range(32, 64)), "other": bytes([7] * 32)}
KEYS = {name: SigningKey(seed) for name, seed in SEEDS.items()}
MODEL_SHA = hashlib.sha256(b"an example model").hexdigest()


def typed(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bin": value.hex()}
    if isinstance(value, float):
        return {"float": value}
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [typed(v) for v in value]
    return value


def tensors() -> tuple[Tensor, ...]:
    rng = np.random.default_rng(0)
    return (Tensor.from_array("x", rng.random((2, 3), dtype=np.float32)),
            Tensor.from_array("ids", np.array([[1, -2], [300, -40000]], dtype=np.int64)),
            Tensor.from_array("mask", np.array([True, False, True])),
            Tensor.from_array("half", np.array([0.5, -1.25], dtype=np.float16)))


def messages() -> dict[str, tuple[str, bytes, Any]]:
    """type -> (signer name, envelope bytes, message) for one example of each type."""
    p, b = KEYS["provider"], KEYS["buyer"]
    offer = Offer(
        provider=p.public_key, peer_id=p.peer_id, addrs=(f"/ip4/192.0.2.1/tcp/4001/p2p/{p.peer_id}",),
        device=Device("x86_64", "example cpu", 16384), slots=2,
        models=(ModelCapability("squeezenet", MODEL_SHA, 812.5, "measured"),),
        power=PowerProfile(11.0, 65.5, 24.25, "measured-rapl", "measured-rapl", "measured-rapl"),
        carbon_g_per_kwh=310.0, carbon_source="declared", price_per_s=0.0001, backlog_ms=0.0,
        issued_at_ms=NOW_MS, expires_at_ms=NOW_MS + 60_000, carbon_ceiling_g_per_kwh=None,
        open_models_items_per_s=40.0)
    inputs = tensors()[:2]
    request = JobRequest("0123456789abcdef0123456789abcdef", b.public_key, p.public_key, MODEL_SHA, "squeezenet",
                         inputs, 2, 0.01, NOW_MS, NOW_MS + 600_000, 30_000)
    outputs = tensors()[2:]
    receipt = Receipt(request.job_id, b.public_key, p.public_key, MODEL_SHA, tensors_sha256(inputs),
                      tensors_sha256(outputs), 1.5, 12.75, 0.309, "measured-rapl", 1.275e-06, NOW_MS + 20)
    signed_receipt = sign_receipt(p, receipt)
    receipt_sha = codec.sha256_hex(codec.decode(signed_receipt, max_bytes=1 << 16)["body"])
    ack = ReceiptAck(request.job_id, receipt_sha, True, "", NOW_MS + 30)
    return {
        "offer": ("provider", sign_offer(p, offer), offer),
        "job-request": ("buyer", sign_job_request(b, request), request),
        "receipt": ("provider", signed_receipt, receipt),
        "receipt-ack": ("buyer", sign_receipt_ack(b, ack), ack),
        "statement": ("provider", sign_statement(p, Statement(
            p.public_key, b.public_key, 1, 1.275e-06, 0.309, receipts_digest([receipt_sha]), NOW_MS + 40)), None),
        "dispute": ("buyer", sign_dispute(b, Dispute(
            request.job_id, p.public_key, receipt_sha, KEYS["other"].public_key, "ab" * 32, 0.5, 0.0001,
            NOW_MS + 50)), None),
        "disagreements": ("buyer", sign_disagreements(b, Disagreements(
            b.public_key, p.public_key, (Disagreement(request.job_id, "accepted", "unacked", True),),
            NOW_MS + 60)), None),
        "reputation": ("buyer", sign_reputation(b, ReputationDigest(
            b.public_key, (ReputationEntry(p.public_key, 10, 1, 0),), NOW_MS, NOW_MS + 3_600_000)), None),
    }


def envelope_vectors() -> list[dict]:
    out = []
    for msg_type, (signer, envelope, _) in messages().items():
        raw = codec.decode(envelope, max_bytes=1 << 20)
        out.append({
            "type": msg_type, "signer_seed": SEEDS[signer].hex(), "signer": raw["signer"].hex(),
            "signer_peer_id": KEYS[signer].peer_id, "domain": DOMAINS[msg_type].hex(),
            "body": typed(codec.decode(raw["body"], max_bytes=1 << 20)), "body_hex": raw["body"].hex(),
            "body_sha256": codec.sha256_hex(raw["body"]), "sig": raw["sig"].hex(), "envelope_hex": envelope.hex(),
            "now_ms": NOW_MS + 100,
        })
    return out


def resign(key: SigningKey, msg_type: str, body: bytes, *, domain_type: str | None = None, v: int = 1,
           envelope_type: str | None = None) -> bytes:
    """An envelope built by hand, to break one rule at a time."""
    sig = key.sign(DOMAINS[domain_type or msg_type], body)
    return codec.encode({"v": v, "type": envelope_type or msg_type, "signer": key.public_key, "body": body,
                         "sig": sig})


def negative_vectors() -> list[dict]:
    msgs = messages()
    p = KEYS["provider"]
    offer_env = msgs["offer"][1]
    raw = codec.decode(offer_env, max_bytes=1 << 20)
    body = raw["body"]
    flipped_sig = codec.encode(raw | {"sig": raw["sig"][:-1] + bytes([raw["sig"][-1] ^ 1])})
    flipped_body = raw | {"body": body[:-1] + bytes([body[-1] ^ 1])}
    fields = codec.decode(body, max_bytes=1 << 20)
    # A map with its keys out of order: a valid msgpack body, signed, but not canonical.
    unsorted = bytes([0x80 | len(fields)]) + b"".join(codec.encode(k) + codec.encode(v)
                                                      for k, v in reversed(sorted(fields.items())))
    long_int = codec.encode({**raw, "v": 1})
    long_int = long_int.replace(b"\xa1v\x01", b"\xa1v\xcc\x01")  # v as uint8: not the shortest form
    other = KEYS["other"]
    stranger_offer = codec.encode({**fields, "peer_id": other.peer_id})
    oversized = codec.encode({**fields, "zz_unknown_padding": b"\x00" * 70_000})  # unknown fields still count
    ack_body = codec.decode(msgs["receipt-ack"][1], max_bytes=1 << 16)["body"]
    now = NOW_MS + 100
    cases = [
        ("signature bit flipped", "offer", flipped_sig, "signature"),
        ("body bit flipped", "offer", codec.encode(flipped_body), "signature"),
        ("signed under another type's domain", "offer", resign(p, "offer", body, domain_type="receipt"), "signature"),
        ("a receipt where an offer is expected", "offer", msgs["receipt"][1], "type"),
        ("envelope version 2", "offer", resign(p, "offer", body, v=2), "version"),
        ("body not canonical (map keys unsorted)", "offer", resign(p, "offer", unsorted), "canonical"),
        ("envelope not canonical (an int in a longer form)", "offer", long_int, "canonical"),
        ("peer id of another key", "offer", resign(p, "offer", stranger_offer), "field"),
        ("offer over 64 KiB", "offer", resign(p, "offer", oversized), "size"),
        ("offer expired", "offer", offer_env, "expired"),
        ("an ack whose envelope names the receipt type", "receipt-ack",
         resign(KEYS["buyer"], "receipt-ack", ack_body, envelope_type="receipt"), "type"),
    ]
    out = []
    for name, expected_type, envelope, error in cases:
        out.append({"name": name, "type": expected_type, "envelope_hex": envelope.hex(), "error": error,
                    "now_ms": NOW_MS + 10 * 60_000 if error == "expired" else now})
    return out


def tensor_vectors() -> list[dict]:
    ts = tensors()
    return [{"tensors": typed([t.to_wire() for t in group]), "msgpack_hex": codec.encode([t.to_wire() for t in group]).hex(),
             "sha256": tensors_sha256(group)} for group in (ts[:1], ts[:2], ts)]


def frame_vectors() -> list[dict]:
    msgs = messages()
    ts = tensors()
    examples = [
        SubmitJob(msgs["job-request"][1]), NeedModel(MODEL_SHA), ModelBlob(MODEL_SHA, b"an example model"),
        Accepted("0123456789abcdef0123456789abcdef", 0),
        JobResult("0123456789abcdef0123456789abcdef", ts[2:], msgs["receipt"][1]),
        JobError("busy", "no room now; ask again later"), Ack(msgs["receipt-ack"][1]),
        Settled("0123456789abcdef0123456789abcdef", "accepted"),
        OfferSync((msgs["offer"][1],), (msgs["reputation"][1],), OfferWant((MODEL_SHA,), ("x86_64",), 0.001)),
        OfferSync((msgs["offer"][1],), (), after="", more=True, held_ms=(61_000,)),
        SettleAcks((msgs["receipt-ack"][1],)),
        SettleHeld((HeldReceipt("0123456789abcdef0123456789abcdef", "ab" * 32, "accepted"),),
                   (HeldReceipt("fedcba9876543210fedcba9876543210", "cd" * 32, "unacked"),)),
    ]
    out = []
    for message in examples:
        payload = encode_message(message)
        out.append({"kind": message.kind, "payload": typed(codec.decode(payload, max_bytes=1 << 20)),
                    "frame_hex": frame(payload).hex()})
    return out


def negative_frame_vectors() -> list[dict]:
    """Frames a reader at a given position (its cap, the kinds it expects) must refuse."""
    accepted = encode_message(Accepted("0123456789abcdef0123456789abcdef", 0))
    return [
        {"name": "length over the control cap", "cap": 65536, "expect": ["accepted"],
         "frame_hex": (65537).to_bytes(4, "big").hex() + "00" * 16, "error": "size"},
        {"name": "a kind not legal here", "cap": 65536, "expect": ["need-model", "accepted", "result", "error"],
         "frame_hex": frame(encode_message(Ack(b"x"))).hex(), "error": "kind"},
        {"name": "payload is not a map", "cap": 65536, "expect": ["accepted"],
         "frame_hex": frame(codec.encode([1, 2])).hex(), "error": "field"},
        {"name": "a required field missing", "cap": 65536, "expect": ["accepted"],
         "frame_hex": frame(codec.encode({"kind": "accepted", "job_id": "0123456789abcdef0123456789abcdef"})).hex(),
         "error": "field"},
        {"name": "job id in upper-case hex", "cap": 65536, "expect": ["accepted"],
         "frame_hex": frame(accepted.replace(b"0123456789abcdef", b"0123456789ABCDEF")).hex(), "error": "field"},
    ]


def canonical_vectors() -> dict:
    ints = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, -1, -32, -33, -128, -129,
            -32768, -32769, -2**31, -2**31 - 1, -2**63]
    good = [{"value": typed(v), "msgpack_hex": codec.encode(v).hex()} for v in (
        *ints, 0.0, -0.0, 1.5, 1e300, "", "a" * 31, "a" * 32, "é✓", b"", b"\x00" * 256, [], list(range(16)),
        {"b": 1, "a": [None, True, False]}, {"a": {"a": b""}, "aa": 1, "b": 2.25})]
    bad = [(name, bytes.fromhex(h)) for name, h in (
        ("uint8 for 5", "cc05"), ("uint16 for 16", "cd0010"), ("int8 for 5", "d005"), ("int8 for -1", "d0ff"),
        ("float32", "ca3fc00000"), ("str8 for 1 byte", "d90161"), ("map16 for 1 entry", "de0001a16101"),
        ("unsorted keys", "82a16201a16102"), ("repeated key", "82a16101a16102"), ("int key", "810102"),
        ("ext type", "d40101"), ("trailing bytes", "0102"), ("truncated bin", "c405"))]
    return {"good": good, "bad": [{"name": n, "msgpack_hex": b.hex()} for n, b in bad]}


def peer_id_vectors() -> list[dict]:
    return [{"seed": s.hex(), "public_key": KEYS[n].public_key.hex(), "peer_id": KEYS[n].peer_id}
            for n, s in SEEDS.items()]


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "peer_ids.json": peer_id_vectors(), "canonical.json": canonical_vectors(), "tensors.json": tensor_vectors(),
        "envelopes.json": envelope_vectors(), "negative.json": negative_vectors(), "frames.json": frame_vectors(),
        "negative_frames.json": negative_frame_vectors(),
    }
    written = []
    for name, content in files.items():
        path = directory / name
        path.write_text(json.dumps(content, indent=1, ensure_ascii=False) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "vectors"
    for path in write(target):
        print(path)
