"""Settlement on a real SQLite file: exactly once, conserved, append-only; offline verify."""

from __future__ import annotations

import sqlite3

import pytest

from node.cli import main
from node.ledger import Ledger, LedgerError
from protocol.errors import DecodeError
from protocol.messages import Receipt, ReceiptAck, SignedReceipt, sign_receipt, sign_receipt_ack
from protocol.settlement import open_any, open_statement
from protocol.signing import SigningKey

BUYER, PROVIDER, OTHER = SigningKey(b"b" * 32), SigningKey(b"p" * 32), SigningKey(b"o" * 32)


def receipt(job: int, price: float = 0.25, provider: SigningKey = PROVIDER) -> bytes:
    return sign_receipt(provider, Receipt(
        job_id=f"{job:032x}", buyer=BUYER.public_key, provider=provider.public_key, model_sha256="aa" * 32,
        input_sha256="bb" * 32, output_sha256="cc" * 32, queue_ms=1.0, compute_ms=10.0, energy_j=0.5,
        energy_source="declared", price=price, issued_at_ms=1_000))


def ack(signed: bytes, accepted: bool = True, signer: SigningKey = BUYER) -> bytes:
    parsed = SignedReceipt.parse(signed)
    return sign_receipt_ack(signer, ReceiptAck(parsed.receipt.job_id, parsed.body_sha256, accepted,
                                                "" if accepted else "output mismatch", 2_000))


def test_each_receipt_applies_once_and_money_is_conserved(tmp_path):
    buyer = Ledger(tmp_path / "b.sqlite", BUYER.public_key)
    provider = Ledger(tmp_path / "p.sqlite", PROVIDER.public_key)
    for job in range(5):
        r = receipt(job)
        a = ack(r)
        assert buyer.apply(r, a, now_ms=1).applied and provider.apply(r, a, now_ms=1).applied
        # A replay, in either form, changes nothing.
        assert not buyer.apply(r, a, now_ms=2).applied
        assert not buyer.apply(r, None, now_ms=2).applied
    assert buyer.total_pico() == provider.total_pico() == 0
    (b,) = buyer.balances()
    (p,) = provider.balances()
    assert b.net_price == pytest.approx(-1.25) and p.net_price == pytest.approx(1.25)
    assert b.receipts == p.receipts == 5


def test_bad_receipts_and_acks_change_nothing(tmp_path):
    ledger = Ledger(tmp_path / "b.sqlite", BUYER.public_key)
    good = receipt(1)
    altered = bytearray(good)
    altered[-5] ^= 1
    for bad, why in ((bytes(altered), "does not verify"),
                     (ack(good), "does not verify"),                       # an ack passed as a receipt
                     (receipt(2, provider=OTHER)[:-1], "does not verify")):
        with pytest.raises(LedgerError, match=why):
            ledger.apply(bad, None, now_ms=1)
    stranger = Ledger(tmp_path / "o.sqlite", OTHER.public_key)
    with pytest.raises(LedgerError, match="neither party"):
        stranger.apply(good, ack(good), now_ms=1)
    with pytest.raises(LedgerError, match="not signed by the receipt's buyer"):
        ledger.apply(good, ack(good, signer=OTHER), now_ms=1)
    with pytest.raises(LedgerError, match="another receipt"):
        ledger.apply(good, ack(receipt(3)), now_ms=1)
    assert ledger.count() == 0 and ledger.total_pico() == 0


def test_rejections_move_no_money_and_late_acks_settle_once(tmp_path):
    ledger = Ledger(tmp_path / "p.sqlite", PROVIDER.public_key)
    rejected = receipt(1)
    assert ledger.apply(rejected, ack(rejected, accepted=False), now_ms=1).status == "rejected"
    late = receipt(2)
    assert ledger.apply(late, None, now_ms=1).status == "unacked"
    assert ledger.balances() == []
    assert ledger.apply_ack(ack(late), now_ms=5).applied
    assert not ledger.apply_ack(ack(late), now_ms=6).applied
    (balance,) = ledger.balances()
    assert balance.receipts == 1 and balance.net_price == pytest.approx(0.25)
    assert ledger.total_pico() == 0
    assert ledger.history()[0]["status"] in ("accepted", "rejected")


def test_entries_and_settled_receipts_are_append_only(tmp_path):
    path = tmp_path / "b.sqlite"
    ledger = Ledger(path, BUYER.public_key)
    r = receipt(1)
    ledger.apply(r, ack(r), now_ms=1)
    db = sqlite3.connect(path)
    for statement in ("UPDATE entries SET amount_pico = 0", "DELETE FROM entries",
                      "DELETE FROM receipts", "UPDATE receipts SET status = 'rejected'"):
        with pytest.raises(sqlite3.IntegrityError):
            db.execute(statement)


def test_statement_and_verify_reject_any_altered_byte(tmp_path, capsys):
    ledger = Ledger(tmp_path / "b.sqlite", BUYER.public_key)
    for job in range(3):
        r = receipt(job, price=0.5)
        ledger.apply(r, ack(r), now_ms=1)
    signed, statement = ledger.statement(BUYER, PROVIDER.peer_id, now_ms=10)
    _, reopened = open_statement(signed)
    assert reopened == statement and statement.net_price == pytest.approx(-1.5) and statement.receipts == 3
    for blob in (receipt(9), signed):
        kind, _, _ = open_any(blob, now_ms=10)
        path = tmp_path / f"{kind}.idm"
        path.write_bytes(blob)
        assert main(["verify", str(path)]) == 0
        for i in range(len(blob)):  # every single-byte change is caught (`verify` is open_any)
            altered = bytearray(blob)
            altered[i] ^= 0x01
            with pytest.raises(DecodeError):
                open_any(bytes(altered), now_ms=10)
            if i in (0, len(blob) // 2, len(blob) - 1):  # and the command says so
                path.write_bytes(bytes(altered))
                assert main(["verify", str(path)]) == 1, f"byte {i} of a {kind}"
    assert "INVALID" in capsys.readouterr().out


def test_peer_rate_limit_is_per_peer_and_refills():
    from node.ratelimit import PeerRateLimit
    limit = PeerRateLimit(rate_per_s=1.0, burst=3.0)
    assert [limit.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limit.allow("b", 0.0)              # another peer has its own bucket
    assert not limit.allow("a", 0.5)
    assert limit.allow("a", 1.6)              # refilled at 1 per second
