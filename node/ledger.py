"""Durable settlement ledger: SQLite in WAL mode with synchronous=FULL.

- A receipt is applied at most once, keyed by its id (the job id). The ledger verifies
  it itself: the provider's signature, and the buyer's countersignature when present
  (signed by the receipt's buyer, over this receipt's exact body). Anything that does
  not verify, or does not involve this node, changes nothing.
- Money moves as append-only double entries, in integer pico-units so sums are exact:
  an accepted receipt debits the buyer and credits the provider by its price. Entries
  are never updated or deleted (triggers refuse it), so every balance is conserved:
  the sum of all entries is always zero.
- A receipt stored without an ack (the buyer vanished) moves no money until a valid
  ack arrives; a rejection is kept with its reason and moves none.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import DecodeError, SignatureError
from protocol.messages import SignedReceipt, open_receipt_ack
from protocol.settlement import Dispute, Statement, receipts_digest, sign_statement
from protocol.signing import SigningKey, peer_id_from_public_key

PICO = 10**12
MAX_PRICE = 9_000_000  # pico-units of a larger price would not fit in SQLite's int64
SCHEMA_VERSION = 2
_NOTHING_OWED = {"unacked": 0, "unacked_s": 0.0, "rejected": 0, "rejected_s": 0.0}

SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    receipt_id TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('buyer', 'provider')),
    buyer TEXT NOT NULL,
    provider TEXT NOT NULL,
    counterparty TEXT NOT NULL,
    counterparty_key BLOB NOT NULL,
    receipt BLOB NOT NULL,
    receipt_sha256 TEXT NOT NULL,
    ack BLOB,
    status TEXT NOT NULL CHECK (status IN ('accepted', 'rejected', 'unacked')),
    reason TEXT NOT NULL DEFAULT '',
    price_pico INTEGER NOT NULL,
    energy_j REAL NOT NULL,
    energy_source TEXT NOT NULL,
    compute_ms REAL NOT NULL,
    applied_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    receipt_id TEXT NOT NULL REFERENCES receipts(receipt_id),
    account TEXT NOT NULL,
    amount_pico INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    UNIQUE (receipt_id, account)
);
CREATE TABLE IF NOT EXISTS disputes (
    receipt_id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    dispute BLOB NOT NULL,
    at_ms INTEGER NOT NULL
);
-- Provider: each result frame, kept with its receipt until the request expires, so a
-- buyer that lost our answer (it crashed, the stream broke, we restarted) gets the same
-- bytes again instead of a refusal.
CREATE TABLE IF NOT EXISTS results (
    job_id TEXT PRIMARY KEY,
    buyer BLOB NOT NULL,
    frame BLOB NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
-- Buyer: acks the provider confirmed it holds (its `settled` frame or a settle
-- exchange). An ack not in here is delivered again when we next meet the provider.
CREATE TABLE IF NOT EXISTS acks_delivered (
    receipt_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
    BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
    BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END;
CREATE TRIGGER IF NOT EXISTS receipts_no_delete BEFORE DELETE ON receipts
    BEGIN SELECT RAISE(ABORT, 'receipts are append-only'); END;
CREATE TRIGGER IF NOT EXISTS receipts_settle_once BEFORE UPDATE ON receipts
    WHEN OLD.status != 'unacked' OR NEW.receipt != OLD.receipt
    BEGIN SELECT RAISE(ABORT, 'a settled receipt never changes'); END;
-- A provider asks, before each job, what the buyer owes it (unacked and rejected work).
CREATE INDEX IF NOT EXISTS receipts_by_status ON receipts (status, counterparty, applied_at_ms);
"""


BATCHED_CALLS = frozenset({"apply", "apply_ack", "ack_delivered", "prune_results"})


class LedgerError(ValueError):
    """A receipt or ack that does not verify or does not concern this node."""


@dataclass(frozen=True)
class Applied:
    applied: bool   # False: this receipt id was already applied, nothing changed
    status: str     # accepted / rejected / unacked
    receipt_id: str


@dataclass(frozen=True)
class Balance:
    counterparty: str
    receipts: int
    net_price: float  # > 0: the counterparty owes us
    energy_j: float


class Ledger:
    def __init__(self, path: Path, own_public_key: bytes, *, any_thread: bool = False):
        """`any_thread`: the connection may be used from worker threads, one at a time
        (LedgerWriter guarantees that)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.me = peer_id_from_public_key(own_public_key)
        self._batching = False
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=not any_thread)
        # A node reads on one connection while its LedgerWriter commits on another (WAL):
        # a write waits for the other's lock instead of failing.
        self.db.execute("PRAGMA busy_timeout = 10000")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version < SCHEMA_VERSION:
            old = self.db.execute("SELECT name FROM sqlite_master WHERE name = 'receipts'").fetchone()
            if old:  # a first-slice ledger: keep it, untouched, beside the new tables
                self.db.execute("ALTER TABLE receipts RENAME TO receipts_v1")
            self.db.executescript(SCHEMA)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        else:
            self.db.executescript(SCHEMA)

    # --- applying -----------------------------------------------------------------------

    @contextmanager
    def _transaction(self):
        """One transaction, or inside `apply_batch` one savepoint: a write that fails
        changes nothing, and the others of its batch still commit."""
        if self._batching:
            self.db.execute("SAVEPOINT item")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK TO item")
                self.db.execute("RELEASE item")
                raise
            self.db.execute("RELEASE item")
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def apply_batch(self, calls: list[tuple[str, tuple, dict]]) -> list:
        """Several `apply` / `apply_ack` / `ack_delivered` calls in one transaction: one
        fsync for all (group commit). Each result is the call's return value, or the
        LedgerError it raised (that call changed nothing; the others stand)."""
        results: list = []
        self.db.execute("BEGIN IMMEDIATE")
        self._batching = True
        try:
            for name, args, kwargs in calls:
                if name not in BATCHED_CALLS:
                    raise ValueError(f"{name} cannot run in a batch")
                try:
                    results.append(getattr(self, name)(*args, **kwargs))
                except LedgerError as exc:
                    results.append(exc)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        finally:
            self._batching = False
        return results

    def _check_ack(self, signed: SignedReceipt, ack_bytes: bytes) -> tuple[str, str]:
        try:
            env, ack = open_receipt_ack(ack_bytes)
        except (DecodeError, SignatureError) as exc:
            raise LedgerError(f"ack does not verify: {exc}") from None
        r = signed.receipt
        if env.signer != r.buyer:
            raise LedgerError("ack is not signed by the receipt's buyer")
        if ack.job_id != r.job_id or ack.receipt_sha256 != signed.body_sha256:
            raise LedgerError("ack is for another receipt")
        return ("accepted" if ack.accepted else "rejected"), ack.reason

    def apply(self, receipt: bytes, ack: bytes | None, *, now_ms: int,
              keep: tuple[bytes, bytes, int] | None = None) -> Applied:
        """Apply a provider-signed receipt (and the buyer's ack, if any) exactly once.
        `keep` = (buyer key, result frame, expires_at_ms): the provider's result, stored in
        the same transaction, so a receipt is never durable without the outputs it names."""
        try:
            signed = SignedReceipt.parse(receipt)
        except (DecodeError, SignatureError) as exc:
            raise LedgerError(f"receipt does not verify: {exc}") from None
        r = signed.receipt
        buyer, provider = peer_id_from_public_key(r.buyer), peer_id_from_public_key(r.provider)
        if self.me == provider:
            role, counterparty, counterparty_key = "provider", buyer, r.buyer
        elif self.me == buyer:
            role, counterparty, counterparty_key = "buyer", provider, r.provider
        else:
            raise LedgerError("receipt involves neither party of this ledger")
        price_pico = round(r.price * PICO)
        if r.price > MAX_PRICE:
            raise LedgerError(f"price {r.price} is over what one receipt may carry ({MAX_PRICE})")
        status, reason = self._check_ack(signed, ack) if ack is not None else ("unacked", "")
        with self._transaction():
            cur = self.db.execute(
                "INSERT OR IGNORE INTO receipts VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (r.job_id, role, buyer, provider, counterparty, counterparty_key, receipt, signed.body_sha256,
                 ack, status, reason, price_pico, r.energy_j, r.energy_source, r.compute_ms, now_ms))
            applied = cur.rowcount == 1
            if applied and status == "accepted":
                self._post(r.job_id, buyer, provider, price_pico, now_ms)
            if applied and keep is not None:
                self.db.execute("INSERT OR REPLACE INTO results VALUES (?,?,?,?)", (r.job_id, *keep))
        if not applied:
            status = self.db.execute("SELECT status FROM receipts WHERE receipt_id = ?", (r.job_id,)).fetchone()[0]
        return Applied(applied, status, r.job_id)

    def apply_ack(self, ack: bytes, *, now_ms: int) -> Applied:
        """A late countersignature for a receipt stored unacked: settles it, once."""
        try:
            _, parsed = open_receipt_ack(ack)
        except (DecodeError, SignatureError) as exc:
            raise LedgerError(f"ack does not verify: {exc}") from None
        row = self.db.execute("SELECT receipt, status FROM receipts WHERE receipt_id = ?", (parsed.job_id,)).fetchone()
        if row is None:
            raise LedgerError(f"no receipt {parsed.job_id} to acknowledge")
        signed = SignedReceipt.parse(row[0])
        status, reason = self._check_ack(signed, ack)
        if row[1] != "unacked":
            return Applied(False, row[1], parsed.job_id)
        r = signed.receipt
        with self._transaction():
            cur = self.db.execute("UPDATE receipts SET ack = ?, status = ?, reason = ? "
                                  "WHERE receipt_id = ? AND status = 'unacked'", (ack, status, reason, r.job_id))
            applied = cur.rowcount == 1
            if applied and status == "accepted":
                self._post(r.job_id, peer_id_from_public_key(r.buyer), peer_id_from_public_key(r.provider),
                           round(r.price * PICO), now_ms)
        return Applied(applied, status, r.job_id)

    def _post(self, receipt_id: str, buyer: str, provider: str, price_pico: int, now_ms: int) -> None:
        self.db.executemany("INSERT INTO entries (receipt_id, account, amount_pico, at_ms) VALUES (?,?,?,?)",
                            [(receipt_id, buyer, -price_pico, now_ms), (receipt_id, provider, price_pico, now_ms)])

    def record_dispute(self, signed_dispute: bytes, dispute: Dispute, *, now_ms: int) -> bool:
        cur = self.db.execute("INSERT OR IGNORE INTO disputes VALUES (?,?,?,?)",
                              (dispute.job_id, peer_id_from_public_key(dispute.provider), signed_dispute, now_ms))
        return cur.rowcount == 1

    # --- results kept for buyers, acks delivered to providers --------------------------

    def kept_result(self, job_id: str, *, now_ms: int) -> tuple[bytes, bytes] | None:
        """(buyer key, result frame) of a job we ran, while its request is unexpired."""
        row = self.db.execute("SELECT buyer, frame FROM results WHERE job_id = ? AND expires_at_ms > ?",
                              (job_id, now_ms)).fetchone()
        return (row[0], row[1]) if row else None

    def prune_results(self, *, now_ms: int, max_bytes: int) -> int:
        """Drop results whose request expired, then the oldest acked ones over `max_bytes`;
        returns how many went. An unacked result stays until its request expires."""
        with self._transaction():
            return self._prune_results(now_ms, max_bytes)

    def _prune_results(self, now_ms: int, max_bytes: int) -> int:
        dropped = self.db.execute("DELETE FROM results WHERE expires_at_ms <= ?", (now_ms,)).rowcount
        total = self.db.execute("SELECT COALESCE(SUM(LENGTH(frame)), 0) FROM results").fetchone()[0]
        if total > max_bytes:
            for job_id, size in self.db.execute(
                    "SELECT r.job_id, LENGTH(r.frame) FROM results r JOIN receipts c ON c.receipt_id = r.job_id "
                    "WHERE c.status != 'unacked' ORDER BY r.expires_at_ms").fetchall():
                self.db.execute("DELETE FROM results WHERE job_id = ?", (job_id,))
                dropped += 1
                total -= size
                if total <= max_bytes:
                    break
        return dropped

    def status(self, receipt_id: str) -> tuple[str, str] | None:
        """(status, receipt sha256) of a receipt we hold, or None."""
        row = self.db.execute("SELECT status, receipt_sha256 FROM receipts WHERE receipt_id = ?",
                              (receipt_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def ack_delivered(self, receipt_id: str, status: str, *, now_ms: int) -> None:
        with self._transaction():
            self.db.execute("INSERT OR IGNORE INTO acks_delivered VALUES (?,?,?)", (receipt_id, status, now_ms))

    def pending_acks(self, counterparty: str | None = None) -> dict[str, list[tuple[str, bytes]]]:
        """Provider peer id -> [(job id, our ack)] for acks it has not confirmed holding."""
        query = ("SELECT counterparty, receipt_id, ack FROM receipts WHERE role = 'buyer' AND ack IS NOT NULL "
                 "AND receipt_id NOT IN (SELECT receipt_id FROM acks_delivered)")
        args: tuple = ()
        if counterparty:
            query += " AND counterparty = ?"
            args = (counterparty,)
        out: dict[str, list[tuple[str, bytes]]] = {}
        for peer, job_id, ack in self.db.execute(query + " ORDER BY applied_at_ms, receipt_id", args):
            out.setdefault(peer, []).append((job_id, ack))
        return out

    def acks_with(self, counterparty: str) -> list[tuple[str, bytes]]:
        """(job id, our ack) of every receipt we acked with this provider, oldest first."""
        return self.db.execute("SELECT receipt_id, ack FROM receipts WHERE role = 'buyer' AND counterparty = ? "
                               "AND ack IS NOT NULL ORDER BY applied_at_ms, receipt_id", (counterparty,)).fetchall()

    def held_with(self, counterparty: str, *, limit: int = 4096) -> list[tuple[str, str, str]]:
        """(job id, receipt sha256, status) of every receipt with `counterparty`, oldest first."""
        return self.db.execute("SELECT receipt_id, receipt_sha256, status FROM receipts WHERE counterparty = ? "
                               "ORDER BY applied_at_ms, receipt_id LIMIT ?", (counterparty, limit)).fetchall()

    # --- reading ------------------------------------------------------------------------

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]

    def has(self, receipt_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM receipts WHERE receipt_id = ?", (receipt_id,)).fetchone() is not None

    def total_pico(self) -> int:
        """Sum of every entry: zero in a conserved ledger."""
        return self.db.execute("SELECT COALESCE(SUM(amount_pico), 0) FROM entries").fetchone()[0]

    def balances(self) -> list[Balance]:
        rows = self.db.execute(
            "SELECT r.counterparty, COUNT(*), "
            "COALESCE(SUM((SELECT amount_pico FROM entries e WHERE e.receipt_id = r.receipt_id AND e.account = ?)), 0),"
            " SUM(r.energy_j) FROM receipts r WHERE r.status = 'accepted' GROUP BY r.counterparty "
            "ORDER BY r.counterparty", (self.me,)).fetchall()
        return [Balance(cp, n, amount / PICO, energy) for cp, n, amount, energy in rows]

    def history(self, *, counterparty: str | None = None, limit: int = 100) -> list[dict]:
        query = ("SELECT receipt_id, role, counterparty, status, reason, price_pico, energy_j, energy_source, "
                 "compute_ms, applied_at_ms FROM receipts")
        args: tuple = ()
        if counterparty:
            query += " WHERE counterparty = ?"
            args = (counterparty,)
        query += " ORDER BY applied_at_ms DESC, receipt_id LIMIT ?"
        keys = ("receipt_id", "role", "counterparty", "status", "reason", "price", "energy_j", "energy_source",
                "compute_ms", "applied_at_ms")
        out = []
        for row in self.db.execute(query, args + (limit,)):
            item = dict(zip(keys, row))
            item["price"] /= PICO
            out.append(item)
        return out

    def receipt_bytes(self, receipt_id: str) -> tuple[bytes, bytes | None] | None:
        row = self.db.execute("SELECT receipt, ack FROM receipts WHERE receipt_id = ?", (receipt_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def reputation(self) -> dict[str, dict[str, int]]:
        """Per provider, from this node's own receipts: accepted (and undisputed), rejected, disputed."""
        out: dict[str, dict[str, int]] = {}
        for provider, status, n in self.db.execute(
                "SELECT provider, status, COUNT(*) FROM receipts WHERE role = 'buyer' GROUP BY provider, status"):
            out.setdefault(provider, {"accepted": 0, "rejected": 0, "disputed": 0, "unacked": 0})[status] = n
        for provider, n in self.db.execute("SELECT provider, COUNT(*) FROM disputes GROUP BY provider"):
            row = out.setdefault(provider, {"accepted": 0, "rejected": 0, "disputed": 0, "unacked": 0})
            row["disputed"] = n
            row["accepted"] = max(0, row["accepted"] - n)  # a disputed receipt is no longer good
        return out

    def owed_by(self, buyer: str, *, rejected_since_ms: int) -> dict[str, float]:
        """A buyer's standing with us as its provider: compute seconds delivered and not
        acked (ever), and rejected since `rejected_since_ms`, with their counts."""
        return self._owed(rejected_since_ms, buyer).get(buyer, dict(_NOTHING_OWED))

    def buyers_owing(self, *, rejected_since_ms: int, limit: int = 10) -> dict[str, dict[str, float]]:
        """The buyers that owe us most (unacked plus recently rejected compute seconds)."""
        owed = self._owed(rejected_since_ms)
        top = sorted(owed.items(), key=lambda kv: -(kv[1]["unacked_s"] + kv[1]["rejected_s"]))[:limit]
        return {buyer: {k: round(v, 3) for k, v in row.items()} for buyer, row in top}

    def _owed(self, rejected_since_ms: int, buyer: str | None = None) -> dict[str, dict[str, float]]:
        query = ("SELECT counterparty, status, COUNT(*), COALESCE(SUM(compute_ms), 0) FROM receipts "
                 "WHERE role = 'provider' AND (status = 'unacked' OR (status = 'rejected' AND applied_at_ms >= ?))")
        args: tuple = (rejected_since_ms,)
        if buyer is not None:
            query, args = query + " AND counterparty = ?", args + (buyer,)
        out: dict[str, dict[str, float]] = {}
        for counterparty, status, n, compute_ms in self.db.execute(query + " GROUP BY counterparty, status", args):
            row = out.setdefault(counterparty, dict(_NOTHING_OWED))
            row[status], row[f"{status}_s"] = n, compute_ms / 1000
        return out

    def settled_with(self) -> dict[str, int]:
        """Jobs settled (accepted) with each counterparty, in either role: the evidence a
        reputation digest from that peer is weighed by."""
        return dict(self.db.execute("SELECT counterparty, COUNT(*) FROM receipts WHERE status = 'accepted' "
                                    "GROUP BY counterparty"))

    def provider_keys(self) -> dict[str, bytes]:
        """Public key of each provider we bought from, by peer id."""
        return {provider: key for provider, key in self.db.execute(
            "SELECT DISTINCT provider, counterparty_key FROM receipts WHERE role = 'buyer'")}

    def statement(self, key: SigningKey, counterparty: str, *, now_ms: int) -> tuple[bytes, Statement]:
        """A signed statement of the netted balance with `counterparty` (accepted receipts)."""
        rows = self.db.execute(
            "SELECT r.counterparty_key, r.receipt_sha256, r.energy_j, "
            "(SELECT amount_pico FROM entries e WHERE e.receipt_id = r.receipt_id AND e.account = ?) "
            "FROM receipts r WHERE r.counterparty = ? AND r.status = 'accepted'", (self.me, counterparty)).fetchall()
        if not rows:
            raise LedgerError(f"no accepted receipts with {counterparty}")
        statement = Statement(
            issuer=key.public_key, counterparty=rows[0][0], receipts=len(rows),
            net_price=sum(r[3] for r in rows) / PICO, energy_j=sum(r[2] for r in rows),
            receipts_sha256=receipts_digest([r[1] for r in rows]), as_of_ms=now_ms)
        return sign_statement(key, statement), statement

    def resolve_peer(self, prefix: str) -> str:
        """The one counterparty whose peer id starts with `prefix` (tables print prefixes)."""
        rows = [r[0] for r in self.db.execute("SELECT DISTINCT counterparty FROM receipts WHERE counterparty >= ? "
                                              "AND counterparty < ? ORDER BY counterparty LIMIT 3",
                                              (prefix, prefix + "\U0010ffff"))]
        if not rows:
            raise LedgerError(f"no receipt with a peer whose id starts with {prefix!r}")
        if len(rows) > 1 and prefix not in rows:
            raise LedgerError(f"{prefix!r} matches several peers ({', '.join(rows[:2])}, ...): type more of the id")
        return prefix if prefix in rows else rows[0]

    def activity(self, *, since_ms: int = 0) -> dict:
        """Receipts applied since `since_ms`: jobs by status, price earned or paid on
        accepted ones, compute seconds, and energy J by how it was obtained."""
        jobs = dict(self.db.execute("SELECT status, COUNT(*) FROM receipts WHERE applied_at_ms >= ? "
                                    "GROUP BY status", (since_ms,)).fetchall())
        price_pico, compute_ms = self.db.execute(
            "SELECT COALESCE(SUM(price_pico), 0), COALESCE(SUM(compute_ms), 0) FROM receipts "
            "WHERE status = 'accepted' AND applied_at_ms >= ?", (since_ms,)).fetchone()
        energy = dict(self.db.execute("SELECT energy_source, SUM(energy_j) FROM receipts WHERE status = 'accepted' "
                                      "AND applied_at_ms >= ? GROUP BY energy_source", (since_ms,)).fetchall())
        return {"jobs": jobs, "price": price_pico / PICO, "compute_s": compute_ms / 1000, "energy_j": energy}

    def close(self) -> None:
        self.db.close()



class LedgerWriter:
    """The ledger's writes, off the trio thread and committed in groups.

    Each write (`apply`, `apply_ack`, `ack_delivered`, `prune_results`) is awaited; the
    first caller to find no commit in flight takes every write queued by then to a
    worker thread and commits them in one transaction (`Ledger.apply_batch`), so the
    event loop never waits on an fsync and concurrent jobs share one. A caller returns
    only once its write is durable. Writes go through their own connection; reads stay
    on the node's `Ledger` (WAL: they see every committed write)."""

    def __init__(self, path: Path, own_public_key: bytes, *, offload=None):
        import trio

        self._trio = trio
        self._ledger = Ledger(path, own_public_key, any_thread=True)
        self._offload = offload or trio.to_thread.run_sync
        self._queue: list[list] = []
        self._flushing = False
        self.commits = 0
        self.writes = 0

    async def _call(self, name: str, *args, **kwargs):
        trio = self._trio
        item = [name, args, kwargs, trio.Event(), None]
        self._queue.append(item)
        if not self._flushing:
            self._flushing = True
            try:
                # Shielded: once writes are taken, they finish and their waiters hear.
                with trio.CancelScope(shield=True):
                    while self._queue:
                        batch, self._queue = self._queue, []
                        try:
                            results = await self._offload(self._ledger.apply_batch, [(n, a, k) for n, a, k, _, _ in batch])
                        except Exception as exc:  # noqa: BLE001 - the disk failed: every waiter of this batch hears it
                            results = [exc] * len(batch)
                        self.commits += 1
                        self.writes += len(batch)
                        for waiting, result in zip(batch, results):
                            waiting[4] = result
                            waiting[3].set()
            finally:
                self._flushing = False
        await item[3].wait()
        if isinstance(item[4], BaseException):
            raise item[4]
        return item[4]

    async def apply(self, receipt: bytes, ack: bytes | None, *, now_ms: int,
                    keep: tuple[bytes, bytes, int] | None = None) -> Applied:
        return await self._call("apply", receipt, ack, now_ms=now_ms, keep=keep)

    async def apply_ack(self, ack: bytes, *, now_ms: int) -> Applied:
        return await self._call("apply_ack", ack, now_ms=now_ms)

    async def ack_delivered(self, receipt_id: str, status: str, *, now_ms: int) -> None:
        return await self._call("ack_delivered", receipt_id, status, now_ms=now_ms)

    async def prune_results(self, *, now_ms: int, max_bytes: int) -> int:
        return await self._call("prune_results", now_ms=now_ms, max_bytes=max_bytes)

    def close(self) -> None:
        self._ledger.close()
