"""kill -9 against real processes: no accepted job is lost, no receipt applies twice."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import trio

from devnet.launcher import open_devnet
from node.buyer import Buyer, SubmitSpec
from node.calibrate import reference_model_path

MODEL = reference_model_path("squeezenet")
REPO = Path(__file__).resolve().parents[1]


async def _wait_for(child, event: str, count: int) -> None:
    seen = 0
    async for item in child.events:
        if item.get("event") == event:
            seen += 1
            if seen == count:
                return
    raise AssertionError(f"{child.name} exited before {count} '{event}' events")


def _ledger_ids(home: Path) -> list[str]:
    db = sqlite3.connect(home / "ledger.sqlite")
    return [r[0] for r in db.execute("SELECT receipt_id FROM receipts WHERE status = 'accepted'")]


async def test_kill_9_of_a_provider_mid_batch_loses_no_job(tmp_path):
    rows = np.random.default_rng(1).random((24, 3, 224, 224), dtype=np.float32)  # ~0.1 s a job
    async with open_devnet(2, root=tmp_path / "net") as net:
        spec = SubmitSpec(model_path=MODEL, inputs={"data_0": rows}, count=16, bootstrap=[net.bootstrap_addr],
                          home=tmp_path / "buyer", out_dir=tmp_path / "out")
        killed = []
        results = {}

        async def buyer() -> None:
            results["outcomes"], _ = await Buyer(spec).run()

        async def kill_the_first_busy_provider(nursery_scope) -> None:
            async with trio.open_nursery() as watchers:
                async def watch(child):
                    await _wait_for(child, "accepted", 2)  # it is mid-batch now
                    child.process.kill()                   # SIGKILL: no cleanup at all
                    killed.append(child)
                    watchers.cancel_scope.cancel()
                for child in net.providers:
                    watchers.start_soon(watch, child)

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(buyer)
                nursery.start_soon(kill_the_first_busy_provider, nursery.cancel_scope)
        victim_home = killed[0].home
    outcomes = results["outcomes"]
    assert [o.state for o in outcomes] == ["settled"] * 16, [o.error for o in outcomes]
    assert any(len(o.attempts) > 1 for o in outcomes)   # some were re-placed
    ids = _ledger_ids(tmp_path / "buyer")
    assert sorted(ids) == sorted(o.job_id for o in outcomes)  # each job paid exactly once
    # The killed provider's ledger survived the kill and holds no receipt twice.
    db = sqlite3.connect(victim_home / "ledger.sqlite")
    assert db.execute("SELECT COUNT(*) = COUNT(DISTINCT receipt_id) FROM receipts").fetchone()[0] == 1
    assert db.execute("SELECT COALESCE(SUM(amount_pico), 0) FROM entries").fetchone()[0] == 0


async def test_kill_9_of_the_buyer_then_resume_settles_every_job_once(tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(2).random((16, 3, 224, 224), dtype=np.float32))
    home, out = tmp_path / "buyer", tmp_path / "out"
    async with open_devnet(2, root=tmp_path / "net") as net:
        cmd = [sys.executable, "-m", "node.cli", "submit", str(MODEL), "--input", str(x), "--count", "20",
               "--bootstrap", net.bootstrap_addr, "--home", str(home), "--out", str(out), "--events"]
        process = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
        settled, buffer = 0, b""
        with trio.fail_after(120):
            while settled < 3:
                chunk = await process.stdout.receive_some()
                assert chunk, "the buyer exited before settling 3 jobs"
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                settled += sum(1 for line in lines if b'"state": "settled"' in line)
        process.kill()  # SIGKILL, mid-batch
        await process.wait()
        before = _ledger_ids(home)
        assert 3 <= len(before) < 20
        done = await trio.run_process(
            [sys.executable, "-m", "node.cli", "submit", "--resume", "--bootstrap", net.bootstrap_addr,
             "--home", str(home), "--json"], capture_stdout=True, stderr=subprocess.DEVNULL, cwd=REPO, check=False)
    summary = json.loads(done.stdout)
    assert done.returncode == 0, summary
    assert summary["resumed"] and summary["already_settled"] >= len(before)
    assert [j["state"] for j in summary["jobs"]] == ["settled"] * 20
    # Jobs paid before the crash show their receipt's figures, not empty rows.
    assert all(j["energy_source"] == "declared" and j["energy_j"] > 0 and j["provider"] for j in summary["jobs"])
    ids = _ledger_ids(home)
    assert len(ids) == len(set(ids)) == 20 and set(before) <= set(ids)
    assert len(list(out.glob("*.npy"))) == 20
    journal = sqlite3.connect(home / "jobs.sqlite")
    assert journal.execute("SELECT COUNT(*) FROM jobs WHERE state = 'settled'").fetchone()[0] == 20


async def test_ctrl_c_during_submit_exits_130_with_the_resume_command(tmp_path):
    import signal

    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(3).random((8, 3, 224, 224), dtype=np.float32))
    home = tmp_path / "buyer"
    async with open_devnet(1, root=tmp_path / "net") as net:
        cmd = [sys.executable, "-m", "node.cli", "submit", str(MODEL), "--input", str(x), "--count", "20",
               "--bootstrap", net.bootstrap_addr, "--home", str(home), "--out", str(tmp_path / "out"), "--events"]
        # SIGINT at its default, as in a terminal (a background shell would ignore it).
        process = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        buffer = b""
        with trio.fail_after(120):
            while b'"state": "settled"' not in buffer:
                chunk = await process.stdout.receive_some()
                assert chunk, "the buyer exited before settling a job"
                buffer += chunk
            process.send_signal(signal.SIGINT)
            status = await process.wait()
            err = b""
            while chunk := await process.stderr.receive_some():
                err += chunk
    assert status == 130
    (line,) = [ln for ln in err.decode().splitlines() if ln.startswith("interrupted")]
    batch = line.split("--resume ", 1)[1].split()[0]
    assert line == ("interrupted; jobs already paid stay paid. Finish the batch with: idlemesh submit --resume "
                    f"{batch} --home {home} --bootstrap {net.bootstrap_addr}")


def test_a_version_1_journal_is_migrated_to_the_lifecycle_vocabulary(tmp_path):
    """Journals written before the one vocabulary said 'sent'; opening one renames it
    'requested' and keeps every row."""
    import sqlite3

    from node.journal import JOURNAL_VERSION, Journal

    db = sqlite3.connect(tmp_path / "jobs.sqlite")
    db.executescript("""
        CREATE TABLE batches (batch_id TEXT PRIMARY KEY, created_at_ms INTEGER NOT NULL, model_path TEXT NOT NULL,
            model_sha256 TEXT NOT NULL, inputs_path TEXT NOT NULL, count INTEGER NOT NULL, max_price REAL NOT NULL,
            solver TEXT NOT NULL, out_dir TEXT NOT NULL);
        CREATE TABLE jobs (job_id TEXT PRIMARY KEY, batch_id TEXT NOT NULL REFERENCES batches(batch_id),
            idx INTEGER NOT NULL, state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'settled', 'failed')),
            provider TEXT NOT NULL DEFAULT '', attempts INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '',
            output_path TEXT NOT NULL DEFAULT '', updated_at_ms INTEGER NOT NULL);
        INSERT INTO batches VALUES ('b1', 1, 'm.onnx', 'aa', 'in.npz', 3, 1.0, 'optimal', 'out');
        INSERT INTO jobs (job_id, batch_id, idx, state, provider, attempts, updated_at_ms) VALUES
            ('j0', 'b1', 0, 'settled', 'p', 1, 1), ('j1', 'b1', 1, 'sent', 'p', 2, 1), ('j2', 'b1', 2, 'pending', '', 0, 1);
    """)
    db.close()
    journal = Journal(tmp_path)
    assert [(j.job_id, j.state, j.attempts) for j in journal.jobs("b1")] == [
        ("j0", "settled", 1), ("j1", "requested", 2), ("j2", "pending", 0)]
    assert journal.db.execute("PRAGMA user_version").fetchone()[0] == JOURNAL_VERSION
    journal.failed("j2", "no provider", 2)  # the new table takes the lifecycle's states
    assert journal.jobs("b1")[2].state == "failed"
    journal.close()
    assert [j.state for j in Journal(tmp_path).jobs("b1")] == ["settled", "requested", "failed"]
