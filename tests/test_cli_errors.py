"""Mistakes an operator makes at start get one line that says what to do, before `ready`,
and Ctrl-C ends a daemon with status 130. Real processes, asserted on the exit status and
the first line printed."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio

from node.calibrate import reference_model_path
from tests.processes import start_node

REPO = Path(__file__).resolve().parents[1]
PEER = "12D3KooWSBKwL4Njx1h8drSoK58Wz5QkEQsKmMRvrwRoHtKYuoAL"  # a valid peer id nobody runs


def idlemesh(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout_s)


def first_error_line(done: subprocess.CompletedProcess) -> str:
    # Our own log lines carry a timestamp; the error is the line that does not.
    return next(line for line in done.stderr.splitlines() if line.startswith(("idlemesh:", "error:")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _start_bootstrap(home: Path, port: int):
    return await start_node("bootstrap", "run", "--home", str(home), "--listen", f"/ip4/127.0.0.1/tcp/{port}")


async def test_a_taken_port_an_address_without_peer_id_and_an_unwritable_home_are_one_line_errors(tmp_path):
    port = free_port()
    process, ready = await _start_bootstrap(tmp_path / "boot", port)
    try:
        assert ready["event"] == "ready"
        # A second node on the same port (the library would share it with SO_REUSEPORT).
        done = idlemesh("bootstrap", "run", "--home", str(tmp_path / "boot2"), "--listen", f"/ip4/127.0.0.1/tcp/{port}")
        assert done.returncode == 1 and done.stdout == ""
        assert first_error_line(done) == (f"idlemesh: cannot listen on /ip4/127.0.0.1/tcp/{port}: port {port} "
                                          "already in use (is another node running there?)")
        # Ctrl-C: the daemon stops cleanly with 130.
        process.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            assert await process.wait() == 130
    finally:
        if process.returncode is None:
            process.kill()

    done = idlemesh("provider", "run", "--home", str(tmp_path / "p"), "--bootstrap", "/ip4/127.0.0.1/tcp/4000")
    assert done.returncode == 1
    assert first_error_line(done) == ("idlemesh: bad provider config: bootstrap: address '/ip4/127.0.0.1/tcp/4000' "
                                      "has no /p2p/<peer id>: copy the whole address the node printed at start")

    done = idlemesh("provider", "run", "--home", "/dev/null/home", "--listen", "/ip4/127.0.0.1/tcp/0")
    assert done.returncode == 1
    assert first_error_line(done) == ("idlemesh: home /dev/null/home is not writable: Not a directory; "
                                      "choose another with --home")


def test_submit_says_cannot_reach_for_a_bootstrap_that_does_not_answer(tmp_path):
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((1, 3, 224, 224), np.float32))
    addr = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{PEER}"
    done = idlemesh("submit", str(reference_model_path("squeezenet")), "--input", str(tmp_path / "x.npy"),
                    "--bootstrap", addr, "--home", str(tmp_path / "buyer"), "--out", str(tmp_path / "out"))
    assert done.returncode == 1
    assert first_error_line(done) == f"error: cannot reach bootstrap {addr} (connection refused)"


def test_a_wrong_input_is_a_local_error_before_anything_is_sent(tmp_path):
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((1, 3, 100, 100), np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((1, 3, 224, 224), np.int64))
    # No bootstrap answers at this address: the input check comes first, so the error
    # is about the input, not the network.
    addr = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{PEER}"
    for array, error in (("x.npy", "input data_0: axis 2 must be 224, got 100"),
                         ("ints.npy", "input data_0: model wants float32, got int64")):
        done = idlemesh("submit", str(reference_model_path("squeezenet")), "--input", str(tmp_path / array),
                        "--bootstrap", addr, "--home", str(tmp_path / "buyer"), "--out", str(tmp_path / "out"))
        assert done.returncode == 1
        assert first_error_line(done) == f"error: squeezenet.onnx: {error}"
    done = idlemesh("inspect", str(reference_model_path("squeezenet")), "--json")
    assert json.loads(done.stdout)["outputs"] == [{"name": "softmaxout_1", "dtype": "float32",
                                                  "shape": [1, 1000, 1, 1]}]


def test_version_bare_command_and_an_empty_ledger(tmp_path):
    done = idlemesh("--version")
    assert done.returncode == 0 and done.stdout.startswith("idlemesh ")
    done = idlemesh()
    assert done.returncode == 0 and done.stdout.startswith("usage: idlemesh")
    done = idlemesh("ledger", "--home", str(tmp_path / "new"), "--json")
    assert done.returncode == 0
    assert json.loads(done.stdout) == {"me": None, "balances": [], "entries_sum_pico": 0, "conserved": True}


def test_install_service_writes_a_unit_that_systemd_accepts(tmp_path):
    import shutil

    import pytest

    for system in (False, True):
        unit = tmp_path / f"idlemesh-provider-{system}.service"
        flags = ["--system"] if system else []
        done = idlemesh("provider", "install-service", "--home", str(tmp_path / "home"), "--out", str(unit),
                        "--json", *flags)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["unit"] == str(unit)
        text = unit.read_text()
        assert f"provider run --home {tmp_path / 'home'}" in text and "Restart=on-failure" in text
        assert ("ProtectSystem=strict" in text) == system
        if shutil.which("systemd-analyze") is None:
            pytest.skip("systemd-analyze is not installed here")
        verified = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert verified.returncode == 0, verified.stderr


def test_json_errors_are_json_on_stdout_and_peer_prefixes_are_typed_back(tmp_path):
    done = idlemesh("submit", str(tmp_path / "missing.onnx"), "--input", "x.npy", "--bootstrap",
                    f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}", "--json")
    assert done.returncode == 2
    assert json.loads(done.stdout) == {"error": f"model file {tmp_path / 'missing.onnx'} not found"}
    done = idlemesh("ledger", "--home", "/dev/null/x")
    assert done.returncode == 1 and first_error_line(done).startswith("idlemesh: no ledger in /dev/null/x")


def test_a_ledger_peer_is_found_by_the_prefix_tables_print(tmp_path):
    from node.ledger import Ledger, LedgerError
    from protocol.messages import Receipt, ReceiptAck, SignedReceipt, sign_receipt, sign_receipt_ack
    from protocol.signing import SigningKey

    import pytest

    buyer, providers = SigningKey(bytes([1]) * 32), [SigningKey(bytes([i]) * 32) for i in (2, 3)]
    ledger = Ledger(tmp_path / "ledger.sqlite", buyer.public_key)
    for i, provider in enumerate(providers):
        receipt = sign_receipt(provider, Receipt(
            job_id=f"{i:032x}", buyer=buyer.public_key, provider=provider.public_key, model_sha256="aa" * 32,
            input_sha256="bb" * 32, output_sha256="cc" * 32, queue_ms=0.0, compute_ms=1.0, energy_j=0.1,
            energy_source="declared", price=1e-6, issued_at_ms=1, execution_provider="CPUExecutionProvider"))
        ack = sign_receipt_ack(buyer, ReceiptAck(f"{i:032x}", SignedReceipt.parse(receipt).body_sha256, True, "", 2))
        ledger.apply(receipt, ack, now_ms=3)
    full = providers[0].peer_id
    assert ledger.resolve_peer(full[:16]) == full and ledger.resolve_peer(full) == full
    with pytest.raises(LedgerError, match="matches several peers"):
        ledger.resolve_peer("12D3KooW")
    with pytest.raises(LedgerError, match="no receipt with a peer"):
        ledger.resolve_peer("12D3KooWzzzz")


def test_batches_are_listed_shown_discarded_and_pruned(tmp_path):
    import numpy as np

    from node.journal import Journal

    home = tmp_path / "buyer"
    journal = Journal(home)
    inputs = {"data_0": np.zeros((1, 3, 8, 8), np.float32)}
    done_batch, done_jobs = journal.new_batch(model_path=reference_model_path("squeezenet"), model_sha256="aa" * 32,
                                              inputs=inputs, count=2, max_price=1.0, solver="optimal",
                                              out_dir=tmp_path / "out", now_ms=1)
    for job_id in done_jobs:
        journal.settled(job_id, "x.npy", 2)
    stuck, stuck_jobs = journal.new_batch(model_path=reference_model_path("squeezenet"), model_sha256="aa" * 32,
                                          inputs=inputs, count=3, max_price=1.0, solver="optimal",
                                          out_dir=tmp_path / "out", now_ms=3)
    journal.failed(stuck_jobs[0], "bad-request: wrong input shape", 4)
    journal.close()

    listed = json.loads(idlemesh("batches", "--home", str(home), "--json").stdout)
    assert [(b["batch"], b["settled"], b["failed"], b["unfinished"]) for b in listed] == [
        (stuck.batch_id, 0, 1, 2), (done_batch.batch_id, 2, 0, 0)]
    shown = json.loads(idlemesh("batches", "show", stuck.batch_id, "--home", str(home), "--json").stdout)
    assert [j["state"] for j in shown["job_list"]] == ["failed", "pending", "pending"]
    # A finished batch's inputs can go; a batch that can never succeed can be discarded,
    # and --resume then neither picks it nor accepts it by name.
    assert json.loads(idlemesh("batches", "prune", "--home", str(home), "--json").stdout) == {
        "pruned": [done_batch.batch_id]}
    done = idlemesh("batches", "discard", stuck.batch_id, "--home", str(home))
    assert done.returncode == 0 and not stuck.inputs_path.exists()
    addr = f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}"
    done = idlemesh("submit", "--resume", "--bootstrap", addr, "--home", str(home))
    assert done.returncode == 1 and first_error_line(done) == f"error: nothing to resume in {home}"
    done = idlemesh("submit", "--resume", stuck.batch_id, "--bootstrap", addr, "--home", str(home))
    assert first_error_line(done) == (f"error: batch {stuck.batch_id} was discarded (idlemesh batches discard); "
                                      "submit it anew")
    done = idlemesh("batches", "discard", "nope", "--home", str(home))
    assert done.returncode == 1 and first_error_line(done) == f"idlemesh: no batch nope in {home}"


def test_calibrate_checks_its_home_before_measuring():
    done = idlemesh("provider", "calibrate", "--home", "/dev/null/home")
    assert done.returncode == 1
    assert first_error_line(done) == ("idlemesh: home /dev/null/home is not writable: Not a directory; "
                                      "choose another with --home")
    assert "calibrating" not in done.stderr  # nothing was measured first


def test_the_gateway_says_in_one_line_what_keeps_it_from_starting(tmp_path):
    model = str(reference_model_path("squeezenet"))
    boot = f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}"
    home = ["--home", str(tmp_path / "gw")]
    cases = [
        (["--listen", "nowhere", "--model", model], "error: --listen nowhere: give HOST:PORT, e.g. 127.0.0.1:8000"),
        (["--model", str(tmp_path / "missing.onnx")], f"error: model {tmp_path / 'missing.onnx'}: No such file or directory"),
        (["--model", f"a={model}", "--model", f"a={model}"], "error: model a: given twice"),
    ]
    for args, line in cases:
        done = idlemesh("gateway", *args, "--bootstrap", boot, *home)
        assert done.returncode == 2 and first_error_line(done) == line, done.stderr
