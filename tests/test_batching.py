"""Energy-aware micro-batching: the pure decisions (node.batching, the batch time model,
the wire's parts), and a warm client's concurrent requests on the in-memory network
under MockClock going as one job, each with a share of the receipt it verifies alone."""

from __future__ import annotations

from contextlib import asynccontextmanager

import numpy as np
import pytest
import trio

from node.batching import batch_saving, combine, group_deadline_ms, split, stack, stack_key, wait_allowed_ms
from node.client import Client
from protocol import codec
from protocol.errors import DecodeError
from protocol.job import share_problems
from protocol.messages import JobRequest, ModelCapability
from protocol.pricing import batch_job_s
from protocol.signing import SigningKey
from protocol.tensors import Tensor
from tests.test_conversation import MODEL_BYTES, MODEL_SHA, WEIGHTS, Market, _inline
from tests.test_protocol import make_offer


def test_a_job_of_n_rows_costs_a_fixed_part_plus_n_items_at_the_peak_rate():
    assert batch_job_s(1, 100.0, 1000.0) == pytest.approx(0.01)  # one item: the one-at-a-time rate
    assert batch_job_s(8, 100.0, 1000.0) == pytest.approx(0.009 + 0.008)
    assert batch_job_s(8, 100.0) == pytest.approx(0.08)  # no peak: linear
    assert batch_job_s(8, 100.0, 50.0) == pytest.approx(0.08)  # a "peak" below the rate is ignored
    cap = ModelCapability("m", MODEL_SHA, 100.0, "simulated", 1000.0)
    assert cap.rate(1) == pytest.approx(100.0) and cap.rate(1000) == pytest.approx(1000 / 1.009)


def test_capabilities_and_requests_without_batching_keep_their_bytes_and_bad_parts_are_refused():
    plain = ModelCapability("m", MODEL_SHA, 100.0, "measured")
    assert "peak_items_per_s" not in plain.to_wire()
    peaked = ModelCapability("m", MODEL_SHA, 100.0, "measured", 800.0)
    assert ModelCapability.from_wire(codec.decode(codec.encode(peaked.to_wire()), max_bytes=1 << 16), "m") == peaked
    with pytest.raises(DecodeError, match="peak_items_per_s"):
        ModelCapability.from_wire({**plain.to_wire(), "peak_items_per_s": 50.0}, "m")  # under the rate
    key = SigningKey(bytes(range(32)))
    x = Tensor.from_array("x", np.zeros((3, 3), np.float32))
    request = JobRequest("ab" * 16, key.public_key, key.public_key, MODEL_SHA, "m", (x,), 3, 1.0, 1, 2)
    assert "parts" not in request.to_wire()
    for parts in ([1, 2], [3]):
        wire = {**request.to_wire(), "parts": parts}
        if sum(parts) == 3 and len(parts) >= 2:
            assert JobRequest.from_wire(wire).parts == (1, 2)
        else:
            with pytest.raises(DecodeError, match="parts"):
                JobRequest.from_wire(wire)
    for bad in ([1, 1], [0, 3], [True, 2], "12", [1] * 40):
        with pytest.raises(DecodeError, match="parts"):
            JobRequest.from_wire({**request.to_wire(), "parts": bad})


def test_batching_is_chosen_only_where_it_lowers_energy_per_item_and_deadlines_leave_room():
    gpu = make_offer(models=(ModelCapability("m", MODEL_SHA, 100.0, "simulated", 1000.0),))
    cpu = make_offer(models=(ModelCapability("m", MODEL_SHA, 100.0, "measured"),))
    assert batch_saving([cpu], MODEL_SHA, [1] * 8) == pytest.approx(0.0)
    assert not combine([1] * 8, [cpu], MODEL_SHA)
    assert batch_saving([gpu], MODEL_SHA, [1] * 8) == pytest.approx(1 - (0.017 / 8) / 0.01)
    assert combine([1] * 8, [gpu], MODEL_SHA) and not combine([1], [gpu], MODEL_SHA)
    assert wait_allowed_ms(20.0, None, [gpu], MODEL_SHA, 1) == 20.0
    # 10 ms of compute alone plus the offer's backlog: a 30 ms deadline leaves half the rest.
    slack = (30.0 - gpu.backlog_ms - (gpu.link_rtt_ms or 0.0) - 10.0) / 2
    assert wait_allowed_ms(20.0, 30.0, [gpu], MODEL_SHA, 1) == pytest.approx(max(0.0, min(20.0, slack)))
    assert wait_allowed_ms(20.0, 5.0, [gpu], MODEL_SHA, 1) == 0.0


def test_a_groups_deadline_is_its_tightest_members_counted_once_from_the_first_submission():
    # Submitted at 10.0 s (500 ms), 10.1 s (300 ms: ends first, 400 ms after 10.0) and 10.2 s (none).
    members = [(500.0, 10.0), (300.0, 10.1), (None, 10.2)]
    assert group_deadline_ms(members, 10.0) == pytest.approx(400.0)
    assert group_deadline_ms(members, 10.0, time_scale=10.0) == pytest.approx(310.0)  # 0.1 s wall is 10 ms
    assert group_deadline_ms([(None, 10.0), (None, 10.1)], 10.0) is None


def test_stacked_members_split_back_and_each_share_checks_alone():
    rng = np.random.default_rng(3)
    members = [(Tensor.from_array("x", rng.standard_normal((n, 3)).astype(np.float32)),) for n in (1, 2, 1)]
    assert len({stack_key(m) for m in members}) == 1
    (stacked,) = stack(members)
    assert stacked.shape == (4, 3)
    shares = split({"x": stacked.to_array()}, (1, 2, 1))
    for member, share in zip(members, shares):
        np.testing.assert_array_equal(share["x"], member[0].to_array())


@asynccontextmanager
async def one_provider_market(tmp_path, **provider):
    """A bootstrap, one provider of the fake model (`provider`: make_provider's options)
    and an open client, on the in-memory network."""
    async with trio.open_nursery() as nursery:
        market = Market(tmp_path, nursery)
        boot = await market.start_bootstrap()
        seller = await market.start_provider("seller", boot, marginal_w=40.0, **provider)
        model = tmp_path / "fake.onnx"
        model.write_bytes(MODEL_BYTES)
        client = Client(tmp_path / "client", [boot], clock=market.clock, open_network=market.network.open_node)
        client.offload = client.offload_cpu = _inline  # no worker thread: MockClock would jump while it runs
        async with client:
            client.add_model(model)
            await client.refresh()
            yield seller, client
        nursery.cancel_scope.cancel()


async def test_concurrent_requests_go_as_one_job_and_each_verifies_its_share(tmp_path, autojump_clock):
    inputs = [np.random.default_rng(seed).standard_normal((1, 3)).astype(np.float32) for seed in range(8)]
    answers = [None] * len(inputs)
    async with one_provider_market(tmp_path, peak_items_per_s=1000.0) as (gpu, client):

        async def one(i: int) -> None:
            answers[i] = await client.infer("fake", {"x": inputs[i]})

        async with trio.open_nursery() as requests:
            for i in range(len(inputs)):
                requests.start_soon(one, i)
        await client.drain()
        # The first request found nobody in flight and went alone; the other 7 waited
        # for company and went as one job.
        assert gpu.executor.runs == 2
        assert client.batches == {"jobs": 1, "requests": 7}
        batched = [a for a in answers if a.share is not None]
        assert sorted(a.share for a in batched) == list(range(7))
        assert len({a.job_id for a in batched}) == 1
        for x, answer in zip(inputs, answers):
            np.testing.assert_allclose(answer.outputs["y"], x @ WEIGHTS, rtol=1e-5, atol=1e-6)
            assert answer.share_problems({"x": x}) == []
            assert answer.share_problems({"x": x + 1}) == ["the inputs are not the ones the receipt commits to"]
        receipt = batched[0].receipt
        assert sum(a.outcome.energy_j for a in batched) == pytest.approx(receipt.energy_j)
        # One job of 7 rows: a fixed part plus 7 per-item parts, not 7 jobs of one.
        assert receipt.compute_ms == pytest.approx(1000 * batch_job_s(7, 100.0, 1000.0))
        alone = next(a for a in answers if a.share is None)
        assert alone.receipt.compute_ms == pytest.approx(10.0)
        per_item_batched = receipt.energy_j / 7
        assert per_item_batched < 0.5 * alone.receipt.energy_j
        # A member's own tensors do not pass for its neighbour's entry.
        i, member = next((i, a) for i, a in enumerate(answers) if a.share is not None)
        assert share_problems(receipt, (member.share + 1) % 7, (Tensor.from_array("x", inputs[i]),),
                              (Tensor.from_array("y", member.outputs["y"]),))
        status = [row[0] for row in gpu.ledger.db.execute("SELECT status FROM receipts")]
        assert status == ["accepted", "accepted"]


async def test_without_a_batching_offer_concurrent_requests_go_alone(tmp_path, autojump_clock):
    inputs = [np.random.default_rng(seed).standard_normal((1, 3)).astype(np.float32) for seed in range(8, 12)]
    async with one_provider_market(tmp_path) as (cpu, client):
        async with trio.open_nursery() as requests:
            for x in inputs:
                requests.start_soon(client.infer, "fake", {"x": x})
        assert cpu.executor.runs == 4 and client.batches["jobs"] == 0
