"""Integration: a real devnet of processes on 127.0.0.1, real libp2p, real onnxruntime."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest
import trio

from devnet.launcher import open_devnet
from node.buyer import Buyer, SubmitSpec
from node.calibrate import reference_model_path
from node.gossip import OfferGossip, bootstrap_peer_id
from node.offers import OfferBook
from node.p2p import StreamClosed, open_p2p_node
from protocol import codec
from protocol.messages import open_receipt
from protocol.stream import JobError, SubmitJob, decode_message, encode_message
from protocol.tensors import Tensor, tensors_sha256
from protocol.topics import JOB_PROTOCOL

MODEL = reference_model_path("squeezenet")  # seeded weights: outputs depend on the input


@pytest.fixture
def input_array():
    return np.random.default_rng(7).random((1, 3, 224, 224), dtype=np.float32)


async def test_devnet_jobs_match_local_onnxruntime_and_receipts_verify(tmp_path, input_array):
    expected = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"]).run(None, {"data_0": input_array})[0]
    async with open_devnet(3, root=tmp_path / "net") as net:
        spec = SubmitSpec(model_path=MODEL, inputs={"data_0": input_array}, count=8,
                          bootstrap=[net.bootstrap_addr], home=tmp_path / "buyer", out_dir=tmp_path / "out")
        outcomes, summary = await Buyer(spec).run()
        provider_homes = {c.ready["peer_id"]: c.home for c in net.providers}
        # `idlemesh inspect` names the model's ports and the three providers offering it,
        # best energy per item first.
        done = await trio.run_process([sys.executable, "-m", "node.cli", "inspect", str(MODEL), "--bootstrap",
                                       net.bootstrap_addr, "--json"], capture_stdout=True, capture_stderr=True)
        report = json.loads(done.stdout)
    assert report["inputs"] == [{"name": "data_0", "dtype": "float32", "shape": [1, 3, 224, 224]}]
    assert {o["peer_id"] for o in report["offers"]} == set(provider_homes)
    per_item = [o["energy_j_per_item"] for o in report["offers"]]
    assert per_item == sorted(per_item) and {o["power_source"] for o in report["offers"]} == {"declared"}
    assert [o.state for o in outcomes] == ["settled"] * 8, [o.error for o in outcomes]
    assert len({o.provider for o in outcomes}) >= 2
    for o in outcomes:
        np.testing.assert_allclose(np.load(o.output_path), expected, rtol=1e-5, atol=1e-6)
        assert o.energy_source == "declared"
    # The buyer's ledger holds each receipt once, and every stored receipt verifies.
    db = sqlite3.connect(tmp_path / "buyer" / "ledger.sqlite")
    rows = db.execute("SELECT receipt_id, receipt FROM receipts WHERE status = 'accepted'").fetchall()
    assert sorted(r[0] for r in rows) == sorted(o.job_id for o in outcomes)
    model_sha = hashlib.sha256(MODEL.read_bytes()).hexdigest()
    for job_id, blob in rows:
        env, receipt = open_receipt(blob)
        assert receipt.job_id == job_id and receipt.model_sha256 == model_sha
        assert receipt.input_sha256 == tensors_sha256([Tensor.from_array("data_0", input_array)])
    # Providers recorded the buyer's countersignature for the jobs they ran.
    provider_rows = 0
    for pid, home in provider_homes.items():
        pdb = sqlite3.connect(home / "ledger.sqlite")
        provider_rows += pdb.execute("SELECT COUNT(*) FROM receipts WHERE status = 'accepted'").fetchone()[0]
        # Money is conserved: each accepted receipt posted a debit and an equal credit.
        assert pdb.execute("SELECT COALESCE(SUM(amount_pico), 0) FROM entries").fetchone()[0] == 0
    assert provider_rows == 8


async def _collect(child, event: str, count: int, timeout_s: float = 30.0) -> list[dict]:
    got = []
    with trio.fail_after(timeout_s):
        async for item in child.events:
            if item.get("event") == event:
                got.append(item)
                if len(got) == count:
                    return got
    raise AssertionError(f"{child.name} exited after {len(got)} of {count} '{event}' events")


async def test_flood_of_bad_input_is_counted_and_honest_jobs_still_settle(tmp_path, input_array):
    from contextlib import AsyncExitStack

    from protocol.messages import JobRequest, sign_job_request
    from protocol.signing import SigningKey
    from protocol.stream import Ack, OfferSync

    async with open_devnet(1, root=tmp_path / "net") as net:
        child = net.providers[0]
        provider = child.ready
        target = (provider["peer_id"], provider["addrs"])
        attacker_key = SigningKey(bytes(32))
        async with open_p2p_node(bytes(32), ["/ip4/127.0.0.1/tcp/0"]) as p2p, AsyncExitStack() as held:
            # Half-open streams: a frame header promising 1 MB, then silence, held open
            # while everything else happens.
            for _ in range(5):
                stream = await held.enter_async_context(p2p.open_stream(*target, JOB_PROTOCOL))
                await stream.send_raw(b"\x00\x10\x00\x00")
            sent = {}

            async def one_frame(raw: bytes) -> None:
                async with p2p.open_stream(*target, JOB_PROTOCOL) as stream:
                    await stream.send_raw(raw)
                    try:
                        reply = decode_message(await stream.receive(max_bytes=1 << 16, timeout_s=10),
                                               max_bytes=1 << 16, expect=("error",))
                        assert isinstance(reply, JobError)
                    except StreamClosed:
                        pass

            frames = [b"\x00\x00\x00\x05hello"] * 20 + [b"\xff\xff\xff\xff"] * 5
            frames += [encode_message(SubmitJob(b"not an envelope"))] * 5
            for raw in frames:
                await one_frame(raw if raw.startswith((b"\x00\x00", b"\xff")) else len(raw).to_bytes(4, "big") + raw)
            sent["frames"] = len(frames)
            # Forged offers through offer sync, one stream each.
            forged = codec.encode({"v": 1, "type": "offer", "signer": b"\x01" * 32, "body": b"x", "sig": b"\x00" * 64})
            from protocol.topics import OFFER_SYNC_PROTOCOL
            for _ in range(3):
                async with p2p.open_stream(*target, OFFER_SYNC_PROTOCOL) as stream:
                    await stream.send(encode_message(OfferSync((forged,))))
                    await stream.receive(max_bytes=1 << 20, timeout_s=10)
            # A signed job request for a model the provider does not hold (it holds the
            # ones it offers), so it asks for the model ...
            book = OfferBook()
            await OfferGossip(p2p, book).sync_with(bootstrap_peer_id(net.bootstrap_addr), [net.bootstrap_addr])
            (entry,) = book.current(now_ms=int(time.time() * 1000))
            issued = int(time.time() * 1000)
            request = sign_job_request(attacker_key, JobRequest(
                job_id="ab" * 16, buyer=attacker_key.public_key, provider=entry.offer.provider,
                model_sha256=hashlib.sha256(b"a model nobody holds").hexdigest(), model_name="other",
                inputs=(Tensor.from_array("data_0", input_array),), items=1, max_price=1.0,
                issued_at_ms=issued, expires_at_ms=issued + 60_000))
            async with p2p.open_stream(*target, JOB_PROTOCOL) as stream:
                await stream.send(encode_message(SubmitJob(request)))
                reply = decode_message(await stream.receive(max_bytes=1 << 16, timeout_s=10),
                                       max_bytes=1 << 16, expect=("need-model",))
            # ... we hung up instead of sending the model (counted as stream-closed). The
            # same job may come again at once (a buyer that crashed mid-upload): the
            # provider asks for the model again, it does not call it a replay.
            async with p2p.open_stream(*target, JOB_PROTOCOL) as stream:
                await stream.send(encode_message(SubmitJob(request)))
                reply = decode_message(await stream.receive(max_bytes=1 << 16, timeout_s=10),
                                       max_bytes=1 << 16, expect=("need-model",))
            refused = await _collect(child, "refused", sent["frames"] + 3 + 2)
            codes = [e["code"] for e in refused]
            assert set(codes) <= {"bad-request", "rate-limited", "bad-offer", "stream-closed"}, codes
            assert codes.count("bad-offer") == 3 and codes.count("stream-closed") >= 2
            # Honest work still goes through while the half-open streams hang on.
            spec = SubmitSpec(model_path=MODEL, inputs={"data_0": input_array}, count=2,
                              bootstrap=[net.bootstrap_addr], home=tmp_path / "buyer", out_dir=tmp_path / "out")
            outcomes, summary = await Buyer(spec).run()
            assert [o.state for o in outcomes] == ["settled", "settled"], [o.error for o in outcomes]
            assert summary["offers"] == 1  # nothing forged entered any book
            await _collect(child, "settled", 2)
            # Replaying the buyer's settled receipt and ack at the provider changes nothing.
            db = sqlite3.connect(tmp_path / "buyer" / "ledger.sqlite")
            receipt, ack = db.execute("SELECT receipt, ack FROM receipts LIMIT 1").fetchone()
            for frame in (encode_message(Ack(ack)), encode_message(SubmitJob(receipt))):
                await one_frame(len(frame).to_bytes(4, "big") + frame)
            replays = await _collect(child, "refused", 2)
            assert {e["code"] for e in replays} == {"bad-request"}
        home = child.home
    pdb = sqlite3.connect(home / "ledger.sqlite")
    assert pdb.execute("SELECT COUNT(*) FROM receipts").fetchone()[0] == 2
    assert pdb.execute("SELECT COALESCE(SUM(amount_pico), 0) FROM entries").fetchone()[0] == 0


async def test_hostile_models_fail_their_jobs_and_the_provider_keeps_serving(tmp_path, input_array):
    from .hostile_models import write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    async with open_devnet(1, root=tmp_path / "net") as net:
        for name, (path, codes) in corpus.items():
            # A fresh buyer identity per run (see README: same-home reconnects can be refused).
            # The buyer's own input check is off: this buyer is the hostile one.
            spec = SubmitSpec(model_path=path, inputs={"X": np.zeros((1, 4), np.float32)}, count=1,
                              bootstrap=[net.bootstrap_addr], home=tmp_path / f"buyer-{name}",
                              out_dir=tmp_path / "out", check_inputs=False)
            outcomes, _ = await Buyer(spec).run()
            assert outcomes[0].state == "failed", name
            assert any(f": {code}: " in outcomes[0].error for code in codes), (name, outcomes[0].error)
        spec = SubmitSpec(model_path=MODEL, inputs={"data_0": input_array}, count=2,
                          bootstrap=[net.bootstrap_addr], home=tmp_path / "buyer-honest", out_dir=tmp_path / "out")
        outcomes, _ = await Buyer(spec).run()
        assert [o.state for o in outcomes] == ["settled", "settled"], [o.error for o in outcomes]
        assert {o.energy_source for o in outcomes} == {"declared"}
        home = net.providers[0].home
    # Only the honest jobs reached the provider's ledger.
    db = sqlite3.connect(home / "ledger.sqlite")
    assert db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0] == 2


async def test_a_provider_that_breaks_the_protocol_fails_its_attempts_not_the_batch(tmp_path, input_array):
    """A provider with an irresistible offer answers every job with 'accepted' twice: each
    attempt there fails as the peer's error, and the batch settles on the honest one."""
    import secrets

    from protocol.messages import Device, ModelCapability, Offer, PowerProfile, open_job_request, sign_offer
    from protocol.signing import SigningKey
    from protocol.stream import Accepted

    model_sha = hashlib.sha256(MODEL.read_bytes()).hexdigest()
    async with open_devnet(1, root=tmp_path / "net") as net:
        honest = net.providers[0].ready["peer_id"]
        boot_id = bootstrap_peer_id(net.bootstrap_addr)
        seed = secrets.token_bytes(32)
        key = SigningKey(seed)
        async with open_p2p_node(seed, ["/ip4/127.0.0.1/tcp/0"]) as liar:
            now = int(time.time() * 1000)
            signed = sign_offer(key, Offer(
                provider=key.public_key, peer_id=key.peer_id, addrs=tuple(liar.listen_addrs),
                device=Device("x86_64", "liar", 1 << 20), slots=8,
                models=(ModelCapability("squeezenet", model_sha, 1e6, "measured"),),
                power=PowerProfile(1.0, 1.5, 0.001, "declared", "declared", "declared"),
                carbon_g_per_kwh=0.0, carbon_source="declared", price_per_s=0.0, backlog_ms=0.0,
                issued_at_ms=now, expires_at_ms=now + 60_000))
            tried = []

            async def accept_twice(stream) -> None:
                payload = await stream.receive(max_bytes=1 << 24, timeout_s=10)
                _, request = open_job_request(decode_message(payload, max_bytes=1 << 24, expect=("submit",)).request)
                tried.append(request.job_id)
                for _ in range(2):
                    await stream.send(encode_message(Accepted(request.job_id, 0)))
                with trio.move_on_after(10):
                    await stream.receive(max_bytes=1 << 16, timeout_s=10)  # until the buyer hangs up

            liar.set_stream_handler(JOB_PROTOCOL, accept_twice)
            await liar.connect(boot_id, [net.bootstrap_addr])
            await OfferGossip(liar, OfferBook(), own_offer=lambda: signed).sync_with(boot_id)
            spec = SubmitSpec(model_path=MODEL, inputs={"data_0": input_array}, count=4,
                              bootstrap=[net.bootstrap_addr], home=tmp_path / "buyer", out_dir=tmp_path / "out")
            outcomes, summary = await Buyer(spec).run()
    assert summary["offers"] == 2 and tried  # the liar was placed and tried ...
    assert [o.state for o in outcomes] == ["settled"] * 4, [o.error for o in outcomes]
    assert {o.provider for o in outcomes} == {honest}  # ... and every job settled on the honest provider
    assert all(o.attempts[0] == key.peer_id for o in outcomes if o.job_id in tried)


async def test_metrics_endpoint_counts_jobs_energy_and_earnings(tmp_path, input_array):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with open_devnet(1, root=tmp_path / "net", extra_args={0: ["--metrics", f"127.0.0.1:{port}"]}) as net:
        spec = SubmitSpec(model_path=MODEL, inputs={"data_0": input_array}, count=3,
                          bootstrap=[net.bootstrap_addr], home=tmp_path / "buyer", out_dir=tmp_path / "out")
        outcomes, _ = await Buyer(spec).run()
        assert [o.state for o in outcomes] == ["settled"] * 3
        await _collect(net.providers[0], "settled", 3)  # the provider applied every ack
        text = await trio.to_thread.run_sync(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())
    series = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            series[name] = float(value)
    assert series['idlemesh_jobs_total{outcome="completed"}'] == 3
    assert series['idlemesh_jobs_total{outcome="settled"}'] == 3
    assert series["idlemesh_compute_seconds_total"] > 0
    assert series['idlemesh_energy_joules_total{source="declared"}'] == pytest.approx(sum(o.energy_j for o in outcomes))
    assert series["idlemesh_earnings_total"] == pytest.approx(sum(o.price for o in outcomes))
    assert series["idlemesh_slots"] == 2 and series["idlemesh_slots_busy"] == 0
    assert series["idlemesh_connected_peers"] >= 1 and 0 <= series["idlemesh_offer_age_seconds"] < 60
