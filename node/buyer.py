"""The buyer client: sync offers, place jobs with the matcher, run them, verify, countersign."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trio

from matcher import Job, Problem, Provider, Weights, solve
from protocol.errors import DecodeError
from protocol.job import BuyerJob, Delivered, ModelSent, Refused, Rejected
from protocol.messages import JobRequest, Offer, SignedReceipt
from protocol.settlement import Dispute, sign_dispute
from protocol.signing import peer_id_from_public_key
from protocol.stream import OfferWant
from protocol.tensors import Tensor
from protocol.topics import JOB_PROTOCOL

from .clock import SYSTEM_CLOCK, Clock
from .faults import fault_point
from .gossip import OfferGossip, bootstrap_peer_id
from .identity import load_key
from .journal import Journal
from .reputation import own_digest, provider_scores
from .settle import settle_with
from .ledger import Ledger, LedgerError, LedgerWriter
from .modelio import InputMismatch, check_inputs, signature_of_model
from .offers import OfferBook
from .net import OpenNetwork, StreamClosed
from .p2p import open_p2p_node

log = logging.getLogger("idlemesh.buyer")
MODEL_UPLOAD_TIMEOUT_S = 120.0
ACK_CONFIRM_TIMEOUT_S = 10.0  # for the provider's `settled`; without it the ack stays pending
JOB_TTL_MS = 10 * 60_000
RETRY_PROVIDERS = 3  # the placed provider and up to two others, per job
# The matcher sees at most this many offers, the best ranked (good receipts with us, then
# held longest by the bootstrap): a swarm of fresh keys with irresistible offers costs a
# batch some failed dials, never every candidate.
MAX_PLACEMENT_OFFERS = 64
SYNC_ATTEMPTS = 5    # per bootstrap, 0.1 s apart and doubling: about 3 s before "cannot reach"
EMPTY_BOOK_RETRIES_S = (0.5, 1.0, 2.0)  # waits before syncing again while every book is empty


class SubmitError(Exception):
    """The submission cannot go ahead; the message says why, for the operator."""


@dataclass
class JobOutcome:
    job_id: str
    index: int
    provider: str = ""
    state: str = "pending"  # protocol.lifecycle.STATES
    latency_ms: float = 0.0
    compute_ms: float = 0.0
    overhead_ms: float = 0.0
    energy_j: float = 0.0
    energy_source: str = ""
    price: float = 0.0
    error: str = ""
    output_path: str = ""
    attempts: list[str] = field(default_factory=list)
    spot_check: dict | None = None
    # Latency on the device the provider is: the wall latency for a real machine; for a
    # simulated one, its link's round trip + its queue + its compute, all at device speed.
    device_latency_ms: float = 0.0

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class SubmitSpec:
    model_path: Path
    inputs: dict[str, np.ndarray]
    count: int
    bootstrap: list[str]
    home: Path
    out_dir: Path
    max_price: float = 1.0
    solver: str = "optimal"
    weights: Weights = Weights()
    job_timeout_s: float = 120.0
    deadline_ms: float | None = None  # each job must finish within this (placement honours it)
    resume: str | None = None  # "latest" or a batch id: finish a journalled batch instead
    spot_check: float = 0.0    # fraction of jobs re-run on a second provider and compared
    atol: float = 1e-4         # outputs agree when |a - b| <= atol + rtol * |b|
    rtol: float = 1e-3
    min_reputation: float = 0.25  # providers scored below this are not used (unseen: 0.5)
    # Inputs are checked against the model's graph before anything is sent; only tests
    # that play a hostile buyer (sending models that are not ONNX at all) turn it off.
    check_inputs: bool = True


def resume_spec(home: Path, bootstrap: list[str], batch: str = "latest", **overrides) -> SubmitSpec:
    """The spec of a journalled batch, to finish it after a crash."""
    journal = Journal(home)
    try:
        found = journal.latest_unfinished() if batch == "latest" else journal.batch(batch)
        discarded = found is not None and journal.is_discarded(found.batch_id)
    finally:
        journal.close()
    if found is None:
        raise SubmitError(f"nothing to resume in {home}" if batch == "latest" else f"no batch {batch} in {home}")
    if discarded:
        raise SubmitError(f"batch {found.batch_id} was discarded (idlemesh batches discard); submit it anew")
    if not found.model_path.exists():
        raise SubmitError(f"batch {found.batch_id}: model {found.model_path} is gone")
    if not found.inputs_path.exists():
        raise SubmitError(f"batch {found.batch_id}: its stored inputs are gone ({found.inputs_path})")
    return SubmitSpec(model_path=found.model_path, inputs=found.load_inputs(), count=found.count,
                      bootstrap=bootstrap, home=home, out_dir=found.out_dir, max_price=found.max_price,
                      solver=found.solver, resume=found.batch_id, **overrides)


def offers_to_problem(offers: list[Offer], model_sha: str, items: int, count: int, max_price: float,
                      weights: Weights, job_ids: list[str], deadline_ms: float | None = None) -> Problem:
    providers = []
    for offer in offers:
        throughput = {m.sha256: m.items_per_s for m in offer.models}
        if model_sha not in throughput and offer.open_models_items_per_s:
            throughput[model_sha] = offer.open_models_items_per_s
        providers.append(Provider(
            id=offer.peer_id, arch=offer.device.arch, slots=offer.slots,
            slot_memory_mb=offer.device.memory_mb / offer.slots, marginal_w=offer.power.marginal_w_per_slot,
            carbon_g_per_kwh=offer.carbon_g_per_kwh, rtt_ms=offer.link_rtt_ms or 0.0, backlog_ms=offer.backlog_ms,
            price_per_s=offer.price_per_s, throughput=throughput))
    jobs = tuple(Job(id=job_ids[i], model=model_sha, items=items, max_price=max_price, deadline_ms=deadline_ms)
                 for i in range(count))
    return Problem(tuple(providers), jobs, weights)


class Buyer:
    def __init__(self, spec: SubmitSpec, *, clock: Clock = SYSTEM_CLOCK, open_network: OpenNetwork = open_p2p_node):
        """`clock` and `open_network` are what a test under MockClock replaces
        (node.clock.TrioClock, node.memnet); the CLI uses the real ones."""
        self.spec = spec
        self.clock = clock
        self.open_network = open_network
        # Where blocking work runs (the matcher, ledger commits, journal writes): a worker
        # thread, one call at a time (the journal's connection is not shared), so the trio
        # loop keeps serving streams. A MockClock test runs it inline instead.
        io_limiter = trio.CapacityLimiter(1)
        self.offload = lambda fn, *args: trio.to_thread.run_sync(fn, *args, limiter=io_limiter)
        if not spec.bootstrap:
            raise SubmitError("give at least one --bootstrap address")
        for addr in spec.bootstrap:
            try:
                bootstrap_peer_id(addr)
            except ValueError as exc:
                raise SubmitError(f"bootstrap {exc}") from None
        self.seed, self.key = load_key(spec.home)
        self.ledger = Ledger(spec.home / "ledger.sqlite", self.key.public_key)  # reads, on the trio thread
        self.writer = LedgerWriter(spec.home / "ledger.sqlite", self.key.public_key,
                                   offload=lambda fn, *args: self.offload(fn, *args))
        self.journal = Journal(spec.home, any_thread=True)
        self.model_bytes = spec.model_path.read_bytes()
        self.model_sha = hashlib.sha256(self.model_bytes).hexdigest()
        if spec.resume:
            batch = self.journal.batch(spec.resume)
            if batch is None or batch.model_sha256 != self.model_sha:
                raise SubmitError(f"batch {spec.resume}: the model file changed since it was submitted")
        self.tensors = tuple(Tensor.from_array(name, arr) for name, arr in spec.inputs.items())
        # Checked here, in milliseconds, against the model's own graph: a wrong input
        # never travels to a provider to be refused seconds later.
        try:
            if spec.check_inputs:
                self.items, _ = check_inputs(signature_of_model(self.model_bytes),
                                             {t.name: (t.dtype, t.shape) for t in self.tensors})
            else:
                self.items = max(1, self.tensors[0].shape[0] if self.tensors and self.tensors[0].shape else 1)
        except InputMismatch as exc:
            raise SubmitError(f"{spec.model_path.name}: {exc}") from None
        self.offers: dict[str, Offer] = {}
        self.batch_id = spec.resume or ""
        self.excluded: dict[str, float] = {}
        self._outcomes: list[JobOutcome] = []
        self._summary: dict = {}

    def _can_run(self, offer: Offer) -> bool:
        return bool(offer.items_per_s(self.model_sha))

    def _ranked(self, offers: list[Offer]) -> list[Offer]:
        """Best first: offers whose providers settled with us most, then those held longest."""
        def rank(offer: Offer) -> tuple:
            entry = self.book.entry(offer.peer_id)
            return (-self.book.standing(offer.peer_id), entry.first_seen_ms if entry else 0, offer.peer_id)
        return sorted(offers, key=rank)

    async def _run_one(self, p2p, outcome: JobOutcome, offer: Offer, *, out_dir: Path | None = None) -> None:
        """One attempt of one job on one provider, driven by the protocol's BuyerJob
        machine; a provider that breaks the protocol fails this attempt (DecodeError),
        never the batch."""
        spec = self.spec
        issued = self.clock.now_ms()
        request = JobRequest(
            job_id=outcome.job_id, buyer=self.key.public_key, provider=offer.provider,
            model_sha256=self.model_sha, model_name=spec.model_path.stem[:128], inputs=self.tensors,
            items=self.items, max_price=spec.max_price, issued_at_ms=issued, expires_at_ms=issued + JOB_TTL_MS,
            timeout_ms=int(spec.job_timeout_s * 1000))
        job = BuyerJob.create(self.key, request, self.model_bytes)
        started = self.clock.elapsed_s()
        outcome.provider = offer.peer_id
        outcome.attempts.append(offer.peer_id)
        outcome.state = job.state
        paid = False
        try:
            with trio.fail_after(spec.job_timeout_s + 30):
                async with p2p.open_stream(offer.peer_id, offer.addrs, JOB_PROTOCOL) as stream:
                    step = job.start()
                    await self.offload(self.journal.sent, outcome.job_id, offer.peer_id, self.clock.now_ms())
                    while True:
                        outcome.state = job.state
                        event = step.events[0] if step.events else None
                        if isinstance(event, (Delivered, Rejected, Refused)):
                            break  # its ack goes only once our decision is durable, below
                        if isinstance(event, ModelSent):
                            fault_point("buyer-model-upload")
                        for payload in step.send:
                            await stream.send(payload, timeout_s=MODEL_UPLOAD_TIMEOUT_S)
                        try:
                            payload = await stream.receive(max_bytes=job.max_frame_bytes, timeout_s=spec.job_timeout_s)
                        except trio.TooSlowError:
                            job.expire()
                            outcome.state = job.state
                            raise
                        step = job.receive(payload, now_ms=self.clock.now_ms())
                    if isinstance(event, Refused):
                        raise SubmitError(f"provider {offer.peer_id[-8:]} refused: {event.code}: {event.message}")
                    if isinstance(event, Rejected):
                        try:
                            await self.writer.apply(event.receipt.envelope_bytes, event.ack, now_ms=self.clock.now_ms())
                        except LedgerError as exc:
                            log.warning("rejected receipt not recorded: %s", exc)
                        for payload in step.send:
                            with trio.move_on_after(ACK_CONFIRM_TIMEOUT_S):
                                await stream.send(payload)
                                await self._confirmation(stream, job)
                        raise DecodeError(event.reason)
                    # Outputs first, then the ledger, then the ack, then the journal: after a
                    # crash at any point the ledger says whether the job was paid for, a paid
                    # job's outputs exist, and our decision is durable before it is sent.
                    fault_point("buyer-after-result")
                    out_path = self._write_outputs(outcome, event.outputs, out_dir or spec.out_dir)
                    applied = await self.writer.apply(event.receipt.envelope_bytes, event.ack,
                                                      now_ms=self.clock.now_ms())
                    if not applied.applied and (applied.status != "accepted" or self.ledger.receipt_bytes(
                            outcome.job_id)[0] != event.receipt.envelope_bytes):
                        # The ledger holds another receipt for this job (a rejected attempt,
                        # or one paid to another provider): accepting this one would have
                        # the provider count money our ledger never moves. No ack; the
                        # attempt fails, and both sides agree that nothing was paid for it.
                        raise LedgerError(f"job {outcome.job_id[:8]} already has a {applied.status} receipt "
                                          "from another attempt")
                    paid = True
                    for payload in step.send:
                        await stream.send(payload)
                    fault_point("buyer-after-ack")
                    job.settle()
                    with trio.move_on_after(ACK_CONFIRM_TIMEOUT_S):
                        await self._confirmation(stream, job)
        except (StreamClosed, trio.TooSlowError, OSError) as exc:
            if not paid:
                raise
            # Paid and durable on our side: the job is settled here whatever became of
            # the ack (the provider keeps its receipt unacked until it hears again).
            log.info("job %s: settled; the ack did not reach %s: %s", outcome.job_id[:8], offer.peer_id[-8:], exc)
        latency_ms = (self.clock.elapsed_s() - started) * 1000
        if job.state == "delivered":
            job.settle()
        await self.offload(self.journal.settled, outcome.job_id, str(out_path), self.clock.now_ms())
        outcome.state = job.state
        receipt = event.receipt.receipt
        outcome.output_path = str(out_path)
        outcome.latency_ms = latency_ms
        outcome.compute_ms = receipt.compute_ms
        # Only comparable for real devices: a simulated one reports profile time, not wall time.
        outcome.overhead_ms = latency_ms - receipt.compute_ms
        outcome.energy_j = receipt.energy_j
        outcome.device_latency_ms = latency_ms if receipt.energy_source != "simulated" else \
            (offer.link_rtt_ms or 0.0) + receipt.queue_ms + receipt.compute_ms
        outcome.energy_source = receipt.energy_source
        outcome.price = receipt.price

    async def _confirmation(self, stream, job: BuyerJob) -> None:
        """The provider's `settled` frame: it holds our ack durably, so we stop carrying
        it. Without one (timeout, closed stream) the ack stays pending and is delivered
        by the settle protocol when we next meet the provider."""
        try:
            payload = await stream.receive(max_bytes=job.max_frame_bytes, timeout_s=ACK_CONFIRM_TIMEOUT_S)
            step = job.receive(payload, now_ms=self.clock.now_ms())
        except (DecodeError, StreamClosed, trio.TooSlowError) as exc:
            log.info("job %s: no confirmation of our ack yet (%s); it stays pending", job.request.job_id[:8], exc)
            return
        (confirmed,) = step.events
        held = self.ledger.status(job.request.job_id)
        if held is not None and held[0] == confirmed.status:
            await self.writer.ack_delivered(job.request.job_id, confirmed.status, now_ms=self.clock.now_ms())
        else:
            log.warning("job %s: the provider holds %s, we hold %s; `idlemesh settle` reconciles",
                        job.request.job_id[:8], confirmed.status, held[0] if held else "nothing")

    def _write_outputs(self, outcome: JobOutcome, outputs, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = out_dir / f"{outcome.index:04d}-{outcome.job_id[:8]}"
        if len(outputs) == 1:
            out_path = stem.with_suffix(".npy")
            tmp = stem.with_suffix(".tmp.npy")
            np.save(tmp, outputs[0].to_array())
        else:
            out_path = stem.with_suffix(".npz")
            tmp = stem.with_suffix(".tmp.npz")
            np.savez(tmp, **{t.name.replace("/", "_"): t.to_array() for t in outputs})
        os.replace(tmp, out_path)
        return out_path

    async def run(self, *, on_progress=None) -> tuple[list[JobOutcome], dict]:
        spec = self.spec
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        reputation = self.ledger.reputation()
        book = OfferBook(wanted=self._can_run, standing=lambda pid: reputation.get(pid, {}).get("accepted", 0))
        self.book = book
        # Only offers that run our model, unless we owe some provider an ack: then every
        # offer, to find it.
        self.want = None if self.ledger.pending_acks() else OfferWant(models=(self.model_sha,))
        async with self.open_network(self.seed, ["/ip4/127.0.0.1/tcp/0"]) as p2p:
            gossip = OfferGossip(p2p, book, clock=self.clock)
            gossip.own_digest = lambda: own_digest(self.key, self.ledger.reputation(), self.ledger.provider_keys(),
                                                   now_ms=self.clock.now_ms())
            unreachable = {}
            for addr in spec.bootstrap:
                error = await self._sync(gossip, p2p, addr)
                if error:
                    unreachable[addr] = error
            # A bootstrap that has just restarted holds no offers until providers
            # reconnect (a second or two): ask again briefly before saying there are none.
            for delay_s in EMPTY_BOOK_RETRIES_S:
                if book.current(now_ms=self.clock.now_ms()) or len(unreachable) == len(spec.bootstrap):
                    break
                await trio.sleep(delay_s)
                for addr in spec.bootstrap:
                    if addr not in unreachable:
                        await self._sync(gossip, p2p, addr)
            current = [e.offer for e in book.current(now_ms=self.clock.now_ms())]
            # Acks a provider never confirmed (we crashed, it did, a stream broke) go first:
            # settling old jobs never waits for new ones.
            await self._deliver_pending_acks(p2p, current)
            scores = provider_scores(reputation, gossip.reputation, self.key.public_key, self.ledger.settled_with())
            trusted = [o for o in current if scores.get(o.peer_id, 0.5) >= spec.min_reputation]
            self.excluded = {o.peer_id: round(scores[o.peer_id], 3) for o in current if o not in trusted}
            offers = [o for o in trusted if o.available]
            if len(unreachable) == len(spec.bootstrap):
                failure = "cannot reach " + "; ".join(f"bootstrap {a} ({e})" for a, e in unreachable.items())
            elif not current:
                failure = (f"no offers at {', '.join(a for a in spec.bootstrap if a not in unreachable)}: "
                           "the bootstrap is up but no provider is selling through it")
            elif not trusted:
                failure = f"all {len(current)} providers score under --min-reputation {spec.min_reputation}"
            elif not offers:
                failure = f"all {len(trusted)} providers have withdrawn their capacity for now (idle-only or carbon ceiling)"
            elif not any(o.items_per_s(self.model_sha) for o in offers):
                failure = (f"no provider offers model {spec.model_path.name} (sha256 {self.model_sha[:16]}...); "
                           f"{len(offers)} offers seen")
            else:
                failure = ""
                await self._run_jobs(p2p, offers, on_progress)
                if spec.spot_check > 0:
                    await self._spot_check(p2p, offers)
                await self._deliver_pending_acks(p2p, current)
                # Share what we learned: our signed digest rides on a last sync.
                for addr in spec.bootstrap:
                    with trio.move_on_after(5):
                        try:
                            await gossip.sync_with(bootstrap_peer_id(addr))
                        except (StreamClosed, DecodeError) as exc:
                            log.info("final sync with %s: %s", addr, exc)
        self.ledger.close()
        self.writer.close()
        self.journal.close()
        # Raised out here, not inside the libp2p context, so callers get it unwrapped.
        if failure:
            raise SubmitError(failure)
        return self._outcomes, self._summary

    async def _deliver_pending_acks(self, p2p, offers: list[Offer]) -> None:
        """Deliver every ack a provider in `offers` has not confirmed; one round trip each."""
        pending = self.ledger.pending_acks()
        reports = self._summary.setdefault("late_acks", {"delivered": 0, "pending": 0, "disagreements": []})
        for offer in offers:
            if offer.peer_id not in pending:
                continue
            report = await settle_with(p2p, self.ledger, self.writer, offer.peer_id, offer.addrs, clock=self.clock)
            reports["delivered"] += report.agreed
            reports["disagreements"] += report.disagreements
            if report.error:
                log.info("pending acks for %s stay pending: %s", offer.peer_id[-8:], report.error)
        reports["pending"] = sum(len(v) for v in self.ledger.pending_acks().values())

    async def _sync(self, gossip: OfferGossip, p2p, addr: str) -> str | None:
        """Take the bootstrap's offer book; None, or why it could not be reached."""
        # A peer that reconnects under the same id (a second `submit` from the same home)
        # can be refused while the remote still holds the old connection: retry briefly.
        delay_s = 0.1
        error = ""
        for attempt in range(SYNC_ATTEMPTS):
            try:
                await p2p.connect(bootstrap_peer_id(addr), [addr])
                await gossip.sync_with(bootstrap_peer_id(addr), want=self.want)
                return None
            except (StreamClosed, DecodeError, trio.TooSlowError) as exc:
                error = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc).rsplit(": ", 1)[-1]
                log.info("bootstrap %s (attempt %d): %s", addr, attempt + 1, exc)
                await trio.sleep(delay_s)
                delay_s *= 2
        log.warning("bootstrap %s unreachable after %d attempts: %s", addr, SYNC_ATTEMPTS, error)
        return error

    def _journal_batch(self) -> tuple[list[str], dict[str, JobOutcome]]:
        """The batch's job ids and an outcome for each; jobs already paid for are done."""
        spec = self.spec
        if spec.resume:
            rows = self.journal.jobs(spec.resume)
            job_ids = [r.job_id for r in rows]
        else:
            batch, job_ids = self.journal.new_batch(
                model_path=spec.model_path, model_sha256=self.model_sha, inputs=spec.inputs, count=spec.count,
                max_price=spec.max_price, solver=spec.solver, out_dir=spec.out_dir, now_ms=self.clock.now_ms())
            self.batch_id = batch.batch_id
            rows = self.journal.jobs(batch.batch_id)
        outcomes = {}
        for r in rows:
            outcome = JobOutcome(r.job_id, r.index, provider=r.provider)
            if self.ledger.has(r.job_id):
                # Paid for before a crash: the ledger is the truth; outputs were written first.
                outcome.state = "settled"
                outcome.output_path = r.output_path
                paid = SignedReceipt.parse(self.ledger.receipt_bytes(r.job_id)[0]).receipt
                outcome.provider = peer_id_from_public_key(paid.provider)
                outcome.compute_ms, outcome.energy_j = paid.compute_ms, paid.energy_j
                outcome.energy_source, outcome.price = paid.energy_source, paid.price
                if r.state != "settled":
                    self.journal.settled(r.job_id, r.output_path, self.clock.now_ms())
            outcomes[r.job_id] = outcome
        return job_ids, outcomes

    async def _run_jobs(self, p2p, offers: list[Offer], on_progress=None) -> None:
        spec = self.spec
        offers = self._ranked([o for o in offers if o.items_per_s(self.model_sha)])[:MAX_PLACEMENT_OFFERS]
        self.offers = {o.peer_id: o for o in offers}
        job_ids, outcomes = self._journal_batch()
        todo = [j for j in job_ids if outcomes[j].state != "settled"]
        problem = offers_to_problem(offers, self.model_sha, self.items, len(todo), spec.max_price,
                                    spec.weights, todo, spec.deadline_ms)
        result = await self.offload(
            lambda: solve(problem, solver=spec.solver, clock=time.perf_counter))
        for u in result.unassigned:
            outcomes[u.job].state = "failed"
            outcomes[u.job].error = u.explain
            self.journal.failed(u.job, u.explain, self.clock.now_ms())
        lanes: dict[tuple[str, int], list] = {}
        for a in sorted(result.assignments, key=lambda a: (a.provider, a.slot, a.position)):
            lanes.setdefault((a.provider, a.slot), []).append(a.job)
        able = [o.peer_id for o in offers if o.items_per_s(self.model_sha)]
        vanished: set[str] = set()

        async def run_lane(provider_id: str, jobs: list[str]) -> None:
            for jid in jobs:
                outcome = outcomes[jid]
                # A provider this job was sent to before a restart may hold its result;
                # then the placed one; then others, if one fails or vanishes mid-job.
                earlier = [outcome.provider] if outcome.provider in self.offers else []
                candidates = list(dict.fromkeys(earlier + [provider_id] + able))
                # A provider that vanished earlier in this batch goes last (its offer may
                # still be current): no job waits on a dead peer when others are up.
                candidates = sorted(candidates, key=lambda p: p in vanished)[:RETRY_PROVIDERS + len(earlier)]
                for pid in candidates:
                    try:
                        await self._run_one(p2p, outcome, self.offers[pid])
                        outcome.error = ""
                        break
                    except (SubmitError, DecodeError, LedgerError, StreamClosed, trio.TooSlowError, OSError,
                            ConnectionError) as exc:
                        outcome.error = f"{type(exc).__name__}: {exc}"
                        if not isinstance(exc, (SubmitError, DecodeError, LedgerError)):
                            vanished.add(pid)
                        log.warning("job %s on %s: %s", jid[:8], pid[-8:], outcome.error)
                if outcome.error:
                    outcome.state = "failed"
                    await self.offload(self.journal.failed, jid, outcome.error, self.clock.now_ms())
                if on_progress:
                    on_progress(outcome)

        async with trio.open_nursery() as nursery:
            for (pid, _slot), jobs in lanes.items():
                nursery.start_soon(run_lane, pid, jobs)
        placement = result.to_json()
        placement["assignments"] = len(result.assignments)
        self._summary.update({"offers": len(offers), "placement": placement, "batch": self.batch_id,
                              "resumed": bool(spec.resume), "already_settled": len(job_ids) - len(todo),
                              "excluded_by_reputation": self.excluded})
        self._outcomes = [outcomes[j] for j in job_ids]

    async def _spot_check(self, p2p, offers: list[Offer]) -> None:
        """Re-run a fraction of settled jobs on a different provider and compare outputs.
        On a mismatch a third provider breaks the tie, and the one that disagrees with
        the other two gets a signed dispute; with no third provider the mismatch is
        reported as inconclusive, never pinned on anyone. Which jobs are checked hashes
        the job id: reproducible, and not something a provider can predict."""
        spec = self.spec
        tally = {"checked": 0, "disputes": 0, "inconclusive": 0}
        able = [o for o in offers if o.items_per_s(self.model_sha)]
        for outcome in list(self._outcomes):
            if outcome.state != "settled" or not outcome.output_path:
                continue
            if int(hashlib.sha256(bytes.fromhex(outcome.job_id)).hexdigest()[:8], 16) / 2**32 >= spec.spot_check:
                continue
            others = [o for o in able if o.peer_id != outcome.provider]
            check = await self._rerun(p2p, outcome, others)
            if check is None:
                continue
            tally["checked"] += 1
            diff, agree = _compare(Path(outcome.output_path), Path(check.output_path), spec.atol, spec.rtol)
            outcome.spot_check = {"by": check.provider, "max_abs_diff": diff, "agree": agree}
            if agree:
                continue
            third = await self._rerun(p2p, outcome, [o for o in others if o.peer_id != check.provider])
            if third is None:
                tally["inconclusive"] += 1
                outcome.spot_check["verdict"] = "inconclusive: no third provider to break the tie"
                continue
            _, original_ok = _compare(Path(outcome.output_path), Path(third.output_path), spec.atol, spec.rtol)
            _, check_ok = _compare(Path(check.output_path), Path(third.output_path), spec.atol, spec.rtol)
            if original_ok == check_ok:
                tally["inconclusive"] += 1
                outcome.spot_check["verdict"] = "inconclusive: the tie-break agrees with both or neither"
                continue
            outlier = check if original_ok else outcome
            tally["disputes"] += 1
            self._dispute(outlier, third, diff)
            outcome.spot_check["verdict"] = f"disputed {outlier.provider}"
            log.warning("job %s: provider %s disagrees with two others (by up to %.3g): disputed",
                        outcome.job_id[:8], outlier.provider[-8:], diff)
        self._summary["spot_checks"] = tally

    async def _rerun(self, p2p, outcome: JobOutcome, candidates: list[Offer]) -> JobOutcome | None:
        for offer in candidates[:2]:
            rerun = JobOutcome(secrets.token_hex(16), outcome.index)
            try:
                await self._run_one(p2p, rerun, offer, out_dir=self.spec.out_dir / "spot-checks")
                return rerun
            except (SubmitError, DecodeError, StreamClosed, trio.TooSlowError, OSError) as exc:
                log.warning("spot check of %s on %s failed: %s", outcome.job_id[:8], offer.peer_id[-8:], exc)
        return None

    def _dispute(self, outlier: JobOutcome, witness: JobOutcome, diff: float) -> None:
        bad = SignedReceipt.parse(self.ledger.receipt_bytes(outlier.job_id)[0])
        good = SignedReceipt.parse(self.ledger.receipt_bytes(witness.job_id)[0])
        dispute = Dispute(outlier.job_id, bad.receipt.provider, bad.body_sha256, good.receipt.provider,
                          good.body_sha256, diff, self.spec.atol, self.clock.now_ms())
        self.ledger.record_dispute(sign_dispute(self.key, dispute), dispute, now_ms=self.clock.now_ms())


def _load_outputs(path: Path) -> list[np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return [data[k] for k in sorted(data.files)]
    return [np.load(path, allow_pickle=False)]


def _compare(a: Path, b: Path, atol: float, rtol: float) -> tuple[float, bool]:
    left, right = _load_outputs(a), _load_outputs(b)
    if len(left) != len(right) or any(x.shape != y.shape for x, y in zip(left, right)):
        return float("inf"), False
    diff = max((float(np.max(np.abs(x.astype(np.float64) - y))) if x.size else 0.0) for x, y in zip(left, right))
    agree = all(np.allclose(x, y, atol=atol, rtol=rtol) for x, y in zip(left, right))
    return diff, agree
