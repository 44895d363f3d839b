"""Settlement invariants, read from the nodes' SQLite files after a run (README,
"Settlement invariants"):

1. each job is paid at most once across all providers;
2. after reconciliation, buyer and provider hold the same receipt and status for every
   job between them (a receipt the provider holds unacked and the buyer never received
   is unpaid work, not a disagreement: no money moved on either side);
3. every submitted job ends settled or failed with a reason, and a settled job is one
   the buyer's ledger accepted;
4. the entries of every ledger sum to zero.

`violations(...)` returns one line per breach; an empty list is a pass.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def _rows(db_path: Path, query: str, args: tuple = ()) -> list[tuple]:
    if not db_path.exists():
        return []
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return db.execute(query, args).fetchall()
    finally:
        db.close()


def _peer_id(home: Path) -> str | None:
    from node.identity import load_key

    try:
        return load_key(home)[1].peer_id
    except Exception:  # noqa: BLE001 - a home that never started holds no key, and no receipts
        return None


def violations(buyer_homes: list[Path], provider_homes: list[Path], *, after_reconcile: bool = True) -> list[str]:
    found: list[str] = []
    providers = {_peer_id(h): h for h in provider_homes}
    paid_by_job: dict[str, list[str]] = {}
    provider_rows: dict[str, dict[str, tuple]] = {}
    for peer, home in providers.items():
        ledger = home / "ledger.sqlite"
        total = _rows(ledger, "SELECT COALESCE(SUM(amount_pico), 0) FROM entries")
        if total and total[0][0] != 0:
            found.append(f"provider {peer}: entries sum to {total[0][0]}, not 0")
        rows = _rows(ledger, "SELECT receipt_id, counterparty, receipt_sha256, status FROM receipts WHERE role = 'provider'")
        provider_rows[peer] = {job: (buyer, sha, status) for job, buyer, sha, status in rows}
        for job, _, _, status in rows:
            if status == "accepted":
                paid_by_job.setdefault(job, []).append(peer)
    for job, paid in paid_by_job.items():
        if len(paid) > 1:
            found.append(f"job {job}: paid to {len(paid)} providers ({', '.join(p[-8:] for p in paid)})")
    for home in buyer_homes:
        me = _peer_id(home)
        ledger = home / "ledger.sqlite"
        total = _rows(ledger, "SELECT COALESCE(SUM(amount_pico), 0) FROM entries")
        if total and total[0][0] != 0:
            found.append(f"buyer {me}: entries sum to {total[0][0]}, not 0")
        ours = {job: (provider, sha, status) for job, provider, sha, status in _rows(
            ledger, "SELECT receipt_id, counterparty, receipt_sha256, status FROM receipts WHERE role = 'buyer'")}
        if after_reconcile:
            for job, (provider, sha, status) in ours.items():
                theirs = provider_rows.get(provider, {}).get(job)
                if provider in provider_rows and (theirs is None or theirs[1:] != (sha, status)):
                    found.append(f"job {job}: buyer holds {status}, provider {provider[-8:]} holds "
                                 f"{theirs[2] if theirs else 'nothing'}" +
                                 ("" if theirs is None or theirs[1] == sha else " (another receipt)"))
            for peer, rows in provider_rows.items():
                for job, (buyer, sha, status) in rows.items():
                    if buyer == me and status != "unacked" and ours.get(job, (None, None, None))[1:] != (sha, status):
                        found.append(f"job {job}: provider {peer[-8:]} holds {status}, the buyer "
                                     f"{ours[job][2] if job in ours else 'nothing'}")
        for job, state, error in _rows(home / "jobs.sqlite", "SELECT job_id, state, error FROM jobs"):
            if state not in ("settled", "failed"):
                found.append(f"job {job}: ended {state}, neither settled nor failed")
            elif state == "failed" and not error:
                found.append(f"job {job}: failed without a reason")
            elif state == "failed" and ours.get(job, (None, None, None))[2] == "accepted":
                found.append(f"job {job}: paid for, but the journal says it failed")
            elif state == "settled" and ours.get(job, (None, None, None))[2] != "accepted":
                found.append(f"job {job}: settled in the journal but not accepted in the buyer's ledger")
    return found
