"""The buyer client: sync offers, place jobs with the matcher, run them, verify, countersign."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import trio

from matcher import Weights, solve
from protocol.errors import DecodeError
from protocol.messages import Offer, SignedReceipt
from protocol.signing import peer_id_from_public_key

from .client import ATTEMPT_ERRORS, Client, ClientError, JobOutcome, ProviderBusy, Work, chosen_for_check, output_key
from .clock import SYSTEM_CLOCK, Clock
from .journal import CLIENT_REQUEST, Journal
from .ledger import LedgerError
from .net import OpenNetwork
from .p2p import open_p2p_node
from .placement import (BUSY_RETRIES, RETRY_PROVIDERS, buyer_weights, lane_window, offers_to_problem,
                        remaining_deadline_ms, retry_offers)

log = logging.getLogger("idlemesh.buyer")
# What went wrong with a submission; the same kind as the warm client's one-line errors.
SubmitError = ClientError


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
    weights: Weights | None = None  # None: placement.buyer_weights (deadline-driven)
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
    time_scale: float = 1.0  # devnet run: the simulated market's durations x this on the wall clock
    # Different inputs per job (submit --inputs): job i runs job_inputs[i]; then `inputs`
    # and `count` are ignored.
    job_inputs: list[dict[str, np.ndarray]] | None = None

    def __post_init__(self) -> None:
        if self.job_inputs is not None:
            self.count = len(self.job_inputs)
            self.inputs = {}

    def journalled_inputs(self) -> dict[str, np.ndarray]:
        """What the journal stores: the one input set, or each job's under "INDEX:NAME"."""
        if self.job_inputs is None:
            return self.inputs
        return {f"{i}:{name}": array for i, one in enumerate(self.job_inputs) for name, array in one.items()}


def split_journalled_inputs(stored: dict[str, np.ndarray], count: int) -> tuple[dict, list | None]:
    """The inverse of SubmitSpec.journalled_inputs: (inputs, job_inputs)."""
    if not stored or not all(":" in key and key.partition(":")[0].isdigit() for key in stored):
        return stored, None
    per_job: list[dict[str, np.ndarray]] = [{} for _ in range(count)]
    for key, array in stored.items():
        index, _, name = key.partition(":")
        per_job[int(index)][name] = array
    return {}, per_job


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
    if found.solver == CLIENT_REQUEST:
        raise SubmitError(f"batch {found.batch_id} is one request of a warm client; its application holds "
                          "the inputs and asks again")
    if not found.model_path.exists():
        raise SubmitError(f"batch {found.batch_id}: model {found.model_path} is gone")
    if not found.inputs_path.exists():
        raise SubmitError(f"batch {found.batch_id}: its stored inputs are gone ({found.inputs_path})")
    inputs, job_inputs = split_journalled_inputs(found.load_inputs(), found.count)
    return SubmitSpec(model_path=found.model_path, inputs=inputs, job_inputs=job_inputs, count=found.count,
                      bootstrap=bootstrap, home=home, out_dir=found.out_dir, max_price=found.max_price,
                      solver=found.solver, resume=found.batch_id, **overrides)


class Buyer:
    """One batch: the same input `count` times, or one job per input set (or a resumed
    batch), placed together by the matcher and run through a Client, with spot checks
    after."""

    def __init__(self, spec: SubmitSpec, *, clock: Clock = SYSTEM_CLOCK, open_network: OpenNetwork = open_p2p_node):
        """`clock` and `open_network` are what a test under MockClock replaces
        (node.clock.TrioClock, node.memnet); the CLI uses the real ones."""
        self.spec = spec
        self.clock = clock
        if not spec.bootstrap:
            raise SubmitError("give at least one --bootstrap address")
        self.client = Client(spec.home, spec.bootstrap, max_price=spec.max_price, solver=spec.solver,
                             weights=spec.weights, job_timeout_s=spec.job_timeout_s,
                             min_reputation=spec.min_reputation, clock=clock, open_network=open_network,
                             time_scale=spec.time_scale)
        client = self.client
        self.seed, self.key, self.ledger, self.journal = client.seed, client.key, client.ledger, client.journal
        model = client.add_model(spec.model_path, read_signature=spec.check_inputs)
        # Every job's inputs are checked here, before anything is sent.
        self.works = [Work.prepare(model, inputs, max_price=spec.max_price, timeout_s=spec.job_timeout_s)
                      for inputs in (spec.job_inputs if spec.job_inputs is not None else [spec.inputs])]
        self.model_sha = model.sha256
        if spec.resume:
            batch = self.journal.batch(spec.resume)
            if batch is None or batch.model_sha256 != self.model_sha:
                raise SubmitError(f"batch {spec.resume}: the model file changed since it was submitted")
        self.offers: dict[str, Offer] = {}
        self.batch_id = spec.resume or ""
        self.excluded: dict[str, float] = {}
        self._outcomes: list[JobOutcome] = []
        self._summary: dict = {}

    @property
    def offload(self):
        """Where blocking work runs: the client's (a MockClock test sets it inline)."""
        return self.client.offload

    @offload.setter
    def offload(self, run) -> None:
        self.client.offload = self.client.offload_cpu = run

    async def _run_one(self, outcome: JobOutcome, offer: Offer, *, out_dir: Path | None = None,
                       submitted_s: float | None = None, in_time: bool = True) -> None:
        """One attempt of one job on one provider (Client.attempt), its outputs kept as
        files; the job's deadline counts from `submitted_s` (and goes with the request
        unless the job is already placed as late: `in_time` False)."""
        keep = partial(self._write_outputs, outcome, out_dir=out_dir or self.spec.out_dir)
        await self.client.attempt(self._work(outcome.index), outcome, offer, keep=keep,
                                  deadline_ms=self.spec.deadline_ms if in_time else None, submitted_s=submitted_s)

    def _work(self, index: int) -> Work:
        return self.works[index] if len(self.works) > 1 else self.works[0]

    def _write_outputs(self, outcome: JobOutcome, outputs, *, out_dir: Path) -> str:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = out_dir / f"{outcome.index:04d}-{outcome.job_id[:8]}"
        if len(outputs) == 1:
            out_path = stem.with_suffix(".npy")
            tmp = stem.with_suffix(".tmp.npy")
            np.save(tmp, outputs[0].to_array())
        else:
            out_path = stem.with_suffix(".npz")
            tmp = stem.with_suffix(".tmp.npz")
            np.savez(tmp, **{output_key(t.name): t.to_array() for t in outputs})
        os.replace(tmp, out_path)
        return str(out_path)

    async def run(self, *, on_progress=None, start_at: float | None = None) -> tuple[list[JobOutcome], dict]:
        """`start_at` (trio time; devnet run): connect and sync first, then wait for it
        with the book following gossip, so the batch is placed at that moment on the
        offers as they are then, without a node's start-up in its latency."""
        spec = self.spec
        client = self.client
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            async with client.session(live=start_at is not None):
                if start_at is not None:
                    await trio.sleep_until(start_at)
                self.book = client.book
                current = client.current_offers()
                scores = client.scores()
                self.excluded = {o.peer_id: round(scores[o.peer_id], 3) for o in current
                                 if scores.get(o.peer_id, 0.5) < spec.min_reputation}
                try:
                    offers = client.candidates(self.model_sha)
                except ClientError as exc:
                    failure = str(exc)
                else:
                    failure = ""
                    await self._run_jobs(offers, on_progress)
                    if spec.spot_check > 0:
                        await self._spot_check(offers)
                    await client.deliver_pending_acks(current)
                    await client.share_digest()
                self._summary["late_acks"] = client.late_acks
        finally:
            client.close()
        # Raised out here, not inside the libp2p context, so callers get it unwrapped.
        if failure:
            raise SubmitError(failure)
        return self._outcomes, self._summary

    def _journal_batch(self) -> tuple[list[str], dict[str, JobOutcome]]:
        """The batch's job ids and an outcome for each; jobs already paid for are done."""
        spec = self.spec
        if spec.resume:
            rows = self.journal.jobs(spec.resume)
            job_ids = [r.job_id for r in rows]
        else:
            batch, job_ids = self.journal.new_batch(
                model_path=spec.model_path, model_sha256=self.model_sha, inputs=spec.journalled_inputs(), count=spec.count,
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

    async def _run_jobs(self, offers: list[Offer], on_progress=None) -> None:
        spec = self.spec
        self.offers = {o.peer_id: o for o in offers}
        job_ids, outcomes = self._journal_batch()
        todo = [j for j in job_ids if outcomes[j].state != "settled"]
        index = {jid: outcomes[jid].index for jid in todo}
        problem = offers_to_problem(offers, self.model_sha, [self._work(index[j]).items for j in todo], len(todo),
                                    spec.max_price,
                                    buyer_weights(spec.weights, spec.deadline_ms), todo, spec.deadline_ms)
        result = await self.offload(
            lambda: solve(problem, solver=spec.solver, clock=time.perf_counter))
        for u in result.unassigned:
            outcomes[u.job].state = "failed"
            outcomes[u.job].error = u.explain
            self.journal.failed(u.job, u.explain, self.clock.now_ms())
        lanes: dict[tuple[str, int], list] = {}
        for a in sorted(result.assignments, key=lambda a: (a.provider, a.slot, a.position)):
            lanes.setdefault((a.provider, a.slot), []).append(a.job)
        able = [o for o in offers if o.items_per_s(self.model_sha)]
        vanished: set[str] = set()
        submitted_s = self.clock.elapsed_s()

        def replace(jid: str, tried: set[str], busy: set[str]) -> tuple[str, bool] | None:
            """Where a failed job goes next: the matcher's choice on the current state
            (our jobs in flight included) among providers not yet tried for it; one that
            vanished earlier in this batch, or just answered busy, only if nobody else can
            take it."""
            if not retry_offers(able, tried, vanished):  # (busy ones are not in `tried`)
                return None
            left_ms = remaining_deadline_ms(spec.deadline_ms, self.client.since_ms(submitted_s), 0.0)
            try:
                offer, in_time = self.client.place_again(self._work(outcomes[jid].index), jid, able, tried=tried,
                                                         vanished=vanished, busy=busy, deadline_left_ms=left_ms)
                return offer.peer_id, in_time
            except ClientError as exc:
                outcomes[jid].error += f"; no other provider can take it: {exc}"
                return None

        async def run_job(jid: str, provider_id: str, window: trio.Semaphore) -> None:
            try:
                outcome = outcomes[jid]
                # A provider this job was sent to before a restart may hold its result: it
                # goes first, then the placed one; then the matcher's next choice, if one
                # fails or vanishes mid-job.
                earlier = [outcome.provider] if outcome.provider in self.offers else []
                queue = [(pid, True) for pid in dict.fromkeys(earlier + [provider_id])]
                tried: set[str] = set()
                busy: set[str] = set()  # answered busy last time: elsewhere first, else back after a wait
                busy_answers = 0
                while queue:
                    pid, in_time = queue.pop(0)
                    if pid in busy:  # nobody else can take it: back once the queue there drains
                        await self.client.wait_out_busy(pid)
                    busy.clear()
                    tried.add(pid)
                    try:
                        await self._run_one(outcome, self.offers[pid], submitted_s=submitted_s, in_time=in_time)
                        outcome.error = ""
                        break
                    except ProviderBusy as exc:
                        outcome.error = f"{type(exc).__name__}: {exc}"
                        log.warning("job %s on %s: %s", jid[:8], pid[-8:], outcome.error)
                        if busy_answers < BUSY_RETRIES:
                            busy_answers += 1
                            tried.discard(pid)
                            busy.add(pid)
                    except (SubmitError, *ATTEMPT_ERRORS) as exc:
                        outcome.error = f"{type(exc).__name__}: {exc}"
                        if not isinstance(exc, (SubmitError, DecodeError, LedgerError)):
                            vanished.add(pid)
                        log.warning("job %s on %s: %s", jid[:8], pid[-8:], outcome.error)
                    if not queue and len(tried) < RETRY_PROVIDERS + len(earlier):
                        placed = replace(jid, tried, busy)
                        queue = [placed] if placed else []
                if outcome.error:
                    outcome.state = "failed"
                    await self.offload(self.journal.failed, jid, outcome.error, self.clock.now_ms())
                if on_progress:
                    on_progress(outcome)
            finally:
                window.release()

        async def run_lane(provider_id: str, jobs: list[str]) -> None:
            # Up to lane_window() of a lane's jobs at the provider at once: they queue there
            # back to back, as the matcher's placement assumes, instead of each paying the
            # link's round trip after the one before it.
            window = trio.Semaphore(lane_window(max(
                sum(len(t.data) for t in self._work(outcomes[j].index).tensors) for j in jobs)))
            async with trio.open_nursery() as lane:
                for jid in jobs:
                    await window.acquire()
                    lane.start_soon(run_job, jid, provider_id, window)

        async with trio.open_nursery() as nursery:
            for (pid, _slot), jobs in lanes.items():
                nursery.start_soon(run_lane, pid, jobs)
        placement = result.to_json()
        placement["assignments"] = len(result.assignments)
        self._summary.update({"offers": len(offers), "placement": placement, "batch": self.batch_id,
                              "resumed": bool(spec.resume), "already_settled": len(job_ids) - len(todo),
                              "excluded_by_reputation": self.excluded})
        self._outcomes = [outcomes[j] for j in job_ids]

    async def _spot_check(self, offers: list[Offer]) -> None:
        """Re-run a fraction of settled jobs on a different provider and compare outputs
        (Client.spot_check); the re-runs' outputs are kept under OUT/spot-checks."""
        spec = self.spec
        tally = {"checked": 0, "disputes": 0, "inconclusive": 0}
        for outcome in list(self._outcomes):
            if outcome.state != "settled" or not outcome.output_path or not chosen_for_check(
                    outcome.job_id, spec.spot_check):
                continue
            keep = partial(self._write_outputs, out_dir=spec.out_dir / "spot-checks")
            verdict = await self.client.spot_check(self._work(outcome.index), outcome,
                                                   load_outputs(Path(outcome.output_path)), offers, keep=keep,
                                                   tally=tally, atol=spec.atol, rtol=spec.rtol)
            if verdict is not None:
                outcome.spot_check = verdict
        self._summary["spot_checks"] = tally


def load_outputs(path: Path) -> list[np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return [data[k] for k in sorted(data.files)]
    return [np.load(path, allow_pickle=False)]
