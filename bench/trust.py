"""Signing, verification and ledger throughput: prints JSON.

- sign / verify: receipts (Ed25519 over canonical msgpack under the receipt domain),
  one core, including encoding and full decoding with field checks on verify;
- ledger: receipts applied per second to a real SQLite file (WAL, synchronous=FULL),
  each with its buyer ack verified: one transaction per receipt on the calling thread
  (`ledger_applied_per_s`, how the daemons wrote before LedgerWriter), and through
  LedgerWriter with 64 jobs settling at once (`ledger_group_commit_per_s`: off the trio
  thread, the writes queued during one commit share the next one).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.ledger import Ledger, LedgerWriter  # noqa: E402
from protocol.messages import (  # noqa: E402
    Receipt, ReceiptAck, SignedReceipt, open_receipt, sign_receipt, sign_receipt_ack,
)
from protocol.signing import SigningKey  # noqa: E402

BUYER, PROVIDER = SigningKey(b"b" * 32), SigningKey(b"p" * 32)


def make_receipt(i: int) -> Receipt:
    return Receipt(job_id=f"{i:032x}", buyer=BUYER.public_key, provider=PROVIDER.public_key,
                   model_sha256="aa" * 32, input_sha256="bb" * 32, output_sha256="cc" * 32, queue_ms=1.5,
                   compute_ms=12.25, energy_j=0.75, energy_source="measured-rapl", price=1e-6,
                   issued_at_ms=1_795_000_000_000 + i)


def rate(fn, items) -> float:
    started = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - started)


def _acks(receipts, signed, n: int) -> list[bytes]:
    return [sign_receipt_ack(BUYER, ReceiptAck(r.job_id, SignedReceipt.parse(s).body_sha256, True, "", 1))
            for r, s in zip(receipts[n: 2 * n], signed[n: 2 * n])]


async def _group_commit(path: Path, pairs: list[tuple[bytes, bytes]], concurrency: int = 64) -> dict:
    writer = LedgerWriter(path, PROVIDER.public_key)
    pending = iter(pairs)

    async def worker() -> None:
        for receipt, ack in pending:
            await writer.apply(receipt, ack, now_ms=1)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - started
    check = Ledger(path, PROVIDER.public_key)
    assert check.count() == len(pairs) and check.total_pico() == 0
    check.close()
    writer.close()
    return {"per_s": len(pairs) / elapsed, "commits": writer.commits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--ledger-n", type=int, default=2000)
    args = ap.parse_args()
    receipts = [make_receipt(i) for i in range(max(args.n, 2 * args.ledger_n))]
    signs_per_s = rate(lambda r: sign_receipt(PROVIDER, r), receipts)
    signed = [sign_receipt(PROVIDER, r) for r in receipts]
    verifies_per_s = rate(open_receipt, signed)
    acks = [sign_receipt_ack(BUYER, ReceiptAck(r.job_id, SignedReceipt.parse(s).body_sha256, True, "", 1))
            for r, s in zip(receipts[: args.ledger_n], signed[: args.ledger_n])]
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(Path(tmp) / "ledger.sqlite", PROVIDER.public_key)
        pairs = list(zip(signed[: args.ledger_n], acks))
        applied_per_s = rate(lambda pair: ledger.apply(pair[0], pair[1], now_ms=1), pairs)
        replays_per_s = rate(lambda pair: ledger.apply(pair[0], pair[1], now_ms=2), pairs[:500])
        conserved = ledger.total_pico() == 0 and ledger.count() == args.ledger_n
        ledger.close()
        group = trio.run(_group_commit, Path(tmp) / "group.sqlite", list(zip(signed[args.ledger_n: 2 * args.ledger_n],
                                                                         _acks(receipts, signed, args.ledger_n))))
    print(json.dumps({"bench": "trust", "receipt_bytes": len(signed[0]),
                      "sign_per_s_per_core": round(signs_per_s), "verify_per_s_per_core": round(verifies_per_s),
                      "ledger_applied_per_s": round(applied_per_s),
                      "ledger_group_commit_per_s": round(group["per_s"]), "ledger_commits": group["commits"], "ledger_replays_refused_per_s": round(replays_per_s),
                      "ledger_conserved": conserved, "ledger_sync": "WAL, synchronous=FULL, one transaction each"},
                     indent=2))


if __name__ == "__main__":
    main()
