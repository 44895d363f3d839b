"""Integration: a real devnet of processes on 127.0.0.1, real libp2p, real onnxruntime."""

from __future__ import annotations

import hashlib
import sqlite3

import numpy as np
import onnxruntime as ort
import pytest
import trio

from devnet.launcher import LIGHT_MODELS, open_devnet
from node.buyer import Buyer, SubmitSpec
from node.gossip import OfferGossip, bootstrap_peer_id
from node.offers import OfferBook
from node.p2p import StreamClosed, open_p2p_node
from protocol import codec
from protocol.messages import open_receipt
from protocol.stream import JobError, SubmitJob, decode_message, encode_message
from protocol.tensors import Tensor, tensors_sha256
from protocol.topics import JOB_PROTOCOL

MODEL = LIGHT_MODELS / "light_squeezenet.onnx"


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


async def test_provider_survives_garbage_then_serves(tmp_path, input_array):
    async with open_devnet(1, root=tmp_path / "net") as net:
        provider = net.providers[0].ready
        async with open_p2p_node(bytes(32), ["/ip4/127.0.0.1/tcp/0"]) as p2p:
            # Garbage frame, oversized frame header, and a well-formed but unsigned request.
            for payload in (b"\x00\x00\x00\x05hello", b"\xff\xff\xff\xff", encode_message(SubmitJob(b"not an envelope"))):
                async with p2p.open_stream(provider["peer_id"], provider["addrs"], JOB_PROTOCOL) as stream:
                    if payload.startswith(b"\x00\x00") or payload.startswith(b"\xff"):
                        await stream.send_raw(payload)
                    else:
                        await stream.send(payload)
                    try:
                        reply = decode_message(await stream.receive(max_bytes=1 << 16, timeout_s=10),
                                               max_bytes=1 << 16, expect=("error",))
                        assert isinstance(reply, JobError) and reply.code == "bad-request"
                    except StreamClosed:
                        pass
            # A forged offer pushed through offer sync is dropped, not stored.
            gossip = OfferGossip(p2p, OfferBook())
            forged = codec.encode({"v": 1, "type": "offer", "signer": b"\x01" * 32, "body": b"x", "sig": b"\x00" * 64})
            gossip.own_offer = lambda: forged
            await gossip.sync_with(bootstrap_peer_id(net.bootstrap_addr), [net.bootstrap_addr])
        spec = SubmitSpec(model_path=MODEL, inputs={"data_0": input_array}, count=2,
                          bootstrap=[net.bootstrap_addr], home=tmp_path / "buyer", out_dir=tmp_path / "out")
        outcomes, summary = await Buyer(spec).run()
        assert summary["offers"] == 1  # the forged one never entered the bootstrap's book
    assert [o.state for o in outcomes] == ["settled", "settled"]
    log = (net.providers[0].home / "node.log").read_text()
    assert log.count("bad-request from") == 3


async def test_hostile_models_fail_their_jobs_and_the_provider_keeps_serving(tmp_path, input_array):
    from .hostile_models import write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    async with open_devnet(1, root=tmp_path / "net") as net:
        for name, (path, codes) in corpus.items():
            # A fresh buyer identity per run (see README: same-home reconnects can be refused).
            spec = SubmitSpec(model_path=path, inputs={"X": np.zeros((1, 4), np.float32)}, count=1,
                              bootstrap=[net.bootstrap_addr], home=tmp_path / f"buyer-{name}",
                              out_dir=tmp_path / "out")
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
