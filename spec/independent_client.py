"""An idlemesh wire client written from spec/wire.md alone: it imports none of the
project's code (only msgpack to parse, cryptography for Ed25519, and the standard
library), and checks itself against the test vectors.

    python spec/independent_client.py spec/vectors      # exit 0 when every vector passes

It encodes canonical msgpack by hand (section 3), derives peer ids (section 2), opens
envelopes under the domains of section 4, hashes tensors (section 5), applies the
offer rules of 6.1, and parses frames (section 7).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from pathlib import Path

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

# Section 4, copied from the spec's table: never taken from the vectors.
DOMAINS = {t: f"idlemesh/v1/{t}\0".encode() for t in (
    "offer", "job-request", "receipt", "receipt-ack", "statement", "dispute", "disagreements", "reputation")}
MAX_ENVELOPE = {"offer": 64 * 1024, "job-request": 80 * 1024 * 1024, "receipt": 8 * 1024, "receipt-ack": 8 * 1024,
                "statement": 8 * 1024, "dispute": 8 * 1024, "disagreements": 256 * 1024, "reputation": 64 * 1024}
MAX_OFFER_TTL_MS, MAX_SKEW_MS = 120_000, 30_000
ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1,
            "bool": 1}


class Refused(Exception):
    def __init__(self, category: str, why: str):
        super().__init__(f"{category}: {why}")
        self.category = category


# --- section 3: canonical msgpack, by hand ------------------------------------------------


def encode(value) -> bytes:
    if value is None:
        return b"\xc0"
    if value is True:
        return b"\xc3"
    if value is False:
        return b"\xc2"
    if isinstance(value, int):
        if 0 <= value <= 0x7f:
            return bytes([value])
        if value >= 0:
            for marker, width in ((0xcc, 1), (0xcd, 2), (0xce, 4), (0xcf, 8)):
                if value < 1 << (8 * width):
                    return bytes([marker]) + value.to_bytes(width, "big")
            raise ValueError("int too large")
        if value >= -32:
            return struct.pack(">b", value)
        for marker, width in ((0xd0, 1), (0xd1, 2), (0xd2, 4), (0xd3, 8)):
            if value >= -(1 << (8 * width - 1)):
                return bytes([marker]) + value.to_bytes(width, "big", signed=True)
        raise ValueError("int too small")
    if isinstance(value, float):
        return b"\xcb" + struct.pack(">d", value)
    if isinstance(value, str):
        data = value.encode()
        return _sized(len(data), 0xa0, 32, (0xd9, 0xda, 0xdb)) + data
    if isinstance(value, bytes):
        return _sized(len(value), None, 0, (0xc4, 0xc5, 0xc6)) + value
    if isinstance(value, list):
        return _sized(len(value), 0x90, 16, (None, 0xdc, 0xdd)) + b"".join(encode(v) for v in value)
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("map keys must be str")
        items = sorted(((k.encode(), v) for k, v in value.items()), key=lambda kv: kv[0])
        return _sized(len(items), 0x80, 16, (None, 0xde, 0xdf)) + b"".join(
            encode(k.decode()) + encode(v) for k, v in items)
    raise TypeError(type(value).__name__)


def _sized(n: int, fix, fix_limit: int, markers) -> bytes:
    if fix is not None and n < fix_limit:
        return bytes([fix | n])
    for marker, width in zip(markers, (1, 2, 4)):
        if marker is not None and n < 1 << (8 * width):
            return bytes([marker]) + n.to_bytes(width, "big")
    raise ValueError("too long")


def decode(data: bytes):
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=lambda c, d: ("ext", c))
    except Exception as exc:  # the spec says: not valid msgpack -> refused
        raise Refused("canonical", f"not msgpack: {exc}") from None


def decode_canonical(data: bytes):
    """Canonical means one encoding: decoding and encoding again gives the same bytes."""
    value = decode(data)
    try:
        again = encode(value)
    except (TypeError, ValueError) as exc:
        raise Refused("canonical", str(exc)) from None
    if again != data:
        raise Refused("canonical", "not the canonical encoding")
    return value


def untyped(value):
    """The vectors' JSON form back to values: {"bin": hex}, {"float": x}."""
    if isinstance(value, dict):
        if set(value) == {"bin"}:
            return bytes.fromhex(value["bin"])
        if set(value) == {"float"}:
            return float(value["float"])
        return {k: untyped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [untyped(v) for v in value]
    return value


# --- section 2: peer ids ------------------------------------------------------------------

B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def peer_id(public_key: bytes) -> str:
    data = b"\x00\x24\x08\x01\x12\x20" + public_key
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = B58[r] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


# --- sections 4 and 6: envelopes ----------------------------------------------------------


def open_envelope(data: bytes, expected_type: str, now_ms: int) -> dict:
    if len(data) > MAX_ENVELOPE[expected_type]:
        raise Refused("size", f"{len(data)} bytes")
    env = decode(data)
    if not isinstance(env, dict):
        raise Refused("field", "envelope is not a map")
    if env.get("v") != 1:
        raise Refused("version", f"v={env.get('v')!r}")
    if env.get("type") != expected_type:
        raise Refused("type", f"{env.get('type')!r}")
    signer, body, sig = env.get("signer"), env.get("body"), env.get("sig")
    if not (isinstance(signer, bytes) and len(signer) == 32 and isinstance(body, bytes) and isinstance(sig, bytes)):
        raise Refused("field", "signer/body/sig")
    try:
        Ed25519PublicKey.from_public_bytes(signer).verify(sig, DOMAINS[expected_type] + body)
    except (InvalidSignature, ValueError):
        raise Refused("signature", "does not verify") from None
    decode_canonical(data)
    message = decode_canonical(body)
    if not isinstance(message, dict):
        raise Refused("field", "body is not a map")
    check_message(expected_type, message, signer, now_ms)
    return message


def check_message(msg_type: str, m: dict, signer: bytes, now_ms: int) -> None:
    """The rules a reader applies beyond the signature (a subset of section 6)."""
    if msg_type == "offer":
        if m["provider"] != signer:
            raise Refused("field", "provider is not the signer")
        if m["peer_id"] != peer_id(m["provider"]):
            raise Refused("field", "peer_id does not derive from provider")
        if not isinstance(m["models"], list) or len(m["models"]) > 256:
            raise Refused("field", "models")
        issued, expires = m["issued_at_ms"], m["expires_at_ms"]
        if expires <= now_ms or issued > now_ms + MAX_SKEW_MS or expires - issued > MAX_OFFER_TTL_MS:
            raise Refused("expired", "outside its window")
    elif msg_type == "job-request" and m["buyer"] != signer:
        raise Refused("field", "buyer is not the signer")
    elif msg_type == "receipt" and m["provider"] != signer:
        raise Refused("field", "provider is not the signer")


# --- section 5: tensors -------------------------------------------------------------------


def tensors_sha256(tensors: list[dict]) -> str:
    for t in tensors:
        if len(t["data"]) != math.prod(t["shape"]) * ITEMSIZE[t["dtype"]]:
            raise Refused("field", f"tensor {t['name']}: data length")
    return hashlib.sha256(encode(tensors)).hexdigest()


# --- the vectors --------------------------------------------------------------------------


def run(directory: Path) -> list[str]:
    failures: list[str] = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            failures.append(what)

    for v in json.loads((directory / "peer_ids.json").read_text()):
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["seed"])).public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw)
        expect(key.hex() == v["public_key"] and peer_id(key) == v["peer_id"], f"peer id {v['peer_id']}")

    canonical = json.loads((directory / "canonical.json").read_text())
    for v in canonical["good"]:
        data = bytes.fromhex(v["msgpack_hex"])
        expect(encode(untyped(v["value"])) == data, f"encode {v['value']!r:.40}")
        try:
            decode_canonical(data)
        except Refused:
            expect(False, f"canonical {v['msgpack_hex'][:20]} refused")
    for v in canonical["bad"]:
        try:
            decode_canonical(bytes.fromhex(v["msgpack_hex"]))
            expect(False, f"non-canonical accepted: {v['name']}")
        except Refused:
            pass

    for v in json.loads((directory / "tensors.json").read_text()):
        tensors = untyped(v["tensors"])
        expect(encode(tensors).hex() == v["msgpack_hex"], "tensor encoding")
        expect(tensors_sha256(tensors) == v["sha256"], "tensor hash")

    for v in json.loads((directory / "envelopes.json").read_text()):
        envelope = bytes.fromhex(v["envelope_hex"])
        try:
            message = open_envelope(envelope, v["type"], v["now_ms"])
        except Refused as exc:
            expect(False, f"{v['type']}: {exc}")
            continue
        expect(message == untyped(v["body"]), f"{v['type']}: body fields")
        expect(encode(untyped(v["body"])).hex() == v["body_hex"], f"{v['type']}: body encoding")
        expect(hashlib.sha256(bytes.fromhex(v["body_hex"])).hexdigest() == v["body_sha256"], f"{v['type']}: hash")
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["signer_seed"]))
        resigned = key.sign(DOMAINS[v["type"]] + bytes.fromhex(v["body_hex"]))
        expect(resigned.hex() == v["sig"], f"{v['type']}: signature")
        expect(encode({"v": 1, "type": v["type"], "signer": bytes.fromhex(v["signer"]), "body": bytes.fromhex(
            v["body_hex"]), "sig": resigned}) == envelope, f"{v['type']}: envelope encoding")
        if v["type"] == "job-request":
            expect(all(isinstance(t["data"], bytes) for t in message["inputs"]), "request inputs")

    def refused_as(v: dict, read) -> None:
        try:
            read()
            expect(False, f"accepted: {v['name']}")
        except Refused as exc:
            expect(exc.category == v["error"], f"{v['name']}: refused as {exc.category}, expected {v['error']}")

    for v in json.loads((directory / "negative.json").read_text()):
        refused_as(v, lambda: open_envelope(bytes.fromhex(v["envelope_hex"]), v["type"], v["now_ms"]))

    for v in json.loads((directory / "frames.json").read_text()):
        data = bytes.fromhex(v["frame_hex"])
        (length,) = struct.unpack(">I", data[:4])
        expect(length == len(data) - 4, f"frame {v['kind']}: length")
        payload = decode(data[4:])
        expect(payload.get("kind") == v["kind"], f"frame {v['kind']}: kind")
        expect(encode(untyped(v["payload"])) == data[4:], f"frame {v['kind']}: encoding")
    for v in json.loads((directory / "negative_frames.json").read_text()):
        refused_as(v, lambda: read_frame(bytes.fromhex(v["frame_hex"]), v["cap"], v["expect"]))
    return failures


# --- section 7: frames --------------------------------------------------------------------

ACCEPTED_FIELDS = {"accepted": {"job_id": "hex16", "queue_position": int}}


def read_frame(data: bytes, cap: int, expect: list[str]) -> dict:
    """One frame at a position that allows `expect` kinds under `cap` bytes. Checks the
    fields of `accepted` fully (enough for the vectors); other kinds by their kind."""
    (length,) = struct.unpack(">I", data[:4])
    if length > cap:
        raise Refused("size", f"{length} > {cap}")
    payload = decode(data[4:4 + length])
    if not isinstance(payload, dict) or not isinstance(payload.get("kind"), str):
        raise Refused("field", "not a map with a kind")
    if payload["kind"] not in expect:
        raise Refused("kind", payload["kind"])
    for name, kind in ACCEPTED_FIELDS.get(payload["kind"], {}).items():
        value = payload.get(name)
        if kind == "hex16":
            if not (isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)):
                raise Refused("field", name)
        elif not isinstance(value, kind) or isinstance(value, bool):
            raise Refused("field", name)
    return payload


if __name__ == "__main__":
    failures = run(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "vectors"))
    for failure in failures:
        print("FAIL", failure)
    print(json.dumps({"failures": len(failures)}))
    sys.exit(1 if failures else 0)
