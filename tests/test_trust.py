"""Spot checks, disputes and reputation against a real devnet with a lying provider."""

from __future__ import annotations

import sqlite3

import numpy as np

from devnet.launcher import open_devnet
from node.calibrate import reference_model_path
from node.buyer import Buyer, SubmitSpec
from node.client import Client
from node.reputation import ReputationBook, own_digest, provider_scores, score
from protocol.signing import SigningKey

MODEL = reference_model_path("squeezenet")


async def test_spot_checks_dispute_a_lying_provider_and_reputation_then_excludes_it(tmp_path):
    x = np.random.default_rng(3).random((1, 3, 224, 224), dtype=np.float32)
    # The liar (laptop-b: the lowest marginal power) is also declared 4x faster, so the
    # matcher prefers it however noisily a busy machine calibrates the three providers.
    liar_args = ["--fault-output-noise", "0.5", "--speed-factor", "4"]
    async with open_devnet(3, root=tmp_path / "net", extra_args={1: liar_args}) as net:
        liar = net.providers[1].ready["peer_id"]
        spec = SubmitSpec(model_path=MODEL, inputs={"data_0": x}, count=6, bootstrap=[net.bootstrap_addr],
                          home=tmp_path / "buyer", out_dir=tmp_path / "out", spot_check=1.0)
        outcomes, summary = await Buyer(spec).run()
        on_liar = [o for o in outcomes if o.provider == liar]
        assert on_liar, "the most efficient provider (the liar) should get work"
        # Every job was checked; each mismatch was settled by a third provider, and only the
        # liar was disputed, whether it ran the job or the check.
        assert summary["spot_checks"]["checked"] == 6 and summary["spot_checks"]["inconclusive"] == 0
        assert all(not o.spot_check["agree"] and o.spot_check["verdict"] == f"disputed {liar}" for o in on_liar)
        assert summary["spot_checks"]["disputes"] >= len(on_liar)
        db = sqlite3.connect(tmp_path / "buyer" / "ledger.sqlite")
        assert {r[0] for r in db.execute("SELECT provider FROM disputes")} == {liar}
        # The next batch leaves the liar out.
        again = SubmitSpec(model_path=MODEL, inputs={"data_0": x}, count=3, bootstrap=[net.bootstrap_addr],
                           home=tmp_path / "buyer", out_dir=tmp_path / "out2")
        outcomes2, summary2 = await Buyer(again).run()
        assert liar in summary2["excluded_by_reputation"]
        assert liar not in {o.provider for o in outcomes2}
        assert [o.state for o in outcomes2] == ["settled"] * 3

        # A warm client spot-checks the same way, after each answer has been returned.
        async with Client(tmp_path / "app", [net.bootstrap_addr], spot_check=1.0) as client:
            answers = [await client.infer(MODEL, {"data_0": x}) for _ in range(4)]
            await client.drain()
            tally = dict(client.spot_checks)
            # The open client itself leaves the disputed liar out from then on.
            assert client.scores()[liar] < 0.25
            after = await client.infer(MODEL, {"data_0": x})
            await client.drain()
        assert any(a.provider == liar for a in answers), "the most efficient provider (the liar) should get work"
        assert after.provider != liar
        assert tally["checked"] == 4 and tally["inconclusive"] == 0
        assert tally["disputes"] >= sum(a.provider == liar for a in answers)
        db = sqlite3.connect(tmp_path / "app" / "ledger.sqlite")
        assert {r[0] for r in db.execute("SELECT provider FROM disputes")} <= {liar}


def test_reputation_digests_count_capped_and_signed():
    me, other, provider = SigningKey(b"m" * 32), SigningKey(b"o" * 32), SigningKey(b"p" * 32)
    book = ReputationBook()
    bad_report = own_digest(other, {provider.peer_id: {"accepted": 0, "rejected": 0, "disputed": 1000}},
                            {provider.peer_id: provider.public_key}, now_ms=1_000)
    assert book.add(bad_report, now_ms=2_000)
    assert not book.add(bad_report, now_ms=2_000)          # not newer: kept once
    tampered = bytearray(bad_report)
    tampered[-3] ^= 1
    assert not book.add(bytes(tampered), now_ms=2_000) and book.rejected == 1
    own = {provider.peer_id: {"accepted": 100, "rejected": 0, "disputed": 0}}
    # A stranger's digest weighs nothing: it holds no evidence we can check.
    assert provider_scores(own, book, me.public_key) == {provider.peer_id: score(100, 0, 0)}
    # From an issuer with a long settled history with us, 1,000 disputes weigh as a
    # capped, halved 50: our own 100 good receipts still win.
    scores = provider_scores(own, book, me.public_key, {other.peer_id: 100})
    assert score(100, 0, 0) > scores[provider.peer_id] > 0.25
    assert provider_scores({}, book, me.public_key, {other.peer_id: 100})[provider.peer_id] < 0.25
    assert score(0, 0, 0) == 0.5 and score(0, 0, 1) < 0.25
