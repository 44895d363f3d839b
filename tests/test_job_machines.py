"""The job state machines (protocol/job.py): the happy path, each refusal, and random
frame sequences that must never raise anything but our errors nor make an illegal move."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import codec
from protocol.errors import DecodeError, LocalProtocolError
from protocol.job import (
    Acknowledged, BuyerJob, Confirmed, Delivered, JobAccepted, JobRequested, ModelArrived, ModelSent, ProviderJob, Refused,
    Rejected,
)
from protocol.lifecycle import STATES, TERMINAL, TRANSITIONS
from protocol.messages import JobRequest, ReceiptAck, sign_job_request, sign_receipt_ack
from protocol.signing import SigningKey
from protocol.stream import (
    Accepted, Ack, JobError, JobResult, ModelBlob, NeedModel, SubmitJob, encode_message,
)
from protocol.tensors import Tensor

NOW = 1_700_000_000_000
PROVIDER = SigningKey(bytes(range(32)))
BUYER = SigningKey(bytes(range(1, 33)))
STRANGER = SigningKey(bytes(range(2, 34)))
MODEL = b"model bytes"
MODEL_SHA = codec.sha256_hex(MODEL)
INPUTS = (Tensor.from_array("x", np.arange(6, dtype=np.float32).reshape(2, 3)),)
OUTPUTS = (Tensor.from_array("y", np.array([[0.5, 1.5], [2.5, 3.5]], dtype=np.float32)),)
JOB_ID = "ab" * 16


def make_request(**overrides) -> JobRequest:
    fields = dict(job_id=JOB_ID, buyer=BUYER.public_key, provider=PROVIDER.public_key, model_sha256=MODEL_SHA,
                  model_name="m", inputs=INPUTS, items=2, max_price=1.0, issued_at_ms=NOW, expires_at_ms=NOW + 60_000)
    fields.update(overrides)
    return JobRequest(**fields)


def deliver(provider: ProviderJob, outputs=OUTPUTS, compute_ms: float = 100.0):
    return provider.deliver(outputs, compute_ms=compute_ms, queue_ms=0.0, energy_j=1.0, energy_source="simulated",
                            price_per_s=0.01, execution_provider="CPUExecutionProvider", now_ms=NOW)


def converse(*, provider_has_model: bool = False):
    """Run both machines against each other, returning them and every frame sent."""
    buyer = BuyerJob.create(BUYER, make_request(), MODEL)
    provider = ProviderJob.create(PROVIDER)
    frames = []
    (submit,) = buyer.start().send
    frames.append(submit)
    step = provider.receive(submit, now_ms=NOW)
    assert step.events == (JobRequested(make_request()),)
    assert provider.quote(items_per_s=10.0, price_per_s=0.01) .send == ()
    if not provider_has_model:
        (need,) = provider.need_model().send
        frames.append(need)
        step = buyer.receive(need, now_ms=NOW)
        assert step.events == (ModelSent(MODEL_SHA),)
        frames.append(step.send[0])
        assert provider.receive(step.send[0], now_ms=NOW).events == (ModelArrived(MODEL_SHA, MODEL),)
    (accepted,) = provider.accept(0).send
    frames.append(accepted)
    assert buyer.receive(accepted, now_ms=NOW).events == (JobAccepted(0),)
    (result,) = deliver(provider).send
    frames.append(result)
    step = buyer.receive(result, now_ms=NOW)
    (delivered,) = step.events
    assert isinstance(delivered, Delivered) and delivered.outputs == OUTPUTS
    frames.append(step.send[0])
    (ack_event,) = provider.receive(step.send[0], now_ms=NOW).events
    assert isinstance(ack_event, Acknowledged) and ack_event.accepted
    buyer.settle()
    (confirm,) = provider.confirm("accepted").send
    frames.append(confirm)
    assert buyer.receive(confirm, now_ms=NOW).events == (Confirmed("accepted"),) and buyer.confirmed == "accepted"
    return buyer, provider, frames


def test_the_whole_conversation_settles_both_sides():
    buyer, provider, frames = converse()
    assert (buyer.state, provider.state) == ("settled", "settled")
    assert len(frames) == 7
    # The charge is the one formula: 100 ms at 0.01 per second.
    assert provider.receipt.receipt.price == pytest.approx(0.001)


def test_a_provider_that_holds_the_model_skips_it():
    buyer, provider, frames = converse(provider_has_model=True)
    assert (buyer.state, provider.state, len(frames)) == ("settled", "settled", 5)


def test_accepted_twice_is_the_peers_error_and_fails_the_attempt():
    buyer = BuyerJob.create(BUYER, make_request(), MODEL)
    buyer.start()
    accepted = encode_message(Accepted(JOB_ID, 0))
    buyer.receive(accepted, now_ms=NOW)
    with pytest.raises(DecodeError, match="expected result/error, got 'accepted'"):
        buyer.receive(accepted, now_ms=NOW)
    assert buyer.state == "failed"


def test_a_provider_error_frame_fails_the_job_with_its_code():
    buyer = BuyerJob.create(BUYER, make_request(), MODEL)
    buyer.start()
    step = buyer.receive(encode_message(JobError("busy", "full")), now_ms=NOW)
    assert step.events == (Refused("busy", "full"),) and buyer.state == "failed"


def test_a_receipt_over_the_ceiling_is_rejected_with_a_signed_reason():
    buyer = BuyerJob.create(BUYER, make_request(max_price=0.0001), MODEL)
    provider = ProviderJob.create(PROVIDER)
    provider.receive(buyer.start().send[0], now_ms=NOW)
    buyer.receive(provider.accept(0).send[0], now_ms=NOW)
    # A provider that charges more than the ceiling; `deliver` would cap it, so forge the frame.
    from protocol.messages import Receipt, sign_receipt
    from protocol.tensors import tensors_sha256
    receipt = Receipt(JOB_ID, BUYER.public_key, PROVIDER.public_key, MODEL_SHA, tensors_sha256(INPUTS),
                      tensors_sha256(OUTPUTS), 0.0, 100.0, 1.0, "simulated", 5.0, NOW)
    step = buyer.receive(encode_message(JobResult(JOB_ID, OUTPUTS, sign_receipt(PROVIDER, receipt))), now_ms=NOW)
    (rejected,) = step.events
    assert isinstance(rejected, Rejected) and "exceeds the ceiling" in rejected.reason
    assert buyer.state == "rejected"


def test_wrong_outputs_are_rejected_and_the_provider_records_the_rejection():
    buyer = BuyerJob.create(BUYER, make_request(), MODEL)
    provider = ProviderJob.create(PROVIDER)
    provider.receive(buyer.start().send[0], now_ms=NOW)
    buyer.receive(provider.accept(0).send[0], now_ms=NOW)
    (result,) = deliver(provider).send
    tampered = codec.decode(result, max_bytes=1 << 20, what="frame")
    tampered["outputs"][0]["data"] = bytes(len(tampered["outputs"][0]["data"]))
    step = buyer.receive(codec.encode(tampered), now_ms=NOW)
    assert isinstance(step.events[0], Rejected) and "output hash" in step.events[0].reason
    (ack_event,) = provider.receive(step.send[0], now_ms=NOW).events
    assert not ack_event.accepted and provider.state == "rejected"


@pytest.mark.parametrize("request_overrides, code", [
    ({"provider": STRANGER.public_key}, "wrong-provider"),
    ({"issued_at_ms": NOW - 120_000, "expires_at_ms": NOW - 60_000}, "expired"),
])
def test_the_provider_refuses_a_request_not_for_it_now(request_overrides, code):
    provider = ProviderJob.create(PROVIDER)
    step = provider.receive(encode_message(SubmitJob(sign_job_request(BUYER, make_request(**request_overrides)))),
                            now_ms=NOW)
    assert step.events[0].code == code and provider.state == "failed" and len(step.send) == 1


def test_the_provider_refuses_a_price_over_the_ceiling_by_the_one_formula():
    provider = ProviderJob.create(PROVIDER)
    provider.receive(encode_message(SubmitJob(sign_job_request(BUYER, make_request(max_price=0.001)))), now_ms=NOW)
    # 2 items at 1 item/s at 0.01 per second: 0.02 > 0.001.
    assert provider.quote(items_per_s=1.0, price_per_s=0.01).events[0].code == "price"
    assert provider.state == "failed"


def test_an_ack_signed_by_a_stranger_is_the_peers_error_and_the_receipt_stays_delivered():
    buyer = BuyerJob.create(BUYER, make_request(), MODEL)
    provider = ProviderJob.create(PROVIDER)
    provider.receive(buyer.start().send[0], now_ms=NOW)
    provider.accept(0)
    deliver(provider)
    forged = sign_receipt_ack(STRANGER, ReceiptAck(JOB_ID, provider.receipt.body_sha256, True, "", NOW))
    with pytest.raises(DecodeError, match="not signed by the job's buyer"):
        provider.receive(encode_message(Ack(forged)), now_ms=NOW)
    assert provider.state == "delivered"


def test_our_own_misuse_is_a_local_error_and_changes_nothing():
    provider = ProviderJob.create(PROVIDER)
    with pytest.raises(LocalProtocolError, match="accept before a request"):
        provider.accept(0)
    assert provider.state == "pending"
    buyer = BuyerJob.create(BUYER, make_request(), MODEL)
    with pytest.raises(LocalProtocolError, match="buyer: no move from state 'pending' on event 'settle'"):
        buyer.settle()
    assert buyer.state == "pending"
    with pytest.raises(LocalProtocolError, match="another buyer"):
        BuyerJob.create(STRANGER, make_request(), MODEL)


def test_a_kept_result_is_sent_again_and_settles():
    buyer, provider, frames = converse()
    again_buyer = BuyerJob.create(BUYER, make_request(), MODEL)
    again = ProviderJob.create(PROVIDER)
    again.receive(again_buyer.start().send[0], now_ms=NOW)
    (result,) = again.redeliver(frames[4]).send
    step = again_buyer.receive(result, now_ms=NOW)
    assert isinstance(step.events[0], Delivered) and again_buyer.state == "delivered"
    assert again.receive(step.send[0], now_ms=NOW).events[0].accepted and again.state == "settled"


# --- random frame sequences -----------------------------------------------------------


def _frame_pool() -> list[bytes]:
    """Every frame a real conversation sends, plus wrong-but-well-formed ones."""
    _, _, frames = converse()
    other_request = make_request(job_id="cd" * 16)
    stranger_ack = sign_receipt_ack(STRANGER, ReceiptAck(JOB_ID, "00" * 32, True, "", NOW))
    return frames + [
        encode_message(SubmitJob(sign_job_request(BUYER, other_request))),
        encode_message(SubmitJob(b"not an envelope")),
        encode_message(NeedModel("ee" * 32)),
        encode_message(ModelBlob("ee" * 32, b"other")),
        encode_message(Accepted("cd" * 16, 3)),
        encode_message(JobResult(JOB_ID, OUTPUTS, b"not a receipt")),
        encode_message(JobError("busy", "later")),
        encode_message(Ack(stranger_ack)),
        encode_message(Ack(b"junk")),
        codec.encode({"kind": "accepted"}),
        codec.encode({"kind": "no-such-kind"}),
        codec.encode([1, 2, 3]),
    ]


POOL = _frame_pool()
frames = st.one_of(st.sampled_from(POOL), st.binary(max_size=64),
                   st.sampled_from(POOL).map(lambda f: f[: len(f) // 2]))


def _drive(machine, actions, act):
    seen_states = [machine.state]
    for action in actions:
        before = machine.state
        try:
            act(machine, action)
        except DecodeError:
            # The peer's error: the job failed, unless it was past the point of failing.
            assert machine.state == ("failed" if (before, "fail") in TRANSITIONS else before)
        except LocalProtocolError:
            assert machine.state == before  # our own misuse changes nothing
        after = machine.state
        assert after in STATES
        if after != before:
            assert before not in TERMINAL, f"left terminal state {before} for {after}"
            # Every move is one in the table, or a chain of them (accept+start).
            reachable = {s for (s0, _), s in TRANSITIONS.items() if s0 == before}
            reachable |= {s2 for (s1, _), s2 in TRANSITIONS.items() if s1 in reachable}
            assert after in reachable, f"illegal move {before} -> {after}"
        seen_states.append(after)
    return seen_states


def _buyer_act(machine: BuyerJob, action) -> None:
    kind, payload = action
    if kind == "start":
        machine.start()
    elif kind == "settle":
        machine.settle()
    elif kind == "expire":
        machine.expire()
    else:
        machine.receive(payload, now_ms=NOW)


def _provider_act(machine: ProviderJob, action) -> None:
    kind, payload = action
    if kind == "quote":
        machine.quote(10.0, 0.01)
    elif kind == "need_model":
        machine.need_model()
    elif kind == "accept":
        machine.accept(0)
    elif kind == "deliver":
        deliver(machine)
    elif kind == "refuse":
        machine.refuse("internal", "x")
    else:
        machine.receive(payload, now_ms=NOW)


buyer_actions = st.lists(st.one_of(
    st.tuples(st.sampled_from(["start", "settle", "expire"]), st.none()),
    st.tuples(st.just("frame"), frames)), max_size=12)
provider_actions = st.lists(st.one_of(
    st.tuples(st.sampled_from(["quote", "need_model", "accept", "deliver", "refuse"]), st.none()),
    st.tuples(st.just("frame"), frames)), max_size=12)


@settings(max_examples=400, deadline=None)
@given(buyer_actions)
def test_random_frames_never_break_the_buyer_machine(actions):
    _drive(BuyerJob.create(BUYER, make_request(), MODEL), [("start", None)] + actions, _buyer_act)


@settings(max_examples=400, deadline=None)
@given(provider_actions)
def test_random_frames_never_break_the_provider_machine(actions):
    _drive(ProviderJob.create(PROVIDER), actions, _provider_act)


@settings(max_examples=200, deadline=None)
@given(st.permutations([1, 3, 4]), st.sampled_from([1, 3, 4]), st.integers(0, 3))
def test_reordered_and_duplicated_provider_frames(order, duplicate, at):
    """The provider's three frames (need-model, accepted, result) reach the buyer in any
    order, one of them twice: the buyer is delivered only if need-model (when it came)
    was first and the result came before any frame out of place; otherwise it failed."""
    _, _, conversation = converse()
    sequence = list(order)
    sequence.insert(at, duplicate)
    buyer = BuyerJob.create(BUYER, make_request(), MODEL)
    buyer.start()
    expected = "requested"
    for index in sequence:
        if expected in ("delivered", "failed"):
            legal = False
        elif index == 1:
            legal = expected == "requested" and not buyer.model_sent
        elif index == 3:
            legal = expected == "requested"
        else:
            legal = True
        if not legal:
            expected = "failed" if expected != "delivered" else "delivered"
        else:
            expected = {1: "requested", 3: "running", 4: "delivered"}[index]
        try:
            buyer.receive(conversation[index], now_ms=NOW)
        except DecodeError:
            assert not legal
        assert buyer.state == expected


def test_a_signed_list_of_disagreements_reads_back_with_verify():
    from protocol.settlement import Disagreement, Disagreements, open_any, sign_disagreements

    listed = Disagreements(BUYER.public_key, PROVIDER.public_key,
                           (Disagreement(JOB_ID, "accepted", "unacked", True),), NOW)
    kind, envelope, message = open_any(sign_disagreements(BUYER, listed), now_ms=NOW)
    assert (kind, envelope.signer, message) == ("disagreements", BUYER.public_key, listed)
    forged = sign_disagreements(STRANGER, listed)  # signed by someone who is not the issuer
    with pytest.raises(DecodeError, match="disagreements.issuer: is not the key that signed it"):
        open_any(forged, now_ms=NOW)


def test_a_request_binds_to_the_connection_that_sends_it():
    """A stranger replaying the buyer's signed request gets a refusal, never the result."""
    request = encode_message(SubmitJob(sign_job_request(BUYER, make_request())))
    stranger_side = ProviderJob.create(PROVIDER, peer_id=STRANGER.peer_id)
    step = stranger_side.receive(request, now_ms=NOW)
    assert step.events[0].code == "bad-request" and stranger_side.state == "failed"
    buyer_side = ProviderJob.create(PROVIDER, peer_id=BUYER.peer_id)
    assert isinstance(buyer_side.receive(request, now_ms=NOW).events[0], JobRequested)
