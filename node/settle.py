"""Settlement after the fact, buyer side: deliver the acks a provider never confirmed,
and compare what each side holds for the other.

One round trip on the settle protocol: we send our acks (the pending ones, or with
`everything` every ack we hold for this provider), the provider applies each it lacks
(once; the ledger verifies the buyer's signature over the exact receipt) and answers
with the status and receipt hash it now holds for each, plus the receipts it holds
unacked for us that we did not name. Equal status and hash: agreed, and the ack is no
longer pending. Anything else is listed, job by job, as a disagreement.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from protocol.errors import DecodeError
from protocol.messages import SignedReceipt
from protocol.signing import peer_id_from_public_key
from protocol.stream import MAX_SETTLE_ENTRIES, MAX_SETTLE_FRAME_BYTES, SettleAcks, decode_message, encode_message
from protocol.topics import SETTLE_PROTOCOL

from .clock import SYSTEM_CLOCK, Clock
from .ledger import Ledger, LedgerWriter
from .net import Network, StreamClosed

log = logging.getLogger("idlemesh.settle")
SETTLE_TIMEOUT_S = 20.0


@dataclass
class SettleReport:
    peer: str
    sent: int = 0          # acks we sent
    agreed: int = 0        # jobs both sides hold with the same receipt and status
    disagreements: list[dict] = field(default_factory=list)  # job by job: what each side holds
    unpaid_work: list[str] = field(default_factory=list)     # receipts it holds unacked that we never received
    error: str = ""

    def to_json(self) -> dict:
        return dict(vars(self))


async def settle_with(p2p: Network, ledger: Ledger, writer: LedgerWriter, peer_id: str, addrs, *,
                      everything: bool = False, clock: Clock = SYSTEM_CLOCK) -> SettleReport:
    """Reads go to `ledger`, our own writes to `writer` (off the trio thread)."""
    report = SettleReport(peer_id)
    rows = ledger.acks_with(peer_id) if everything else ledger.pending_acks(peer_id).get(peer_id, [])
    named = {job_id for job_id, _ in rows}
    for start in range(0, max(len(rows), 1), MAX_SETTLE_ENTRIES):
        chunk = rows[start:start + MAX_SETTLE_ENTRIES]
        try:
            with trio.fail_after(SETTLE_TIMEOUT_S):
                async with p2p.open_stream(peer_id, addrs, SETTLE_PROTOCOL) as stream:
                    await stream.send(encode_message(SettleAcks(tuple(ack for _, ack in chunk))))
                    payload = await stream.receive(max_bytes=MAX_SETTLE_FRAME_BYTES, timeout_s=SETTLE_TIMEOUT_S)
            held = decode_message(payload, max_bytes=MAX_SETTLE_FRAME_BYTES, expect=("settle-held",))
        except (DecodeError, StreamClosed, trio.TooSlowError, OSError) as exc:
            report.error = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
            return report
        report.sent += len(chunk)
        theirs = {e.job_id: e for e in held.entries}
        for job_id, _ in chunk:
            ours = ledger.status(job_id)
            entry = theirs.get(job_id)
            if ours is not None and entry is not None and (entry.status, entry.receipt_sha256) == ours:
                report.agreed += 1
                await writer.ack_delivered(job_id, ours[0], now_ms=clock.now_ms())
            else:
                report.disagreements.append({
                    "job_id": job_id, "ours": ours[0] if ours else "missing",
                    "theirs": entry.status if entry else "missing",
                    "same_receipt": bool(entry and ours and entry.receipt_sha256 == ours[1])})
    # What it holds unacked that we did not name: from its last answer (when the acks
    # went in chunks, an earlier answer lists jobs a later chunk named and settled).
    for entry in held.unnamed:
        if entry.job_id in named:
            continue  # named in some chunk, and judged there
        ours = ledger.status(entry.job_id)
        if ours is None or _paid_elsewhere(ledger, entry.job_id, peer_id):
            # It ran, we never got its result: no money moved between us. (When we hold
            # the job from another provider, its result was lost on the way, say in a
            # crash after the provider stored it, and the job was run again there.)
            report.unpaid_work.append(entry.job_id)
        elif ours != (entry.status, entry.receipt_sha256):
            report.disagreements.append({"job_id": entry.job_id, "ours": ours[0], "theirs": entry.status,
                                         "same_receipt": ours[1] == entry.receipt_sha256})
    if report.disagreements:
        log.warning("settle with %s: %d jobs disagree", peer_id, len(report.disagreements))
    return report


def _paid_elsewhere(ledger: Ledger, job_id: str, peer_id: str) -> bool:
    """Whether our ledger's receipt for this job was signed by another provider."""
    held = ledger.receipt_bytes(job_id)
    if held is None:
        return False
    return peer_id_from_public_key(SignedReceipt.parse(held[0]).receipt.provider) != peer_id
