"""The job conversation end to end in one process: a bootstrap, providers and a buyer on
the in-memory network (node/memnet.py) under trio's MockClock, with the real buyer,
provider, gossip, ledger and journal code. Only the executor is a fake (a seeded matrix
product that takes virtual time), so timeouts, retries, providers that vanish, frames
out of order and duplicates are tested without wall-clock time or real processes.
Claims about the real network stay in the real-process tests."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from node.buyer import Buyer, SubmitSpec
from node.calibrate import PowerFigures
from node.clock import TrioClock
from node.bootstrap import serve_bootstrap
from node.config import ProviderConfig
from node.executor import JobFailed, RunOutput
from node.identity import load_or_create_seed
from node.ledger import Ledger
from node.memnet import MemoryNetwork
from node.provider import Provider
from protocol import codec
from protocol.messages import ModelCapability
from protocol.stream import Accepted, JobResult, decode_message, encode_message
from protocol.signing import SigningKey
from protocol.tensors import Tensor
from protocol.topics import JOB_PROTOCOL

WEIGHTS = np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32)
INPUT = np.random.default_rng(11).standard_normal((2, 3)).astype(np.float32)


def matmul_model() -> bytes:
    """A real ONNX model, y = x @ WEIGHTS, so the buyer's local input check reads it; the
    fake executor computes the same product without onnxruntime."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 4])],
        [numpy_helper.from_array(WEIGHTS, "w")])
    return helper.make_model(graph, producer_name="idlemesh-tests").SerializeToString()


MODEL_BYTES = matmul_model()
MODEL_SHA = codec.sha256_hex(MODEL_BYTES)


class FakeExecutor:
    """The model is a seeded matrix product (`matmul_model`), so outputs depend on inputs; each run takes
    `compute_s` of (virtual) time. `hold` keeps runs from finishing until it is set."""

    execution_provider = "CPUExecutionProvider"

    def __init__(self, compute_s: float = 0.5):
        self.compute_s = compute_s
        self.idle_w = 0.0
        self.started = trio.Event()
        self.finished = trio.Event()
        self.hold: trio.Event | None = None
        self.runs = 0

    def trust(self, sha256: str, verdict: dict) -> None:
        pass

    async def run(self, sha256: str, inputs, *, timeout_s: float = 60.0) -> RunOutput:
        if sha256 != MODEL_SHA:
            raise JobFailed("model-invalid", "not the fake model")
        self.runs += 1
        self.started.set()
        if self.hold is not None:
            await self.hold.wait()
        await trio.sleep(self.compute_s)
        y = inputs[0].to_array() @ WEIGHTS
        self.finished.set()
        return RunOutput([Tensor.from_array("y", y)], self.compute_s * 1000)


def make_provider(tmp_path, name: str, network: MemoryNetwork, clock, bootstrap: str, *,
                  marginal_w: float, items_per_s: float = 100.0, ack_timeout_s: float = 30.0,
                  peak_items_per_s: float | None = None) -> Provider:
    config = ProviderConfig(home=tmp_path / name, listen=["/memory"], bootstrap=[bootstrap], device_name=name,
                            arch="x86_64", speed_factor=2.0, price_per_s=0.01, offer_ttl_s=60.0,
                            ack_timeout_s=ack_timeout_s)
    provider = Provider(config, clock=clock, open_network=network.open_node, executor=FakeExecutor())
    provider.offload = _inline  # no worker thread: MockClock would jump while it runs
    provider.models = [ModelCapability("fake", MODEL_SHA, items_per_s, "simulated", peak_items_per_s)]
    provider.power = PowerFigures(5.0, "simulated", 5.0 + marginal_w, "simulated", marginal_w, "simulated")
    return provider


async def _inline(fn, *args):
    return fn(*args)


def make_buyer(tmp_path, network: MemoryNetwork, clock, bootstrap: str, *, count: int = 6,
               job_timeout_s: float = 60.0) -> Buyer:
    model = tmp_path / "fake.onnx"
    model.write_bytes(MODEL_BYTES)
    spec = SubmitSpec(model_path=model, inputs={"x": INPUT}, count=count, bootstrap=[bootstrap],
                      home=tmp_path / "buyer", out_dir=tmp_path / "out", job_timeout_s=job_timeout_s)
    buyer = Buyer(spec, clock=clock, open_network=network.open_node)
    buyer.offload = _inline  # no worker thread: MockClock would jump while it runs
    return buyer


class Market:
    def __init__(self, tmp_path, nursery: trio.Nursery):
        self.tmp_path = tmp_path
        self.nursery = nursery
        self.network = MemoryNetwork()
        self.clock = TrioClock()
        self.scopes: dict[str, trio.CancelScope] = {}

    async def start(self, name: str, serve) -> object:
        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with trio.CancelScope() as scope:
                self.scopes[name] = scope
                await serve(task_status=task_status)

        return await self.nursery.start(run)

    async def start_bootstrap(self) -> str:
        seed = load_or_create_seed(self.tmp_path / "bootstrap")
        node = await self.start("bootstrap", lambda task_status: serve_bootstrap(
            seed, ["/memory"], open_network=self.network.open_node, clock=self.clock, task_status=task_status))
        return node.p2p.listen_addrs[0]

    async def start_provider(self, name: str, bootstrap: str, **kwargs) -> Provider:
        provider = make_provider(self.tmp_path, name, self.network, self.clock, bootstrap, **kwargs)
        await self.start(name, provider.serve)
        return provider

    def stop(self, name: str) -> None:
        self.scopes.pop(name).cancel()

    def run_buyer(self, buyer: Buyer) -> "Batch":
        """The buyer's batch in the background, so the test can act while it runs."""
        batch = Batch()

        async def run() -> None:
            batch.value = await buyer.run()
            batch.done.set()

        self.nursery.start_soon(run)
        return batch


class Batch:
    def __init__(self):
        self.done = trio.Event()
        self.value = None

    async def result(self):
        await self.done.wait()
        return self.value


def outputs_of(outcome) -> np.ndarray:
    return np.load(outcome.output_path)


def ledger_rows(ledger) -> dict[str, tuple]:
    """receipt id -> (status, receipt bytes, ack bytes), as this ledger holds it."""
    return {row[0]: row[1:] for row in ledger.db.execute("SELECT receipt_id, status, receipt, ack FROM receipts")}


def assert_all_settled_and_correct(outcomes, summary) -> None:
    assert [o.state for o in outcomes] == ["settled"] * len(outcomes), [o.error for o in outcomes]
    for outcome in outcomes:
        np.testing.assert_allclose(outputs_of(outcome), INPUT @ WEIGHTS, rtol=1e-6)


async def test_a_buyer_and_two_providers_settle_every_job(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        market = Market(tmp_path, nursery)
        boot = await market.start_bootstrap()
        a = await market.start_provider("a", boot, marginal_w=10.0)
        b = await market.start_provider("b", boot, marginal_w=40.0)
        buyer = make_buyer(tmp_path, market.network, market.clock, boot)
        outcomes, summary = await buyer.run()
        assert_all_settled_and_correct(outcomes, summary)
        assert summary["offers"] == 2
        # Both sides agree on every job: the same receipt and ack bytes, accepted, once.
        buyer_ledger = Ledger(tmp_path / "buyer" / "ledger.sqlite", buyer.key.public_key)
        theirs = {**ledger_rows(a.ledger), **ledger_rows(b.ledger)}
        assert ledger_rows(buyer_ledger) == theirs
        assert set(theirs) == {o.job_id for o in outcomes}
        assert {status for status, _, _ in theirs.values()} == {"accepted"}
        assert a.jobs_done + b.jobs_done == 6
        nursery.cancel_scope.cancel()


async def test_a_provider_that_vanishes_mid_job_costs_a_retry_not_the_job(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        market = Market(tmp_path, nursery)
        boot = await market.start_bootstrap()
        a = await market.start_provider("a", boot, marginal_w=10.0)  # the cheapest: placed first
        await market.start_provider("b", boot, marginal_w=40.0)
        a.executor.hold = trio.Event()  # a's first job never finishes: a dies holding it
        buyer = make_buyer(tmp_path, market.network, market.clock, boot, count=3)
        batch = market.run_buyer(buyer)
        await a.executor.started.wait()
        market.stop("a")
        outcomes, summary = await batch.result()
        assert_all_settled_and_correct(outcomes, summary)
        assert any(o.attempts[0] == a.key.peer_id and o.provider != a.key.peer_id for o in outcomes)
        assert a.jobs_done == 0
        nursery.cancel_scope.cancel()


async def _hostile_offer(market: Market, name: str, boot: str, handler) -> Provider:
    """A provider whose offer is real but whose job handler is `handler`."""
    provider = await market.start_provider(name, boot, marginal_w=1.0)  # the cheapest: placed first
    provider.p2p.set_stream_handler(JOB_PROTOCOL, handler)
    return provider


async def test_a_silent_provider_costs_its_timeout_in_virtual_time_then_a_retry(tmp_path, autojump_clock):
    async def silent(stream):
        await stream.receive(max_bytes=1 << 24, timeout_s=3600)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        market = Market(tmp_path, nursery)
        boot = await market.start_bootstrap()
        mute = await _hostile_offer(market, "mute", boot, silent)
        await market.start_provider("b", boot, marginal_w=40.0)
        started = trio.current_time()
        outcomes, summary = await make_buyer(tmp_path, market.network, market.clock, boot, count=2,
                                             job_timeout_s=45.0).run()
        assert_all_settled_and_correct(outcomes, summary)
        tried_mute = [o for o in outcomes if mute.key.peer_id in o.attempts]
        assert tried_mute and all(o.provider != mute.key.peer_id for o in tried_mute)
        # The buyer waited out its read timeout (virtual seconds) before the retry.
        assert trio.current_time() - started >= 45.0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("misbehaviour", ["accepted-twice", "result-with-garbage-receipt", "unknown-kind",
                                          "result-for-another-job"])
async def test_a_provider_that_breaks_the_protocol_fails_its_attempt_not_the_batch(tmp_path, autojump_clock,
                                                                                    misbehaviour):
    async def hostile(stream):
        submit = decode_message(await stream.receive(max_bytes=1 << 24, timeout_s=60), max_bytes=1 << 24,
                                expect=("submit",))
        from protocol.messages import open_job_request
        _, request = open_job_request(submit.request)
        if misbehaviour == "accepted-twice":
            await stream.send(encode_message(Accepted(request.job_id, 0)))
            await stream.send(encode_message(Accepted(request.job_id, 0)))
        elif misbehaviour == "result-with-garbage-receipt":
            await stream.send(encode_message(JobResult(request.job_id, (), b"\x00garbage")))
        elif misbehaviour == "unknown-kind":
            await stream.send(codec.encode({"kind": "surprise"}))
        else:
            await stream.send(encode_message(Accepted("00" * 16, 0)))
        try:
            await stream.receive(max_bytes=1 << 16, timeout_s=60)
        except Exception:  # noqa: BLE001 - whatever the buyer does next, this peer is done
            pass

    async with trio.open_nursery() as nursery:
        market = Market(tmp_path, nursery)
        boot = await market.start_bootstrap()
        bad = await _hostile_offer(market, "bad", boot, hostile)
        await market.start_provider("b", boot, marginal_w=40.0)
        outcomes, summary = await make_buyer(tmp_path, market.network, market.clock, boot, count=3).run()
        assert_all_settled_and_correct(outcomes, summary)
        assert any(bad.key.peer_id in o.attempts for o in outcomes)
        nursery.cancel_scope.cancel()


async def test_a_hostile_buyer_changes_nothing_and_honest_jobs_still_settle(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        market = Market(tmp_path, nursery)
        boot = await market.start_bootstrap()
        a = await market.start_provider("a", boot, marginal_w=10.0)
        honest = make_buyer(tmp_path, market.network, market.clock, boot, count=1)
        await honest.run()
        error_codes = []

        # A hostile peer on the same network: garbage, frames out of order, a replayed submit.
        seed = bytes(range(40, 72))
        async with market.network.open_node(seed, []) as evil:
            for frames in ([b"\xc1garbage"], [encode_message(Accepted("00" * 16, 0))],
                           [codec.encode({"kind": "ack", "ack": b"x" * 10})]):
                async with evil.open_stream(a.key.peer_id, a.p2p.listen_addrs, JOB_PROTOCOL) as stream:
                    for frame in frames:
                        await stream.send(frame)
                    reply = decode_message(await stream.receive(max_bytes=1 << 16, timeout_s=60),
                                           max_bytes=1 << 16, expect=("error",))
                    error_codes.append(reply.code)
        assert error_codes == ["bad-request"] * 3
        receipts_before = a.ledger.db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]
        # A second honest batch still settles, and the hostile peer left no trace in the ledger.
        (tmp_path / "second").mkdir()
        again = make_buyer(tmp_path / "second", market.network, market.clock, boot, count=2)
        outcomes, summary = await again.run()
        assert_all_settled_and_correct(outcomes, summary)
        assert a.ledger.db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0] == receipts_before + 2
        assert a.counters["bad-request"] == 3
        nursery.cancel_scope.cancel()


async def test_the_market_outlives_many_offer_lifetimes_and_a_bootstrap_restart(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        market = Market(tmp_path, nursery)
        boot = await market.start_bootstrap()
        await market.start_provider("a", boot, marginal_w=10.0)
        await market.start_provider("b", boot, marginal_w=40.0)
        await trio.sleep(20 * 60)  # twenty offer lifetimes of virtual time
        market.stop("bootstrap")
        await trio.sleep(5)
        assert await market.start_bootstrap() == boot  # back at its address, with an empty book
        # A buyer at once: the providers' reconnect loops find the bootstrap and push their
        # offers while the buyer asks again for a book that is still empty.
        outcomes, summary = await make_buyer(tmp_path, market.network, market.clock, boot, count=4).run()
        assert_all_settled_and_correct(outcomes, summary)
        assert summary["offers"] == 2
        nursery.cancel_scope.cancel()


async def test_after_a_rejected_receipt_no_side_counts_money_the_other_does_not(tmp_path, autojump_clock):
    """A provider whose result does not match its receipt is rejected (signed, with the
    reason); the job's retry on an honest provider must not leave that provider counting
    an accepted receipt the buyer's ledger never moved money for."""
    from protocol.job import ProviderJob

    async def tampering(stream):
        job = ProviderJob.create(liar.key)
        job.receive(await stream.receive(max_bytes=job.max_frame_bytes, timeout_s=60), now_ms=market.clock.now_ms())
        await stream.send(job.accept(0).send[0])
        y = job.request.inputs[0].to_array() @ WEIGHTS
        (frame,) = job.deliver((Tensor.from_array("y", y),), compute_ms=1.0, queue_ms=0.0, energy_j=0.1,
                               energy_source="simulated", price_per_s=0.01, execution_provider="CPUExecutionProvider",
                               now_ms=market.clock.now_ms()).send
        tampered = codec.decode(frame, max_bytes=1 << 24, what="frame")
        tampered["outputs"][0]["data"] = bytes(len(tampered["outputs"][0]["data"]))
        await stream.send(codec.encode(tampered))
        ack = job.receive(await stream.receive(max_bytes=job.max_frame_bytes, timeout_s=60),
                          now_ms=market.clock.now_ms())
        rejections.append(ack.events[0])

    rejections = []
    async with trio.open_nursery() as nursery:
        market = Market(tmp_path, nursery)
        boot = await market.start_bootstrap()
        liar = await _hostile_offer(market, "liar", boot, tampering)
        honest = await market.start_provider("b", boot, marginal_w=40.0)
        buyer = make_buyer(tmp_path, market.network, market.clock, boot, count=1)
        (outcome,), _ = await buyer.run()
        (rejection,) = rejections
        assert not rejection.accepted and "output hash" in rejection.reason
        buyer_ledger = ledger_rows(Ledger(tmp_path / "buyer" / "ledger.sqlite", buyer.key.public_key))
        assert buyer_ledger[outcome.job_id][0] == "rejected"
        # The honest provider ran it, but the buyer never accepted its receipt: unacked
        # there, and the job failed here; neither side moved money.
        assert outcome.state == "failed" and honest.key.peer_id in outcome.attempts
        assert ledger_rows(honest.ledger)[outcome.job_id][0] == "unacked"
        nursery.cancel_scope.cancel()


def agree(buyer: Buyer, *providers: Provider) -> None:
    """Both sides hold the same receipt and status for every job between them, no ack is
    pending, and every ledger sums to zero."""
    ledger = Ledger(buyer.spec.home / "ledger.sqlite", buyer.key.public_key)
    ours = ledger_rows(ledger)
    theirs = {}
    for p in providers:
        theirs.update({job: (status, receipt) for job, (status, receipt, _) in ledger_rows(p.ledger).items()})
        assert p.ledger.total_pico() == 0
    assert {job: (status, receipt) for job, (status, receipt, _) in ours.items()} == \
        {job: theirs[job] for job in ours}
    assert ledger.pending_acks() == {} and ledger.total_pico() == 0


async def test_a_buyer_slower_than_the_ack_timeout_settles_by_a_late_ack(tmp_path, autojump_clock):
    """Every frame the buyer sends takes 5 virtual seconds; the provider waits 2 s for
    an ack, so it gives up on each: the buyer's acks are delivered late, once."""
    async with trio.open_nursery() as nursery:
        market = Market(tmp_path, nursery)
        boot = await market.start_bootstrap()
        a = await market.start_provider("a", boot, marginal_w=10.0, ack_timeout_s=2.0)
        buyer = make_buyer(tmp_path, market.network, market.clock, boot, count=3)
        market.network.send_delay_s[buyer.key.peer_id] = 5.0
        outcomes, summary = await buyer.run()
        assert_all_settled_and_correct(outcomes, summary)
        assert a.counters["no-ack"] == 3
        assert summary["late_acks"]["delivered"] == 3 and summary["late_acks"]["pending"] == 0
        agree(buyer, a)
        nursery.cancel_scope.cancel()


async def test_a_provider_that_restarts_between_result_and_ack_settles_on_the_next_meeting(tmp_path, autojump_clock,
                                                                                          monkeypatch):
    result_sent = trio.Event()
    monkeypatch.setattr("node.provider.fault_point",
                        lambda name: result_sent.set() if name == "provider-before-ack" else None)
    async with trio.open_nursery() as nursery:
        market = Market(tmp_path, nursery)
        boot = await market.start_bootstrap()
        a = await market.start_provider("a", boot, marginal_w=10.0)
        buyer = make_buyer(tmp_path, market.network, market.clock, boot, count=1)
        market.network.send_delay_s[buyer.key.peer_id] = 5.0  # the ack is on its way when `a` stops
        batch = market.run_buyer(buyer)
        await result_sent.wait()
        market.stop("a")  # its result is sent, its ack not yet received
        (outcome,), summary = await batch.result()
        assert outcome.state == "settled"  # paid and durable on the buyer's side
        assert summary["late_acks"]["pending"] == 1
        assert ledger_rows(a.ledger)[outcome.job_id][0] == "unacked"
        # `a` comes back with the same home; the buyer's next batch delivers the ack first.
        a.ledger.close()
        a.writer.close()
        again = await market.start_provider("a", boot, marginal_w=10.0)
        second = make_buyer(tmp_path, market.network, market.clock, boot, count=1)
        outcomes, summary = await second.run()
        assert summary["late_acks"]["delivered"] >= 1 and summary["late_acks"]["pending"] == 0
        assert ledger_rows(again.ledger)[outcome.job_id][0] == "accepted"
        agree(second, again)
        nursery.cancel_scope.cancel()


async def test_a_buyer_gone_mid_upload_can_submit_the_same_job_again_at_once(tmp_path, autojump_clock):
    from protocol.job import BuyerJob
    from protocol.messages import JobRequest

    async with trio.open_nursery() as nursery:
        market = Market(tmp_path, nursery)
        boot = await market.start_bootstrap()
        a = await market.start_provider("a", boot, marginal_w=10.0)
        buyer_key = SigningKey(bytes(range(50, 82)))
        now = market.clock.now_ms()
        request = JobRequest(job_id="ab" * 16, buyer=buyer_key.public_key, provider=a.key.public_key,
                             model_sha256=MODEL_SHA, model_name="fake", inputs=(Tensor.from_array("x", INPUT),),
                             items=2, max_price=1.0, issued_at_ms=now, expires_at_ms=now + 600_000)
        async with market.network.open_node(bytes(range(50, 82)), []) as node:
            job = BuyerJob.create(buyer_key, request, MODEL_BYTES)
            async with node.open_stream(a.key.peer_id, a.p2p.listen_addrs, JOB_PROTOCOL) as stream:
                await stream.send(job.start().send[0])
                job.receive(await stream.receive(max_bytes=1 << 20, timeout_s=60), now_ms=now)
                assert job.model_sent  # the provider asked for the model; we leave without sending it
            job = BuyerJob.create(buyer_key, request, MODEL_BYTES)
            async with node.open_stream(a.key.peer_id, a.p2p.listen_addrs, JOB_PROTOCOL) as stream:
                step = job.start()
                while job.state not in ("delivered", "failed"):
                    for payload in step.send:
                        await stream.send(payload)
                    step = job.receive(await stream.receive(max_bytes=job.max_frame_bytes, timeout_s=60),
                                       now_ms=market.clock.now_ms())
        assert job.state == "delivered", job.error
        nursery.cancel_scope.cancel()


async def test_a_result_kept_across_a_provider_restart_is_fetched_on_resume_not_run_again(tmp_path, autojump_clock,
                                                                                       monkeypatch):
    """The provider dies after its receipt and result are durable but before it sent
    them: the batch fails there; on `--resume` the restarted provider answers the same
    job with the stored bytes, without running it again."""
    from node.buyer import resume_spec

    async with trio.open_nursery() as nursery:
        market = Market(tmp_path, nursery)
        boot = await market.start_bootstrap()
        a = await market.start_provider("a", boot, marginal_w=10.0)
        buyer = make_buyer(tmp_path, market.network, market.clock, boot, count=1)
        # Stopped once receipt and result are durable, before the result is sent: the
        # cancellation lands at the send's first checkpoint.
        monkeypatch.setattr("node.provider.fault_point",
                            lambda name: market.stop("a") if name == "provider-before-result" else None)
        batch = market.run_buyer(buyer)
        (outcome,), _ = await batch.result()
        assert outcome.state == "failed"
        kept = a.ledger.kept_result(outcome.job_id, now_ms=market.clock.now_ms())
        assert kept is not None and kept[0] == buyer.key.public_key
        a.ledger.close()
        a.writer.close()
        again = await market.start_provider("a", boot, marginal_w=10.0)
        spec = resume_spec(tmp_path / "buyer", [boot], "latest", job_timeout_s=60.0)
        resumed = Buyer(spec, clock=market.clock, open_network=market.network.open_node)
        resumed.offload = _inline
        (outcome,), summary = await resumed.run()
        assert outcome.state == "settled" and summary["resumed"]
        np.testing.assert_allclose(outputs_of(outcome), INPUT @ WEIGHTS, rtol=1e-6)
        assert again.executor.runs == 0  # fetched, not run again
        agree(resumed, again)
        nursery.cancel_scope.cancel()


async def test_a_provider_refuses_at_once_what_its_queue_cannot_finish_in_time_and_its_offer_shows_the_queue(
        tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        market = Market(tmp_path, nursery)
        boot = await market.start_bootstrap()
        a = await market.start_provider("a", boot, marginal_w=10.0)  # the cheapest: placed first
        b = await market.start_provider("b", boot, marginal_w=40.0)
        # Ten seconds of someone else's work running on a's slot, which its offer does not
        # show yet: the buyer places on a, a refuses at once, and the job settles on b.
        assert a.queue.admit("someone-else", 10_000, a.clock.now_ms()) == ""
        a.queue.start("someone-else", a.clock.now_ms())
        model = tmp_path / "fake.onnx"
        model.write_bytes(MODEL_BYTES)
        spec = SubmitSpec(model_path=model, inputs={"x": INPUT}, count=1, bootstrap=[boot], home=tmp_path / "buyer",
                          out_dir=tmp_path / "out", deadline_ms=2_000)
        buyer = Buyer(spec, clock=market.clock, open_network=market.network.open_node)
        buyer.offload = _inline
        started = trio.current_time()
        outcomes, summary = await buyer.run()
        assert_all_settled_and_correct(outcomes, summary)
        assert outcomes[0].attempts == [a.key.peer_id, b.key.peer_id] and a.counters["deadline"] == 1
        assert a.jobs_done == 0 and b.jobs_done == 1
        assert trio.current_time() - started < 2.0  # refused at once, not after a's queue
        # The refusal said how long a's queue is: the buyer's next placement counts it.
        assert buyer.client.heard_backlog[a.key.peer_id][0] >= 9_000
        # The queue moved: a's offer is signed again with the wait a new job would see.
        a._queue_changed()
        with trio.fail_after(5):
            while a._published_backlog_ms < 9_000:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()


async def test_results_kept_for_buyers_that_vanished_are_dropped_once_their_request_expires(tmp_path, autojump_clock):
    """A buyer that leaves before its answer never lets a job end normally, which is when
    the kept results are pruned: an idle provider must still drop the expired ones."""
    from protocol.job import BuyerJob
    from protocol.messages import JobRequest
    from node.provider import MIN_KEEP_RESULT_MS, KEPT_RESULTS_PRUNE_S

    async with trio.open_nursery() as nursery:
        market = Market(tmp_path, nursery)
        boot = await market.start_bootstrap()
        a = await market.start_provider("a", boot, marginal_w=10.0)
        seed = bytes(range(50, 82))
        buyer_key = SigningKey(seed)
        async with market.network.open_node(seed, []) as node:
            for n in range(3):
                now = market.clock.now_ms()
                request = JobRequest(job_id=f"{n:02x}" * 16, buyer=buyer_key.public_key, provider=a.key.public_key,
                                     model_sha256=MODEL_SHA, model_name="fake", inputs=(Tensor.from_array("x", INPUT),),
                                     items=2, max_price=1.0, issued_at_ms=now, expires_at_ms=now + 60_000)
                job = BuyerJob.create(buyer_key, request, MODEL_BYTES)
                a.executor.finished, a.executor.hold = trio.Event(), trio.Event()
                async with node.open_stream(a.key.peer_id, a.p2p.listen_addrs, JOB_PROTOCOL) as stream:
                    step = job.start()
                    while job.state == "requested":  # the model goes up first, if asked for
                        for payload in step.send:
                            await stream.send(payload)
                        step = job.receive(await stream.receive(max_bytes=1 << 20, timeout_s=60), now_ms=now)
                    assert job.state in ("accepted", "running"), job.state
                # Gone before the result; the provider runs the job and keeps it for a resubmission.
                a.executor.hold.set()
                await a.executor.finished.wait()
                await trio.sleep(1)
        kept = a.ledger.db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        assert kept == 3
        await trio.sleep(MIN_KEEP_RESULT_MS / 1000 + 2 * KEPT_RESULTS_PRUNE_S)  # no job ends meanwhile
        assert a.ledger.db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0
        nursery.cancel_scope.cancel()


class _LinksOnly:
    """What a provider's deaf-link check reads of its network: kept links, whether each
    bootstrap's subscription is held, and redials."""

    def __init__(self, links: dict, subscribed: set[str]):
        self.links = links
        self.subscribed = subscribed
        self.redials: list[str] = []

    def subscribes(self, peer_id: str, topic: str) -> bool:
        return peer_id in self.subscribed

    async def redial(self, peer_id: str) -> None:
        self.redials.append(peer_id)


async def test_a_provider_redials_at_its_next_refresh_a_bootstrap_whose_subscription_it_lost(tmp_path):
    """py-libp2p can forget a bootstrap's subscription mid-connection; every publish after
    that reaches nobody through it. The provider notices at its next refresh (not a
    lifetime later) and redials; not a bootstrap still within its greeting, not one that
    subscribes, and at most once per offer lifetime each."""
    from node.clock import SYSTEM_CLOCK
    provider = make_provider(tmp_path, "p", MemoryNetwork(), SYSTEM_CLOCK, "/memory/boot", marginal_w=5.0)
    now_ms = SYSTEM_CLOCK.now_ms()
    links = {"deaf": {"connected": True, "connected_at_ms": now_ms - 60_000},
             "greeting": {"connected": True, "connected_at_ms": now_ms - 1_000},
             "fine": {"connected": True, "connected_at_ms": now_ms - 60_000},
             "down": {"connected": False, "connected_at_ms": now_ms - 60_000}}
    provider.p2p = _LinksOnly(links, subscribed={"fine"})
    await provider._heal_deaf_links()
    assert provider.p2p.redials == ["deaf"]
    await provider._heal_deaf_links()  # the next refresh, within the same lifetime
    assert provider.p2p.redials == ["deaf"]
