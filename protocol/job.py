"""The job conversation as two pure state machines, one per side (no I/O, no clock here).

In h11's manner: a machine takes the payload of each frame that arrives and returns a
`Step`, the frames to send and the events that happened; it never touches a stream,
a disk or a clock (`now_ms` and keys are arguments). Each machine owns

- its place in the lifecycle table (`protocol.lifecycle`), the one job vocabulary;
- the frame kinds it accepts in each state, and the size cap of the next frame;
- the price formula (`protocol.pricing`) and the receipt checks;
- the split between errors: a peer that breaks the protocol (garbage, a frame out of
  order, a duplicate, a receipt that does not verify) raises `DecodeError` and moves
  the job to `failed`; our own program asking for an illegal move raises
  `LocalProtocolError` and changes nothing.

The conversation on one stream, buyer (B) and provider (P):

    B: submit                 P: need-model? -> B: model -> P: accepted
    P: result (signed receipt)   B: ack (signed acceptance or rejection)
    P: settled (the status it durably holds once it applied the ack)
    P: error at any point before the result ends it.

Each side makes its decision durable before it sends it: the provider its receipt and
result before `result`, the buyer its outputs and ledger row before `ack`, the
provider the ack before `settled`. A buyer that never hears `settled` delivers the ack
later (node/settle.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from . import pricing
from .errors import DecodeError, ExpiredError, LocalProtocolError
from .lifecycle import TRANSITIONS, next_state
from .messages import (
    MAX_REQUEST_BYTES, JobRequest, Receipt, ReceiptAck, ReceiptPart, SignedReceipt, check_window, open_job_request,
    open_receipt_ack, sign_job_request, sign_receipt, sign_receipt_ack,
)
from .signing import SigningKey, peer_id_from_public_key
from .stream import (
    MAX_CONTROL_FRAME_BYTES, MAX_MODEL_BYTES, Accepted, Ack, JobError, JobResult, ModelBlob, NeedModel, Settled,
    StreamMessage, SubmitJob, decode_message, encode_message,
)
from .tensors import Tensor, parts_sha256, tensors_sha256

# A result carries the outputs: the largest frame a buyer reads.
MAX_RESULT_FRAME_BYTES = 96 * 1024 * 1024
MAX_SUBMIT_FRAME_BYTES = MAX_REQUEST_BYTES + 1024
MAX_MODEL_FRAME_BYTES = MAX_MODEL_BYTES + 1024
MAX_JOB_TTL_MS = 3_600_000
MAX_CLOCK_SKEW_MS = 30_000


# --- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobRequested:
    """Provider: a buyer's signed request arrived, is addressed to us, and is in its window."""
    request: JobRequest


@dataclass(frozen=True, slots=True)
class ModelArrived:
    """Provider: the buyer sent the model we asked for, and it hashes to the id."""
    sha256: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Acknowledged:
    """Provider: the buyer countersigned our receipt (accepted, or rejected with a reason)."""
    ack: bytes
    accepted: bool
    reason: str


@dataclass(frozen=True, slots=True)
class ModelSent:
    """Buyer: the provider did not hold the model; we answered with its bytes."""
    sha256: str


@dataclass(frozen=True, slots=True)
class JobAccepted:
    """Buyer: the provider took the job and runs it."""
    queue_position: int
    backlog_ms: float | None = None  # the queue ahead of it, when the provider says


@dataclass(frozen=True, slots=True)
class Delivered:
    """Buyer: a result whose receipt verifies; `ack` is our signed acceptance, to be sent
    once the outputs and the receipt are durable."""
    receipt: SignedReceipt
    outputs: tuple[Tensor, ...]
    ack: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    """Buyer: a receipt that verifies as the provider's but does not match the job; `ack`
    is our signed rejection with the reason."""
    receipt: SignedReceipt
    reason: str
    ack: bytes


@dataclass(frozen=True, slots=True)
class Confirmed:
    """Buyer: the provider durably holds our ack; `status` is what its ledger says."""
    status: str


@dataclass(frozen=True, slots=True)
class Refused:
    """Either side: the job ended with an error frame (sent by the provider, or received
    by the buyer) carrying one of protocol.stream.ERROR_CODES."""
    code: str
    message: str
    backlog_ms: float | None = None  # the provider's queue, when it says


Event = Union[JobRequested, ModelArrived, Acknowledged, ModelSent, JobAccepted, Delivered, Rejected, Refused,
              Confirmed]


@dataclass(frozen=True, slots=True)
class Step:
    """What one move produced: frames to send (encoded payloads, in order) and events."""
    send: tuple[bytes, ...] = ()
    events: tuple[Event, ...] = ()


def _step(*messages: StreamMessage, events: tuple[Event, ...] = ()) -> Step:
    return Step(tuple(encode_message(m) for m in messages), events)


# --- the two machines -----------------------------------------------------------------


@dataclass
class _Machine:
    role: str
    state: str
    error: str = ""  # why the job failed, when it did
    _input_sha256: str = ""

    def input_sha256(self) -> str:
        """The request's input hash, as receipts commit to it, computed once. Hashing a
        squeezenet input (600 KB) takes most of a millisecond: each side computes it
        where it costs no waiting (beside signing, beside the run) and the receipt's
        check or signature reuses it."""
        if not self._input_sha256:
            self._input_sha256 = tensors_sha256(self.request.inputs)
        return self._input_sha256

    def _move(self, event: str) -> None:
        self.state = next_state(self.state, event, role=self.role)

    def _peer_broke(self, message: str) -> DecodeError:
        """The peer broke the protocol: the job fails where the table allows it (a delivered
        job stays delivered: its receipt is real), and the caller gets a DecodeError."""
        if (self.state, "fail") in TRANSITIONS:
            self.state = "failed"
        self.error = message
        return DecodeError(f"{self.role} job: {message}")

    def _decode(self, payload: bytes, expect: tuple[str, ...], max_bytes: int) -> StreamMessage:
        if not expect:
            raise self._peer_broke(f"no frame is expected in state {self.state!r}")
        try:
            return decode_message(payload, max_bytes=max_bytes, expect=expect)
        except DecodeError as exc:
            raise self._peer_broke(f"in state {self.state!r}: {exc}") from None

    def expire(self) -> None:
        """The job ran out of time on our side before a result (a timeout of ours)."""
        self._move("expire")


@dataclass
class BuyerJob(_Machine):
    """The buyer's side of one attempt of one job on one provider."""

    request: JobRequest = None  # type: ignore[assignment]
    key: SigningKey = None  # type: ignore[assignment]
    model_bytes: bytes = b""
    model_sent: bool = False
    result: SignedReceipt | None = None
    confirmed: str = ""  # the provider's status from its `settled` frame, once heard

    @classmethod
    def create(cls, key: SigningKey, request: JobRequest, model_bytes: bytes) -> "BuyerJob":
        if request.buyer != key.public_key:
            raise LocalProtocolError("buyer: the request names another buyer than our key")
        return cls(role="buyer", state="pending", request=request, key=key, model_bytes=model_bytes)

    @property
    def expects(self) -> tuple[str, ...]:
        if self.state == "requested":
            return ("accepted", "result", "error") if self.model_sent else ("need-model", "accepted", "result", "error")
        if self.state == "running":
            return ("result", "error")
        if self.state in ("delivered", "settled", "rejected") and self.result is not None and not self.confirmed:
            return ("settled",)
        return ()

    @property
    def max_frame_bytes(self) -> int:
        return MAX_RESULT_FRAME_BYTES if self.result is None else MAX_CONTROL_FRAME_BYTES

    def start(self) -> Step:
        self._move("send")
        self.input_sha256()  # here, off the caller's thread, not when the result is in
        return _step(SubmitJob(sign_job_request(self.key, self.request)))

    def receive(self, payload: bytes, *, now_ms: int) -> Step:
        message = self._decode(payload, self.expects, self.max_frame_bytes)
        if isinstance(message, NeedModel):
            if message.sha256 != self.request.model_sha256:
                raise self._peer_broke(f"provider asked for model {message.sha256[:16]}, not the job's")
            self.model_sent = True
            return _step(ModelBlob(message.sha256, self.model_bytes), events=(ModelSent(message.sha256),))
        if isinstance(message, Accepted):
            if message.job_id != self.request.job_id:
                raise self._peer_broke("'accepted' names another job")
            self._move("accept")
            self._move("start")
            return Step(events=(JobAccepted(message.queue_position, message.backlog_ms),))
        if isinstance(message, JobError):
            self._move("fail")
            self.error = f"{message.code}: {message.message}"
            return Step(events=(Refused(message.code, message.message, message.backlog_ms),))
        if isinstance(message, JobResult):
            return self._result(message, now_ms)
        if isinstance(message, Settled):
            if message.job_id != self.request.job_id:
                raise self._peer_broke("'settled' names another job")
            self.confirmed = message.status
            return Step(events=(Confirmed(message.status),))
        raise LocalProtocolError(f"buyer: decoded an unexpected {message.kind!r}")  # pragma: no cover

    def _result(self, message: JobResult, now_ms: int) -> Step:
        try:
            signed = SignedReceipt.parse(message.receipt)
        except DecodeError as exc:
            raise self._peer_broke(f"result: {exc}") from None
        problems = self.receipt_problems(signed.receipt, message)
        self._move("redeliver" if self.state == "requested" else "deliver")
        self.result = signed
        if problems:
            reason = "receipt rejected: " + "; ".join(problems)
            ack = sign_receipt_ack(self.key, ReceiptAck(self.request.job_id, signed.body_sha256, False,
                                                        reason[:512], now_ms))
            self._move("reject")
            self.error = reason
            return _step(Ack(ack), events=(Rejected(signed, reason, ack),))
        ack = sign_receipt_ack(self.key, ReceiptAck(self.request.job_id, signed.body_sha256, True, "", now_ms))
        return _step(Ack(ack), events=(Delivered(signed, message.outputs, ack),))

    def receipt_problems(self, r: Receipt, message: JobResult) -> list[str]:
        request = self.request
        problems = []
        if r.provider != request.provider:
            problems.append("signed by another key than the provider's")
        if r.job_id != request.job_id or r.buyer != request.buyer:
            problems.append("names another job or buyer")
        if r.model_sha256 != request.model_sha256:
            problems.append("names another model")
        if r.input_sha256 != self.input_sha256():
            problems.append("commits to other inputs")
        if r.output_sha256 != tensors_sha256(message.outputs):
            problems.append("output hash does not match the outputs received")
        if request.parts is not None:
            try:
                if r.parts != receipt_parts(request, message.outputs):
                    problems.append("its per-member hashes do not match the batch's inputs and outputs")
            except DecodeError as exc:
                problems.append(f"outputs cannot be cut into the batch's members: {exc}")
        if not pricing.within_ceiling(r.price, request.max_price):
            problems.append(f"price {r.price} exceeds the ceiling {request.max_price}")
        if message.job_id != request.job_id:
            problems.append("result is for another job")
        return problems

    def settle(self) -> None:
        """Our acceptance is durable and sent: the job is settled on our side."""
        self._move("settle")


@dataclass
class ProviderJob(_Machine):
    """The provider's side of one job stream."""

    key: SigningKey = None  # type: ignore[assignment]
    peer_id: str | None = None  # the connection's peer: a request must be signed by it
    request: JobRequest | None = None
    model_asked: bool = False
    receipt: SignedReceipt | None = None
    error_sent: bool = False

    @classmethod
    def create(cls, key: SigningKey, *, peer_id: str | None = None) -> "ProviderJob":
        """`peer_id`: the authenticated peer of the stream; a request signed by any other
        key is refused, so results (kept ones included) go only to the job's buyer."""
        return cls(role="provider", state="pending", key=key, peer_id=peer_id)

    @property
    def expects(self) -> tuple[str, ...]:
        if self.state == "pending":
            return ("submit",)
        if self.state == "requested" and self.model_asked:
            return ("model",)
        if self.state == "delivered":
            return ("ack",)
        return ()

    @property
    def max_frame_bytes(self) -> int:
        if self.state == "pending":
            return MAX_SUBMIT_FRAME_BYTES
        if self.model_asked and self.state == "requested":
            return MAX_MODEL_FRAME_BYTES
        return MAX_CONTROL_FRAME_BYTES

    def receive(self, payload: bytes, *, now_ms: int) -> Step:
        message = self._decode(payload, self.expects, self.max_frame_bytes)
        if isinstance(message, SubmitJob):
            return self._submit(message, now_ms)
        if isinstance(message, ModelBlob):
            if message.sha256 != self.request.model_sha256:
                return self.refuse("model-invalid", "sent a different model than requested")
            self.model_asked = False
            return Step(events=(ModelArrived(message.sha256, message.data),))
        if isinstance(message, Ack):
            return self._ack(message)
        raise LocalProtocolError(f"provider: decoded an unexpected {message.kind!r}")  # pragma: no cover

    def _submit(self, message: SubmitJob, now_ms: int) -> Step:
        try:
            _, request = open_job_request(message.request)
        except DecodeError as exc:
            raise self._peer_broke(f"submit: {exc}") from None
        self._move("send")
        self.request = request
        if self.peer_id is not None and peer_id_from_public_key(request.buyer) != self.peer_id:
            return self.refuse("bad-request", "the request is signed by another key than this connection's")
        if request.provider != self.key.public_key:
            return self.refuse("wrong-provider", "job is addressed to another provider")
        try:
            check_window("job", request.issued_at_ms, request.expires_at_ms, now_ms=now_ms,
                         max_ttl_ms=MAX_JOB_TTL_MS, max_skew_ms=MAX_CLOCK_SKEW_MS)
        except ExpiredError as exc:
            return self.refuse("expired", str(exc))
        return Step(events=(JobRequested(request),))

    def quote(self, items_per_s: float, price_per_s: float) -> Step:
        """Check the job's price ceiling against our rate: empty Step if it fits, else the
        refusal to send."""
        request = self._need_request("quote", state="requested")
        expected = pricing.price(pricing.compute_s(request.items, items_per_s), price_per_s)
        if not pricing.within_ceiling(expected, request.max_price):
            return self.refuse("price", f"expected price {expected:.6g} exceeds ceiling {request.max_price:.6g}")
        return Step()

    def need_model(self) -> Step:
        request = self._need_request("need_model", state="requested")
        if self.model_asked:
            raise LocalProtocolError("provider: the model was already asked for")
        self.model_asked = True
        return _step(NeedModel(request.model_sha256))

    def accept(self, queue_position: int, backlog_ms: float | None = None) -> Step:
        request = self._need_request("accept")
        if self.model_asked:
            raise LocalProtocolError("provider: cannot accept while waiting for the model")
        self._move("accept")
        self._move("start")
        return _step(Accepted(request.job_id, queue_position, backlog_ms))

    def deliver(self, outputs: tuple[Tensor, ...], *, compute_ms: float, queue_ms: float, energy_j: float,
                energy_source: str, price_per_s: float, execution_provider: str, now_ms: int) -> Step:
        """Sign the receipt for a finished run and send it with the outputs. The price is
        charged by the one formula, never over the buyer's ceiling."""
        request = self._need_request("deliver")
        parts = receipt_parts(request, outputs)  # DecodeError if the outputs have no batch axis to cut
        receipt = Receipt(
            job_id=request.job_id, buyer=request.buyer, provider=self.key.public_key,
            model_sha256=request.model_sha256, input_sha256=self.input_sha256(),
            output_sha256=tensors_sha256(outputs), queue_ms=queue_ms, compute_ms=compute_ms,
            energy_j=energy_j, energy_source=energy_source,
            price=pricing.charge(compute_ms, price_per_s, request.max_price),
            issued_at_ms=now_ms, execution_provider=execution_provider, parts=parts)
        self._move("deliver")
        self.receipt = SignedReceipt.parse(sign_receipt(self.key, receipt))
        return _step(JobResult(request.job_id, tuple(outputs), self.receipt.envelope_bytes))

    def redeliver(self, result_frame: bytes) -> Step:
        """The buyer asked again for a job whose result we kept (it lost our answer): the
        same bytes again, and wait for its acknowledgement."""
        self._need_request("redeliver", state="requested")
        try:
            message = decode_message(result_frame, max_bytes=MAX_RESULT_FRAME_BYTES, expect=("result",))
            self.receipt = SignedReceipt.parse(message.receipt)
        except DecodeError as exc:
            raise LocalProtocolError(f"provider: the kept result does not decode: {exc}") from None
        self._move("redeliver")
        return Step((result_frame,))

    def _ack(self, message: Ack) -> Step:
        request, receipt = self._need_request("ack"), self.receipt
        if receipt is None:  # pragma: no cover - `expects` admits an ack only once delivered
            raise LocalProtocolError("provider: an ack before a receipt")
        try:
            envelope, ack = open_receipt_ack(message.ack)
        except DecodeError as exc:
            raise self._peer_broke(f"ack: {exc}") from None
        if envelope.signer != request.buyer:
            raise self._peer_broke("ack: not signed by the job's buyer")
        if ack.job_id != request.job_id or ack.receipt_sha256 != receipt.body_sha256:
            raise self._peer_broke("ack: names another job or receipt")
        self._move("settle" if ack.accepted else "reject")
        return Step(events=(Acknowledged(message.ack, ack.accepted, ack.reason),))

    def confirm(self, status: str) -> Step:
        """Tell the buyer the status we durably hold, once its ack is applied."""
        request = self._need_request("confirm")
        if self.state not in ("settled", "rejected"):
            raise LocalProtocolError(f"provider: no confirmation in state {self.state!r}")
        return _step(Settled(request.job_id, status))

    def refuse(self, code: str, message: str, backlog_ms: float | None = None) -> Step:
        """End the job with an error frame: before delivery, or to tell a peer that
        broke the protocol (the job is already failed) what was wrong."""
        if self.error_sent:
            raise LocalProtocolError(f"provider: an error was already sent for this job (state {self.state!r})")
        if self.state != "failed":
            self._move("fail")
            self.error = f"{code}: {message}"
        self.error_sent = True
        return Step((encode_message(JobError(code, message[:2048], backlog_ms)),), (Refused(code, message, backlog_ms),))

    def _need_request(self, what: str, *, state: str | None = None) -> JobRequest:
        if self.request is None:
            raise LocalProtocolError(f"provider: {what} before a request arrived (state {self.state!r})")
        if state is not None and self.state != state:
            raise LocalProtocolError(f"provider: no {what} in state {self.state!r}")
        return self.request


def receipt_parts(request: JobRequest, outputs: tuple[Tensor, ...]) -> tuple[ReceiptPart, ...] | None:
    """What a micro-batched job's receipt says of each member (None for a single job);
    DecodeError when the outputs cannot be cut by the request's parts."""
    if request.parts is None:
        return None
    return tuple(ReceiptPart(rows, inputs, outs) for rows, inputs, outs in zip(
        request.parts, parts_sha256(request.inputs, request.parts), parts_sha256(outputs, request.parts)))


def share_problems(receipt: Receipt, index: int | None, inputs: tuple[Tensor, ...],
                   outputs: tuple[Tensor, ...]) -> list[str]:
    """Whether `inputs` and `outputs` are what `receipt` commits to: the whole job's
    (index None), or member `index`'s of a micro-batch, checked from that member's own
    tensors alone. [] when they are."""
    if index is None:
        want = (receipt.input_sha256, receipt.output_sha256)
    elif receipt.parts is None or not 0 <= index < len(receipt.parts):
        return [f"the receipt has no part {index}"]
    else:
        part = receipt.parts[index]
        want = (part.input_sha256, part.output_sha256)
    problems = []
    if tensors_sha256(inputs) != want[0]:
        problems.append("the inputs are not the ones the receipt commits to")
    if tensors_sha256(outputs) != want[1]:
        problems.append("the outputs are not the ones the receipt commits to")
    return problems
