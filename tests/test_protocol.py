"""Protocol: round trips, signatures, domains, and garbage from the network."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import codec
from protocol.errors import DecodeError, ExpiredError, LocalProtocolError, SignatureError
from protocol.lifecycle import next_state
from protocol.settlement import open_any, open_dispute, open_reputation, open_statement
from protocol.messages import (
    Device, JobRequest, ModelCapability, Offer, PowerProfile, Receipt, ReceiptAck, open_job_request,
    open_offer, open_receipt, open_receipt_ack, sign_job_request, sign_offer, sign_receipt, sign_receipt_ack,
)
from protocol.signing import SigningKey, open_envelope, peer_id_from_public_key
from protocol.stream import (
    Accepted, HeldReceipt, JobError, JobResult, ModelBlob, NeedModel, OfferSync, SettleAcks, SettleHeld, Settled,
    SubmitJob, decode_message, encode_message,
)
from protocol.tensors import Tensor, tensors_sha256

NOW = 1_700_000_000_000
PROVIDER = SigningKey(bytes(range(32)))
BUYER = SigningKey(bytes(range(1, 33)))


def make_offer(**overrides) -> Offer:
    fields = dict(
        provider=PROVIDER.public_key, peer_id=PROVIDER.peer_id, addrs=("/ip4/127.0.0.1/tcp/4001",),
        device=Device("x86_64", "test-cpu", 8192), slots=2,
        models=(ModelCapability("squeezenet", "ab" * 32, 300.0, "measured"),),
        power=PowerProfile(10.0, 40.0, 15.0, "declared", "declared", "declared"),
        carbon_g_per_kwh=300.0, carbon_source="declared", price_per_s=0.0001, backlog_ms=0.0,
        issued_at_ms=NOW, expires_at_ms=NOW + 60_000)
    fields.update(overrides)
    return Offer(**fields)


def make_request() -> JobRequest:
    x = Tensor.from_array("data_0", np.arange(6, dtype=np.float32).reshape(1, 6))
    return JobRequest("0f" * 16, BUYER.public_key, PROVIDER.public_key, "ab" * 32, "squeezenet", (x,), 1, 0.5,
                      NOW, NOW + 60_000)


def make_receipt() -> Receipt:
    return Receipt("0f" * 16, BUYER.public_key, PROVIDER.public_key, "ab" * 32, "cd" * 32, "ef" * 32,
                   0.5, 3.2, 0.048, "declared", 3.2e-7, NOW)


def test_offer_round_trip():
    offer = make_offer()
    assert open_offer(sign_offer(PROVIDER, offer), now_ms=NOW) == offer


def test_job_request_receipt_and_ack_round_trip():
    request = make_request()
    env, back = open_job_request(sign_job_request(BUYER, request))
    assert back == request and env.signer == BUYER.public_key
    receipt = make_receipt()
    assert open_receipt(sign_receipt(PROVIDER, receipt))[1] == receipt
    ack = ReceiptAck("0f" * 16, "12" * 32, True, "", NOW)
    assert open_receipt_ack(sign_receipt_ack(BUYER, ack))[1] == ack


EVERY_KIND = ("submit", "need-model", "model", "accepted", "result", "error", "ack", "offers", "settled",
              "settle-acks", "settle-held")


def test_stream_messages_round_trip():
    t = Tensor.from_array("y", np.ones((2, 3), dtype=np.float32))
    for msg in (SubmitJob(b"x"), NeedModel("ab" * 32), ModelBlob("ab" * 32, b"onnx"), Accepted("0f" * 16, 2),
                JobResult("0f" * 16, (t,), b"r"), JobError("busy", "later"), OfferSync((b"a", b"b")),
                Settled("0f" * 16, "accepted"), SettleAcks((b"ack1", b"ack2")),
                SettleHeld((HeldReceipt("0f" * 16, "ab" * 32, "unacked"),), (HeldReceipt("1f" * 16, "", "missing"),))):
        assert decode_message(encode_message(msg), max_bytes=1 << 20, expect=(msg.kind,)) == msg


def test_tensor_round_trip_and_hash_is_content_based():
    a = np.random.default_rng(0).random((2, 3, 4)).astype(np.float32)
    t = Tensor.from_array("a", a)
    assert np.array_equal(t.to_array(), a)
    assert tensors_sha256([t]) == tensors_sha256([Tensor.from_array("a", a.copy())])
    assert tensors_sha256([t]) != tensors_sha256([Tensor.from_array("a", a + 1)])


def test_peer_id_matches_libp2p():
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    seed = bytes(range(32))
    assert peer_id_from_public_key(SigningKey(seed).public_key) == ID.from_pubkey(
        create_new_key_pair(seed).public_key).to_base58()


@pytest.mark.parametrize("make,sign,open_", [
    (make_offer, lambda m: sign_offer(PROVIDER, m), lambda b: open_offer(b, now_ms=NOW)),
    (make_request, lambda m: sign_job_request(BUYER, m), open_job_request),
    (make_receipt, lambda m: sign_receipt(PROVIDER, m), open_receipt),
])
def test_every_single_bit_flip_in_body_or_signature_fails(make, sign, open_):
    signed = sign(make())
    env = codec.decode(signed, max_bytes=1 << 24)
    for field in ("body", "sig"):
        original = env[field]
        step = max(1, len(original) // 64)  # a spread of positions keeps the test fast
        for i in range(0, len(original), step):
            for bit in (0, 7):
                flipped = bytearray(original)
                flipped[i] ^= 1 << bit
                tampered = codec.encode({**env, field: bytes(flipped)})
                with pytest.raises(DecodeError):
                    open_(tampered)


def test_signature_under_another_domain_does_not_verify():
    receipt_signed = sign_receipt(PROVIDER, make_receipt())
    env = codec.decode(receipt_signed, max_bytes=1 << 20)
    # Same bytes and signature, relabelled as another type: the domain differs, so it fails.
    relabelled = codec.encode({**env, "type": "offer"})
    with pytest.raises(SignatureError):
        open_envelope(relabelled, "offer", max_bytes=1 << 20)
    with pytest.raises(DecodeError, match="expected 'receipt-ack'"):
        open_receipt_ack(receipt_signed)


def test_offer_signed_by_one_key_claiming_another_peer_is_refused():
    other = SigningKey(bytes(range(2, 34)))
    forged = sign_offer(other, make_offer())  # body names PROVIDER, signed by other
    with pytest.raises(DecodeError, match="not the key that signed"):
        open_offer(forged, now_ms=NOW)
    with pytest.raises(DecodeError, match="does not derive"):
        open_offer(sign_offer(PROVIDER, make_offer(peer_id=other.peer_id)), now_ms=NOW)


def test_offer_expiry_and_future_dating():
    signed = sign_offer(PROVIDER, make_offer())
    with pytest.raises(ExpiredError, match="expired"):
        open_offer(signed, now_ms=NOW + 60_000)
    with pytest.raises(ExpiredError, match="future"):
        open_offer(signed, now_ms=NOW - 120_000)


def test_decode_error_names_the_field():
    wire = make_offer().to_wire()
    wire["slots"] = -3
    with pytest.raises(DecodeError, match=r"offer\.slots: expected int >= 1, got -3"):
        Offer.from_wire(wire)


def test_frame_cap_and_ext_types_refused():
    with pytest.raises(DecodeError, match="exceeds the cap"):
        codec.decode(b"\x00" * 100, max_bytes=10)
    with pytest.raises(DecodeError, match="ext"):
        codec.decode(b"\xd4\x05\x00", max_bytes=10)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_garbage_bytes_give_decode_error_only(data):
    for opener in (lambda b: open_offer(b, now_ms=NOW), open_job_request, open_receipt, open_receipt_ack,
                   open_statement, open_dispute, open_reputation, lambda b: open_any(b, now_ms=NOW),
                   lambda b: decode_message(b, max_bytes=4096, expect=EVERY_KIND)):
        try:
            opener(data)
        except DecodeError:
            pass


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(msgpack_values)
def test_well_formed_but_wrong_msgpack_gives_decode_error_only(value):
    import msgpack

    data = msgpack.packb(value, use_bin_type=True)
    for opener in (lambda b: open_offer(b, now_ms=NOW), open_receipt, open_statement, open_reputation,
                   lambda b: open_any(b, now_ms=NOW),
                   lambda b: decode_message(b, max_bytes=4096, expect=EVERY_KIND)):
        try:
            opener(data)
        except DecodeError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["slots", "price_per_s", "models", "addrs", "device", "power", "expires_at_ms"]),
       msgpack_values)
def test_mutated_offer_fields_give_decode_error_only(field, value):
    wire = make_offer().to_wire()
    wire[field] = value
    signed = _seal_raw(PROVIDER, "offer", codec.encode(wire))
    try:
        open_offer(signed, now_ms=NOW)
    except DecodeError:
        pass


def _seal_raw(key, msg_type, body):
    from protocol.signing import seal
    return seal(key, msg_type, body)


def test_lifecycle_table():
    state = "requested"
    for event in ("accept", "start", "deliver", "settle"):
        state = next_state(state, event)
    assert state == "settled"
    with pytest.raises(LocalProtocolError, match="buyer: no move from state 'settled' on event 'deliver'"):
        next_state("settled", "deliver", role="buyer")


def test_model_hash_is_plain_sha256():
    assert codec.sha256_hex(b"abc") == hashlib.sha256(b"abc").hexdigest()


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["statement", "dispute", "reputation"]), st.text(max_size=16), msgpack_values)
def test_mutated_settlement_bodies_give_decode_error_only(kind, field, value):
    from protocol.settlement import (
        Dispute, ReputationDigest, ReputationEntry, Statement, sign_dispute, sign_reputation, sign_statement,
    )
    key = PROVIDER
    messages = {
        "statement": Statement(key.public_key, b"c" * 32, 3, -1.5, 2.0, "ab" * 32, NOW),
        "dispute": Dispute("cd" * 16, b"p" * 32, "ab" * 32, b"q" * 32, "ef" * 32, 0.5, 1e-4, NOW),
        "reputation": ReputationDigest(key.public_key, (ReputationEntry(b"p" * 32, 3, 1, 0),), NOW, NOW + 1000),
    }
    wire = messages[kind].to_wire()
    for name in (list(wire) if field == "" else [field]):
        mutated = dict(wire)
        mutated[name] = value
        signed = _seal_raw(key, kind, codec.encode(mutated))
        try:
            open_any(signed, now_ms=NOW)
        except DecodeError:
            pass
    # and the untouched message verifies, signed the normal way
    sign = {"statement": sign_statement, "dispute": sign_dispute, "reputation": sign_reputation}[kind]
    assert open_any(sign(key, messages[kind]), now_ms=NOW)[0] == kind


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(EVERY_KIND), st.dictionaries(st.sampled_from(
    ["job_id", "status", "acks", "entries", "unnamed", "sha256", "data", "queue_position", "outputs", "receipt",
     "code", "message", "ack", "offers", "digests", "request"]), msgpack_values, max_size=4))
def test_every_frame_kind_with_wrong_fields_gives_decode_error_only(kind, fields):
    data = codec.encode({**fields, "kind": kind}) if all(isinstance(k, str) for k in fields) else b""
    try:
        decode_message(data, max_bytes=1 << 16, expect=EVERY_KIND)
    except DecodeError:
        pass
