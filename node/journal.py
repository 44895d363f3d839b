"""The buyer's job journal: what was submitted and how far each job got, on disk
(SQLite WAL, synchronous=FULL) before anything goes on the wire. After a crash,
`idlemesh submit --resume` reads it and finishes the batch; the ledger stays the truth
about what was paid for, so a job whose receipt is there is never run or paid twice.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol.lifecycle import STATES

# Job states are the protocol's one vocabulary (protocol.lifecycle.STATES). Journals
# written before version 2 said 'sent' for 'requested'; they are migrated on open.
JOURNAL_VERSION = 2
# A warm client's request is journalled as a batch of one whose inputs the application
# holds (no inputs path): this is its solver, and `resume` passes it by.
CLIENT_REQUEST = "client-request"
STATE_CHECK = "state IN (" + ", ".join(f"'{s}'" for s in STATES) + ")"

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    created_at_ms INTEGER NOT NULL,
    model_path TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    inputs_path TEXT NOT NULL,
    count INTEGER NOT NULL,
    max_price REAL NOT NULL,
    solver TEXT NOT NULL,
    out_dir TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS discarded (
    batch_id TEXT PRIMARY KEY REFERENCES batches(batch_id),
    at_ms INTEGER NOT NULL
);
"""
JOBS_TABLE = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL REFERENCES batches(batch_id),
    idx INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (STATE_CHECK),
    provider TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    output_path TEXT NOT NULL DEFAULT '',
    updated_at_ms INTEGER NOT NULL
);
""".replace("STATE_CHECK", STATE_CHECK)


@dataclass(frozen=True)
class Batch:
    batch_id: str
    model_path: Path
    model_sha256: str
    inputs_path: Path
    count: int
    max_price: float
    solver: str
    out_dir: Path

    def load_inputs(self) -> dict[str, np.ndarray]:
        with np.load(self.inputs_path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}


@dataclass(frozen=True)
class JournalJob:
    job_id: str
    index: int
    state: str
    provider: str
    attempts: int
    output_path: str


class Journal:
    def __init__(self, home: Path, *, any_thread: bool = False):
        """`any_thread`: writes may come from worker threads, one at a time."""
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.db = sqlite3.connect(home / "jobs.sqlite", isolation_level=None, check_same_thread=not any_thread)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self._migrate()
        self.db.executescript(SCHEMA)
        self.db.execute(JOBS_TABLE)
        self.db.execute(f"PRAGMA user_version = {JOURNAL_VERSION}")

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        has_jobs = self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone()
        if version >= JOURNAL_VERSION or not has_jobs:
            return
        # Version 1 named the lifecycle its own way, and SQLite cannot alter a CHECK:
        # rebuild the table in one transaction, renaming 'sent' to 'requested'.
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("ALTER TABLE jobs RENAME TO jobs_v1")
        self.db.execute(JOBS_TABLE)
        self.db.execute("INSERT INTO jobs SELECT job_id, batch_id, idx, CASE state WHEN 'sent' THEN 'requested' "
                        "ELSE state END, provider, attempts, error, output_path, updated_at_ms FROM jobs_v1")
        self.db.execute("DROP TABLE jobs_v1")
        self.db.execute(f"PRAGMA user_version = {JOURNAL_VERSION}")
        self.db.execute("COMMIT")

    def new_batch(self, *, model_path: Path, model_sha256: str, inputs: dict[str, np.ndarray], count: int,
                  max_price: float, solver: str, out_dir: Path, now_ms: int) -> tuple[Batch, list[str]]:
        batch_id = secrets.token_hex(8)
        folder = self.home / "batches" / batch_id
        folder.mkdir(parents=True, exist_ok=True)
        inputs_path = folder / "inputs.npz"
        tmp = folder / "inputs.tmp.npz"
        with open(tmp, "wb") as handle:
            np.savez(handle, **inputs)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, inputs_path)
        job_ids = [secrets.token_hex(16) for _ in range(count)]
        batch = Batch(batch_id, model_path.resolve(), model_sha256, inputs_path, count, max_price, solver,
                      out_dir.resolve())
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT INTO batches VALUES (?,?,?,?,?,?,?,?,?)",
                        (batch_id, now_ms, str(batch.model_path), model_sha256, str(inputs_path), count,
                         max_price, solver, str(batch.out_dir)))
        self.db.executemany("INSERT INTO jobs (job_id, batch_id, idx, state, updated_at_ms) VALUES (?,?,?,?,?)",
                            [(jid, batch_id, i, "pending", now_ms) for i, jid in enumerate(job_ids)])
        self.db.execute("COMMIT")
        return batch, job_ids

    def new_request(self, job_id: str, *, model: str, model_sha256: str, max_price: float, now_ms: int,
                    sent_to: str = "") -> None:
        """One request of a warm client (idlemesh.Client, the gateway): a batch of one job
        whose inputs the application holds. It is never resumed (the application asks
        again, and the ledger still makes sure nothing is paid twice); its row says what
        was sent where. `sent_to`: the provider it is about to be sent to, in the same
        commit (what `sent` would say next: one fsync before the wire, not two)."""
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT INTO batches VALUES (?,?,?,?,?,?,?,?,?)",
                        (job_id[:16], now_ms, model, model_sha256, "", 1, max_price, CLIENT_REQUEST, ""))
        self.db.execute("INSERT INTO jobs (job_id, batch_id, idx, state, provider, attempts, updated_at_ms) "
                        "VALUES (?,?,?,?,?,?,?)",
                        (job_id, job_id[:16], 0, "requested" if sent_to else "pending", sent_to, int(bool(sent_to)),
                         now_ms))
        self.db.execute("COMMIT")

    def open_requests(self) -> list[JournalJob]:
        """A warm client's requests not settled nor failed: what it was doing when it
        stopped (a crash, a kill)."""
        rows = self.db.execute(
            "SELECT j.job_id, j.idx, j.state, j.provider, j.attempts, j.output_path FROM jobs j JOIN batches b "
            "ON b.batch_id = j.batch_id WHERE b.solver = ? AND j.state NOT IN ('settled', 'failed')",
            (CLIENT_REQUEST,)).fetchall()
        return [JournalJob(*row) for row in rows]

    def latest_unfinished(self) -> Batch | None:
        row = self.db.execute(
            "SELECT b.* FROM batches b WHERE b.solver != ? AND EXISTS (SELECT 1 FROM jobs j "
            "WHERE j.batch_id = b.batch_id AND j.state != 'settled') "
            "AND b.batch_id NOT IN (SELECT batch_id FROM discarded) "
            "ORDER BY b.created_at_ms DESC LIMIT 1", (CLIENT_REQUEST,)).fetchone()
        return self._batch(row) if row else None

    def is_discarded(self, batch_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM discarded WHERE batch_id = ?", (batch_id,)).fetchone() is not None

    def summaries(self) -> list[dict]:
        """Every batch, newest first, with its jobs counted by state and its stored inputs."""
        rows = self.db.execute(
            "SELECT b.batch_id, b.created_at_ms, b.model_path, b.count, b.out_dir, b.inputs_path, b.solver, "
            "SUM(j.state = 'settled'), SUM(j.state = 'failed'), SUM(j.state NOT IN ('settled', 'failed')), "
            "b.batch_id IN (SELECT batch_id FROM discarded) "
            "FROM batches b LEFT JOIN jobs j ON j.batch_id = b.batch_id GROUP BY b.batch_id "
            "ORDER BY b.created_at_ms DESC, b.batch_id").fetchall()
        out = []
        for batch_id, created, model, count, out_dir, inputs, solver, settled, failed, open_, discarded in rows:
            inputs_path = Path(inputs) if inputs else None  # a warm client's request stores none
            out.append({"batch": batch_id, "created_at_ms": created, "model": model, "jobs": count,
                        "settled": settled or 0, "failed": failed or 0, "unfinished": open_ or 0,
                        "discarded": bool(discarded), "out_dir": out_dir,
                        "inputs_bytes": inputs_path.stat().st_size if inputs_path and inputs_path.is_file() else 0,
                        "client_request": solver == CLIENT_REQUEST})
        return out

    def discard(self, batch_id: str, now_ms: int) -> None:
        """Never resume this batch; its stored inputs go (jobs stay, as history)."""
        self.db.execute("INSERT OR IGNORE INTO discarded VALUES (?, ?)", (batch_id, now_ms))
        self._drop_inputs(batch_id)

    def prune(self) -> list[str]:
        """Drop the stored inputs of finished batches (every job settled) and discarded ones."""
        done = [r[0] for r in self.db.execute(
            "SELECT b.batch_id FROM batches b WHERE b.batch_id IN (SELECT batch_id FROM discarded) OR NOT EXISTS "
            "(SELECT 1 FROM jobs j WHERE j.batch_id = b.batch_id AND j.state != 'settled')")]
        return [batch_id for batch_id in done if self._drop_inputs(batch_id)]

    def _drop_inputs(self, batch_id: str) -> bool:
        folder = self.home / "batches" / batch_id
        files = list(folder.glob("*")) if folder.is_dir() else []
        for f in files:
            f.unlink()
        if folder.is_dir():
            folder.rmdir()
        return bool(files)

    def batch(self, batch_id: str) -> Batch | None:
        row = self.db.execute("SELECT * FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
        return self._batch(row) if row else None

    @staticmethod
    def _batch(row) -> Batch:
        batch_id, _, model_path, sha, inputs_path, count, max_price, solver, out_dir = row
        return Batch(batch_id, Path(model_path), sha, Path(inputs_path), count, max_price, solver, Path(out_dir))

    def jobs(self, batch_id: str) -> list[JournalJob]:
        rows = self.db.execute("SELECT job_id, idx, state, provider, attempts, output_path FROM jobs "
                               "WHERE batch_id = ? ORDER BY idx", (batch_id,)).fetchall()
        return [JournalJob(*row) for row in rows]

    def sent(self, job_id: str, provider: str, now_ms: int) -> None:
        self.db.execute("UPDATE jobs SET state = 'requested', provider = ?, attempts = attempts + 1, updated_at_ms = ? "
                        "WHERE job_id = ? AND state != 'settled'", (provider, now_ms, job_id))

    def settled(self, job_id: str, output_path: str, now_ms: int) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("UPDATE jobs SET state = 'settled', output_path = ?, error = '', updated_at_ms = ? "
                        "WHERE job_id = ?", (output_path, now_ms, job_id))
        # A warm client's request is done with once paid for (the ledger holds its
        # receipt): its rows go, so a gateway's journal does not grow with every request.
        if self.db.execute("DELETE FROM batches WHERE batch_id = ? AND solver = ?",
                           (job_id[:16], CLIENT_REQUEST)).rowcount:
            self.db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))
        self.db.execute("COMMIT")

    def failed(self, job_id: str, error: str, now_ms: int) -> None:
        self.db.execute("UPDATE jobs SET state = 'failed', error = ?, updated_at_ms = ? "
                        "WHERE job_id = ? AND state != 'settled'", (error[:1000], now_ms, job_id))

    def close(self) -> None:
        self.db.close()
