"""Durable receipt ledger: SQLite in WAL mode, synchronous=FULL, each receipt applied once.

The job id is the receipt id (PRIMARY KEY), so applying the same receipt again, or a
second receipt for the same job, changes nothing.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    job_id TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('buyer', 'provider')),
    counterparty TEXT NOT NULL,
    receipt BLOB NOT NULL,
    ack BLOB,
    accepted INTEGER,
    price REAL NOT NULL,
    energy_j REAL NOT NULL,
    energy_source TEXT NOT NULL,
    compute_ms REAL NOT NULL,
    applied_at_ms INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Balance:
    counterparty: str
    receipts: int
    price: float
    energy_j: float


class Ledger:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def apply(self, *, job_id: str, role: str, counterparty: str, receipt: bytes, ack: bytes | None,
              accepted: bool | None, price: float, energy_j: float, energy_source: str,
              compute_ms: float, now_ms: int) -> bool:
        """Record a receipt once. Returns False (and changes nothing) if the id is known."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO receipts VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (job_id, role, counterparty, receipt, ack, None if accepted is None else int(accepted),
             price, energy_j, energy_source, compute_ms, now_ms))
        return cur.rowcount == 1

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]

    def balances(self) -> list[Balance]:
        rows = self.db.execute(
            "SELECT counterparty, COUNT(*), SUM(price), SUM(energy_j) FROM receipts "
            "WHERE accepted IS NOT 0 GROUP BY counterparty ORDER BY counterparty").fetchall()
        return [Balance(*row) for row in rows]

    def close(self) -> None:
        self.db.close()
