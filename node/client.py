"""A warm buyer: one libp2p node, a live offer book, and the buyer's ledger and journal,
opened once and used for many jobs at a time.

Applications hold one open (`idlemesh.Client`, or `idlemesh.SyncClient` from threaded
code) and call `infer` per request; the gateway (node.gateway) is one such application;
`idlemesh submit` (node.buyer) runs its batches through one. Every job, whichever way
it came, goes through `Client.attempt`: one attempt of one job on one provider, driven
by the protocol's BuyerJob machine, with the journal written before the wire and the
ledger before the ack, so a crash anywhere leaves both parties able to agree.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import AsyncIterator, Callable

import numpy as np
import trio

from matcher import Weights
from protocol.errors import DecodeError
from protocol.job import BuyerJob, Delivered, JobAccepted, ModelSent, Refused, Rejected, share_problems
from protocol.messages import MAX_INPUTS, MAX_PARTS, MAX_REQUEST_BYTES, JobRequest, Offer, Receipt, SignedReceipt
from protocol.settlement import Dispute, sign_dispute
from protocol.stream import MAX_MODEL_BYTES, OfferWant
from protocol.tensors import MAX_TENSOR_BYTES, Tensor
from protocol.topics import JOB_PROTOCOL

from .admission import expected_ms
from .batching import (MAX_BATCH_ROWS, batches_pay, combine, group_deadline_ms, split, stack, stack_key,
                       wait_allowed_ms)
from .clock import SYSTEM_CLOCK, Clock
from .faults import fault_point
from .gossip import OfferGossip, bootstrap_peer_id
from .identity import load_key
from .journal import Journal
from .ledger import Ledger, LedgerError, LedgerWriter
from .modelio import InputMismatch, Signature, check_inputs, signature_of_model
from .net import OpenNetwork, StreamClosed
from .offers import OfferBook
from .p2p import open_p2p_node
from .placement import (BUSY_RETRIES, RETRY_PROVIDERS, NoPlacement, busy_wait_ms, known_backlog_ms, place_again,
                        place_one, remaining_deadline_ms, retry_offers)
from .reputation import own_digest, provider_scores
from .settle import settle_with

log = logging.getLogger("idlemesh.client")
MODEL_UPLOAD_TIMEOUT_S = 120.0
ACK_CONFIRM_TIMEOUT_S = 10.0  # for the provider's `settled`; without it the ack stays pending
CLOSE_DRAIN_S = 2.0  # on close, how long confirmations still on their way are waited for
JOB_TTL_MS = 10 * 60_000
# The matcher sees at most this many offers, the best ranked (good receipts with us, then
# held longest by the bootstrap): a swarm of fresh keys with irresistible offers costs a
# request some failed dials, never every candidate.
MAX_PLACEMENT_OFFERS = 64
SYNC_ATTEMPTS = 5    # per bootstrap, 0.1 s apart and doubling: about 3 s before "cannot reach"
EMPTY_BOOK_RETRIES_S = (0.5, 1.0, 2.0)  # waits before syncing again while every book is empty
# A warm client's book follows gossip; a sync this often also picks up what gossip missed
# (a mesh still forming, a bootstrap that restarted). Offers live 6-120 s.
REFRESH_S = 15.0
# How long a request may wait for others of its model to share a job (node.batching):
# only while others of its model are in flight, where an offer batches and its deadline
# leaves room. A gateway's concurrent requests fill a batch within this; requests one
# at a time never wait.
MICRO_BATCH_MS = 20.0
# Errors one attempt can end with; each fails the attempt (the next provider is tried),
# never the client.
ATTEMPT_ERRORS = (DecodeError, LedgerError, StreamClosed, trio.TooSlowError, OSError, ConnectionError)


class ClientError(Exception):
    """The request cannot go ahead; the message says why, in one line."""


class InputError(ClientError):
    """The inputs do not fit the model: found locally, before anything was sent."""


class ProviderBusy(ClientError):
    """The provider holds all the requests it will: full for now, not failing (see
    node.placement.BUSY_RETRIES). `backlog_ms`: the queue it told us of."""

    def __init__(self, message: str, backlog_ms: float | None):
        super().__init__(message)
        self.backlog_ms = backlog_ms


@dataclass(frozen=True)
class Model:
    """A model as the buyer sends it: its bytes, their hash, and its inputs and outputs."""

    name: str
    data: bytes = field(repr=False)
    sha256: str
    signature: Signature | None  # None only for bytes that are not ONNX (hostile tests)
    path: Path | None = None

    @classmethod
    def from_path(cls, path: Path | str, name: str | None = None, *, read_signature: bool = True) -> "Model":
        path = Path(path)
        try:
            if path.stat().st_size > MAX_MODEL_BYTES:
                raise ClientError(f"model {path}: {path.stat().st_size / 2**20:.0f} MiB; providers take models "
                                  f"up to {MAX_MODEL_BYTES >> 20} MiB")
            data = path.read_bytes()
        except OSError as exc:
            raise ClientError(f"model {path}: {exc.strerror or exc}") from None
        signature = None
        if read_signature:
            try:
                signature = signature_of_model(data)
            except InputMismatch as exc:
                raise ClientError(f"{path.name}: {exc}") from None
        return cls(name or path.stem, data, hashlib.sha256(data).hexdigest(), signature, path)

    @property
    def label(self) -> str:
        return self.path.name if self.path else self.name


@dataclass(frozen=True)
class Work:
    """What every attempt of one job sends: the model, the inputs and the terms."""

    model: Model
    tensors: tuple[Tensor, ...]
    items: int  # rows along the batch axis
    max_price: float
    timeout_s: float
    parts: tuple[int, ...] | None = None  # a micro-batch: each member's rows, in order

    @classmethod
    def prepare(cls, model: Model, inputs: dict[str, np.ndarray], *, max_price: float, timeout_s: float) -> "Work":
        """Checked here, in milliseconds, against the model's own graph: a wrong input
        never travels to a provider to be refused seconds later."""
        _check_sizes(model, inputs)
        try:
            tensors = tuple(Tensor.from_array(name, np.asarray(array)) for name, array in inputs.items())
        except DecodeError as exc:
            raise InputError(f"{model.label}: {exc}") from None
        if model.signature is None:
            items = max(1, tensors[0].shape[0] if tensors and tensors[0].shape else 1)
        else:
            try:
                items, _ = check_inputs(model.signature, {t.name: (t.dtype, t.shape) for t in tensors})
            except InputMismatch as exc:
                raise InputError(f"{model.label}: {exc}") from None
        return cls(model, tensors, items, max_price, timeout_s)


# What one job may carry (protocol.messages): checked here, so an input too big for a
# request frame is a local error, not a stream the provider drops.
REQUEST_SLACK_BYTES = 1 << 20  # the request's other fields and the envelope, with room to spare


def _check_sizes(model: Model, inputs: dict[str, np.ndarray]) -> None:
    if len(inputs) > MAX_INPUTS:
        raise InputError(f"{model.label}: {len(inputs)} inputs; a job carries at most {MAX_INPUTS}")
    total = 0
    for name, array in inputs.items():
        size = np.asarray(array).nbytes
        total += size
        if size > MAX_TENSOR_BYTES:
            raise InputError(f"{model.label}: input {name} is {size / 2**20:.1f} MiB; a job carries at most "
                             f"{MAX_TENSOR_BYTES >> 20} MiB per tensor: split it along the batch axis "
                             "(submit --rows-per-job)")
    if total > MAX_REQUEST_BYTES - REQUEST_SLACK_BYTES:
        raise InputError(f"{model.label}: inputs of {total / 2**20:.1f} MiB do not fit one job's "
                         f"{MAX_REQUEST_BYTES >> 20} MiB request: split them along the batch axis "
                         "(submit --rows-per-job)")


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
class Inference:
    """One request's answer: the outputs, and the receipt the provider signed and we
    countersigned (already verified: its hashes match what we sent and got). A request
    that went in a micro-batch (`share` is its index among the job's parts) holds the
    batch's receipt, whose entry `receipt.parts[share]` commits to its own inputs and
    outputs; its outcome's energy and price are its rows' share of the job's."""

    job_id: str
    outputs: dict[str, np.ndarray]
    receipt: Receipt
    receipt_envelope: bytes  # the signed receipt, as the ledger holds it
    outcome: JobOutcome
    share: int | None = None

    @property
    def provider(self) -> str:
        return self.outcome.provider

    def member(self, index: int, outputs: dict[str, np.ndarray]) -> "Inference":
        """Member `index`'s answer out of a micro-batched job's."""
        parts = self.receipt.parts
        fraction = parts[index].rows / sum(p.rows for p in parts)
        outcome = replace(self.outcome, energy_j=self.outcome.energy_j * fraction,
                          price=self.outcome.price * fraction, attempts=list(self.outcome.attempts))
        return Inference(self.job_id, outputs, self.receipt, self.receipt_envelope, outcome, index)

    def share_problems(self, inputs: dict[str, np.ndarray]) -> list[str]:
        """What is wrong with this answer as the share of the receipt it claims, checked
        from the request's own inputs and outputs alone ([] when it holds)."""
        return share_problems(self.receipt, self.share, _tensors(inputs), _tensors(self.outputs))

    def to_json(self) -> dict:
        """Everything but the outputs: what a script logs per request."""
        return {**self.outcome.to_json(), "outputs": {k: list(v.shape) for k, v in self.outputs.items()},
                "share": None if self.share is None else [self.share, len(self.receipt.parts)]}


def _tensors(arrays: dict[str, np.ndarray]) -> tuple[Tensor, ...]:
    return tuple(Tensor.from_array(name, array) for name, array in arrays.items())


@dataclass
class _Member:
    """A request waiting in a micro-batch; `done` once `result` or `error` is set."""

    work: Work
    deadline_ms: float | None
    submitted_s: float
    done: trio.Event = field(default_factory=trio.Event)
    result: Inference | None = None
    error: ClientError | None = None


@dataclass
class _Group:
    """Requests gathering for one job until `flush_at` (trio time) or until full."""

    flush_at: float
    members: list[_Member] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    @property
    def full(self) -> bool:
        return len(self.members) >= MAX_PARTS or sum(m.work.items for m in self.members) >= MAX_BATCH_ROWS


class Client:
    """A buyer kept open. Use as `async with Client(home, [bootstrap]) as client:` and
    `await client.infer(model_path, {"input": array})`; many `infer` calls may run at
    once. `clock` and `open_network` are what a MockClock test replaces."""

    def __init__(self, home: Path | str, bootstrap: list[str], *, max_price: float = 1.0, solver: str = "optimal",
                 weights: Weights | None = None, job_timeout_s: float = 120.0, min_reputation: float = 0.25,
                 listen: str = "/ip4/0.0.0.0/tcp/0", spot_check: float = 0.0, clock: Clock = SYSTEM_CLOCK,
                 open_network: OpenNetwork = open_p2p_node, time_scale: float = 1.0,
                 micro_batch_ms: float = MICRO_BATCH_MS):
        """`spot_check`: the fraction of requests run again on a second provider, after
        the answer is returned, and compared (Client.spot_check); a provider that
        disagrees with two others is disputed, and reputation then leaves it out.
        `time_scale` (devnet run): the simulated market's durations last this many times
        longer on the wall clock, so deadlines count wall time divided by it.
        `micro_batch_ms`: how long a request may wait for others of its model to go with
        it as one job (node.batching), only where an offer batches and its deadline
        leaves room; 0 sends every request alone."""
        if not bootstrap:
            raise ClientError("give at least one bootstrap address")
        for addr in bootstrap:
            try:
                bootstrap_peer_id(addr)
            except ValueError as exc:
                raise ClientError(f"bootstrap {exc}") from None
        self.home = Path(home)
        self.bootstrap = list(bootstrap)
        self.max_price, self.solver, self.weights = max_price, solver, weights
        self.job_timeout_s, self.min_reputation, self.listen = job_timeout_s, min_reputation, listen
        self.spot_check_fraction = spot_check
        self.time_scale = time_scale
        self.micro_batch_ms = micro_batch_ms
        self._gathering: dict[tuple, _Group] = {}  # micro-batches forming, by model and input shapes
        self._active_requests: dict[str, int] = {}  # model sha -> infer calls not yet answered
        self.batches = {"jobs": 0, "requests": 0}  # micro-batched jobs sent, and the requests they carried
        self.clock = clock
        self.open_network = open_network
        # Where blocking work runs (ledger commits, journal writes): a worker thread, one
        # call at a time (the journal's connection is not shared), so the trio loop keeps
        # serving streams.
        io_limiter = trio.CapacityLimiter(1)
        self.offload = lambda fn, *args: trio.to_thread.run_sync(fn, *args, limiter=io_limiter)
        # CPU work off the trio thread beside the journal's writes (signing a request).
        self.offload_cpu = trio.to_thread.run_sync
        self.seed, self.key = load_key(self.home)
        self.ledger = Ledger(self.home / "ledger.sqlite", self.key.public_key)  # reads, on the trio thread
        self.writer = LedgerWriter(self.home / "ledger.sqlite", self.key.public_key,
                                   offload=lambda fn, *args: self.offload(fn, *args))
        self.journal = Journal(self.home, any_thread=True)
        self._models: dict[str, Model] = {}  # by name and by path
        self.wanted: set[str] = set()  # model hashes whose offers the book asks for
        self.heard_backlog: dict[str, tuple[float, float]] = {}  # provider -> (its queue ms, when we heard)
        self.in_flight: dict[str, list[float]] = {}  # provider -> each of our jobs there: its compute ms
        self.unreachable: dict[str, str] = {}  # bootstrap address -> why, at the last sync
        self.late_acks = {"delivered": 0, "pending": 0, "disagreements": []}
        self.p2p = None
        self.gossip: OfferGossip | None = None
        self.book: OfferBook | None = None
        self._nursery: trio.Nursery | None = None
        self._confirming: set[trio.Event] = set()
        self._reputation: dict = {}  # our own receipts' verdicts per provider (_read_standing)
        self._settled_with: dict[str, int] = {}
        self._closed = False
        self.spot_checks = {"checked": 0, "disputes": 0, "inconclusive": 0}
        self._checking: set[trio.Event] = set()

    # --- models -----------------------------------------------------------------------

    def add_model(self, path: Path | str, name: str | None = None, *, read_signature: bool = True) -> Model:
        """Load a model once; later requests name it by `name` (default: the file's stem)
        or by its path."""
        model = Model.from_path(path, name, read_signature=read_signature)
        self._models[model.name] = model
        self._models[str(Path(path).resolve())] = model
        self.wanted.add(model.sha256)
        return model

    def model(self, model: Model | str | Path) -> Model:
        if isinstance(model, Model):
            return model
        found = self._models.get(str(model)) or self._models.get(str(Path(model).resolve()))
        if found is not None:
            return found
        if not Path(model).is_file():
            raise ClientError(f"unknown model {str(model)!r}: not a loaded model's name, and no such file")
        return self.add_model(model)

    def _label(self, model_sha: str) -> str:
        return next((m.label for m in self._models.values() if m.sha256 == model_sha), "?")

    # --- the session --------------------------------------------------------------------

    async def __aenter__(self) -> "Client":
        self._session = self.session()
        try:
            return await self._session.__aenter__()
        except BaseException:
            self.close()
            raise

    async def __aexit__(self, *exc_info) -> bool | None:
        try:
            return await self._session.__aexit__(*exc_info)
        finally:
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.ledger.close()
            self.writer.close()
            self.journal.close()

    def _want(self) -> OfferWant | None:
        # Only offers of our models, unless we owe some provider an ack (then every offer,
        # to find it) or know no model yet.
        if not self.wanted or self.ledger.pending_acks():
            return None
        return OfferWant(models=tuple(sorted(self.wanted)))

    @asynccontextmanager
    async def session(self, *, live: bool = True) -> AsyncIterator["Client"]:
        """The node, the offer book and the background work that keeps them current.
        `live`: follow gossip and sync now and again (a one-shot batch syncs once)."""
        standing = lambda pid: self._reputation.get(pid, {}).get("accepted", 0)  # noqa: E731
        self.book = OfferBook(wanted=lambda offer: any(offer.items_per_s(sha) for sha in self.wanted),
                              standing=standing)
        async with self.open_network(self.seed, [self.listen]) as p2p:
            self.p2p = p2p
            self.gossip = OfferGossip(p2p, self.book, clock=self.clock)
            self.gossip.own_digest = lambda: own_digest(self.key, self.ledger.reputation(), self.ledger.provider_keys(),
                                                        now_ms=self.clock.now_ms())
            await self.refresh(wait_for_offers=True)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if live:
                    await nursery.start(self.gossip.run)
                    nursery.start_soon(self._keep_fresh)
                    # A bootstrap that restarts is dialled again within seconds, and its
                    # book taken at once: gossip flows to us through it.
                    p2p.keep_connected(self.bootstrap, on_connect=self._resync)
                # Acks a provider never confirmed (we crashed, it did, a stream broke) go
                # first: settling old jobs never waits for new ones.
                await self.deliver_pending_acks()
                await self._close_interrupted_requests()
                try:
                    yield self
                    await self.drain(CLOSE_DRAIN_S)
                finally:
                    nursery.cancel_scope.cancel()
                    self._nursery = None

    async def drain(self, timeout_s: float = 60.0) -> None:
        """Until the work that goes on after answers (confirmations of our acks, spot
        checks) is done, or `timeout_s`. Closing waits CLOSE_DRAIN_S for it; what is left
        then is picked up later (a pending ack is delivered at the next meeting)."""
        with trio.move_on_after(timeout_s):
            while self._confirming or self._checking:
                await next(iter(self._confirming or self._checking)).wait()

    async def _close_interrupted_requests(self) -> None:
        """Requests this client was serving when it stopped: paid for (the ledger holds
        the receipt) they are settled; otherwise nothing was paid and they failed. Their
        applications asked and are gone; the ledger, not the journal, is what settles."""
        for row in await self.offload(self.journal.open_requests):
            if self.ledger.has(row.job_id):
                await self.offload(self.journal.settled, row.job_id, "", self.clock.now_ms())
            else:
                await self.offload(self.journal.failed, row.job_id, "the client stopped before this request was "
                                   "paid for; nothing was paid", self.clock.now_ms())

    async def refresh(self, *, wait_for_offers: bool = False) -> None:
        """Sync the offer book with every bootstrap. `wait_for_offers`: a bootstrap that
        has just restarted holds no offers until providers reconnect (a second or two),
        so ask again briefly before taking an empty book for an answer."""
        self._read_standing()
        want = self._want()
        self.unreachable = {}
        for addr in self.bootstrap:
            error = await self._sync(addr, want)
            if error:
                self.unreachable[addr] = error
        if not wait_for_offers:
            return
        for delay_s in EMPTY_BOOK_RETRIES_S:
            if self.book.current(now_ms=self.clock.now_ms()) or len(self.unreachable) == len(self.bootstrap):
                break
            await trio.sleep(delay_s)
            for addr in self.bootstrap:
                if addr not in self.unreachable:
                    await self._sync(addr, want)

    def _read_standing(self) -> None:
        """What our own ledger says of each provider (verdicts, and jobs settled with each
        peer, which weigh its digests): read at every refresh and after a dispute, not
        per request, since both aggregate every receipt we hold."""
        self._reputation = self.ledger.reputation()
        self._settled_with = self.ledger.settled_with()

    async def _sync(self, addr: str, want: OfferWant | None) -> str | None:
        """Take the bootstrap's offer book; None, or why it could not be reached."""
        # A peer that reconnects under the same id (a second `submit` from the same home)
        # can be refused while the remote still holds the old connection: retry briefly.
        delay_s = 0.1
        error = ""
        for attempt in range(SYNC_ATTEMPTS):
            try:
                await self.p2p.connect(bootstrap_peer_id(addr), [addr])
                await self.gossip.sync_with(bootstrap_peer_id(addr), want=want)
                return None
            except (StreamClosed, DecodeError, trio.TooSlowError) as exc:
                error = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc).rsplit(": ", 1)[-1]
                log.info("bootstrap %s (attempt %d): %s", addr, attempt + 1, exc)
                await trio.sleep(delay_s)
                delay_s *= 2
        log.warning("bootstrap %s unreachable after %d attempts: %s", addr, SYNC_ATTEMPTS, error)
        return error

    async def _resync(self, peer_id: str) -> None:
        for addr in self.bootstrap:
            if bootstrap_peer_id(addr) == peer_id and await self._sync(addr, self._want()) is None:
                self.unreachable.pop(addr, None)

    async def _keep_fresh(self) -> None:
        while True:
            await trio.sleep(REFRESH_S)
            await self.refresh()

    async def share_digest(self) -> None:
        """Our signed reputation digest rides on a last sync with each bootstrap."""
        for addr in self.bootstrap:
            with trio.move_on_after(5):
                try:
                    await self.gossip.sync_with(bootstrap_peer_id(addr))
                except (StreamClosed, DecodeError) as exc:
                    log.info("final sync with %s: %s", addr, exc)

    async def deliver_pending_acks(self, offers: list[Offer] | None = None) -> None:
        """Deliver every ack a provider in `offers` (default: the book) has not confirmed."""
        pending = self.ledger.pending_acks()
        if offers is None:
            offers = self.current_offers()
        for offer in offers:
            if offer.peer_id not in pending:
                continue
            report = await settle_with(self.p2p, self.ledger, self.writer, offer.peer_id, offer.addrs,
                                       clock=self.clock)
            self.late_acks["delivered"] += report.agreed
            self.late_acks["disagreements"] += report.disagreements
            if report.error:
                log.info("pending acks for %s stay pending: %s", offer.peer_id[-8:], report.error)
        self.late_acks["pending"] = sum(len(v) for v in self.ledger.pending_acks().values())

    # --- placement ----------------------------------------------------------------------

    def current_offers(self) -> list[Offer]:
        return [e.offer for e in self.book.current(now_ms=self.clock.now_ms())]

    def scores(self) -> dict[str, float]:
        return provider_scores(self._reputation, self.gossip.reputation, self.key.public_key, self._settled_with)

    def ranked(self, offers: list[Offer]) -> list[Offer]:
        """Best first: offers whose providers settled with us most, then those held longest."""
        def rank(offer: Offer) -> tuple:
            entry = self.book.entry(offer.peer_id)
            return (-self.book.standing(offer.peer_id), entry.first_seen_ms if entry else 0, offer.peer_id)
        return sorted(offers, key=rank)

    def candidates(self, model_sha: str) -> list[Offer]:
        """Offers that can run the model now, from providers we trust, best ranked first;
        raises ClientError saying why there are none."""
        current = self.current_offers()
        scores = self.scores()
        trusted = [o for o in current if scores.get(o.peer_id, 0.5) >= self.min_reputation]
        available = [o for o in trusted if o.available]
        able = [o for o in available if o.items_per_s(model_sha)]
        if able:
            return self.ranked(able)[:MAX_PLACEMENT_OFFERS]
        if len(self.unreachable) == len(self.bootstrap):
            raise ClientError("cannot reach " + "; ".join(f"bootstrap {a} ({e})" for a, e in self.unreachable.items()))
        if not current:
            raise ClientError(f"no offers at {', '.join(a for a in self.bootstrap if a not in self.unreachable)}: "
                              "the bootstrap is up but no provider is selling through it")
        if not trusted:
            raise ClientError(f"all {len(current)} providers score under the minimum reputation "
                              f"{self.min_reputation}")
        if not available:
            raise ClientError(f"all {len(trusted)} providers have withdrawn their capacity for now "
                              "(idle-only or carbon ceiling)")
        raise ClientError(f"no provider offers model {self._label(model_sha)} (sha256 {model_sha[:16]}...); "
                          f"{len(available)} offers seen")

    def _placeable(self, model_sha: str) -> list[Offer]:
        """The offers a request would be placed on (candidates), or none: what batching
        decides on, so an offer we would never use (untrusted, withdrawn) weighs nothing."""
        try:
            return self.candidates(model_sha)
        except ClientError:
            return []

    def since_ms(self, submitted_s: float) -> float:
        """Time since `submitted_s` (clock.elapsed_s()), in the market's ms."""
        return 1000 * (self.clock.elapsed_s() - submitted_s) / self.time_scale

    def own_backlog_ms(self, offers: list[Offer]) -> dict[str, float]:
        """The queue our jobs in flight add at each provider, and what providers told us
        of their queue since their offers were signed: the matcher sees load those
        offers cannot show yet."""
        slots = {pid: e.offer.slots for pid in self.in_flight if (e := self.book.entry(pid)) is not None}
        return known_backlog_ms(self.in_flight, slots, self.heard_backlog, offers, self.clock.now_ms(),
                                time_scale=self.time_scale)

    def _terms(self, work: Work, job_id: str, offers: list[Offer]) -> dict:
        """What placing `work` among `offers` takes besides the offers and the deadline."""
        return dict(model_sha=work.model.sha256, items=work.items, max_price=work.max_price, weights=self.weights,
                    solver=self.solver, job_id=job_id, own_backlog=self.own_backlog_ms(offers))

    def place(self, work: Work, job_id: str, offers: list[Offer], *, deadline_ms: float | None) -> Offer:
        """The matcher's choice for one job on the current state (offers, and our own
        jobs in flight)."""
        try:
            return place_one(offers, deadline_ms=deadline_ms, **self._terms(work, job_id, offers))
        except NoPlacement as exc:
            raise ClientError(str(exc)) from None

    async def wait_out_busy(self, peer_id: str) -> None:
        """Before a job goes back to a provider that answered busy: about as long as it
        said its queue takes (market time)."""
        await trio.sleep(busy_wait_ms(self.heard_backlog.get(peer_id, (0.0, 0.0))[0]) * self.time_scale / 1000)

    def place_again(self, work: Work, job_id: str, offers: list[Offer], *, tried: set[str],
                    vanished: set[str] = frozenset(), busy: set[str] = frozenset(),
                    deadline_left_ms: float | None) -> tuple[Offer, bool]:
        """Where a failed job goes next, and whether its deadline still goes with it
        (node.placement.place_again; `offers` best established first)."""
        try:
            return place_again(offers, tried=tried, vanished=vanished, busy=busy, deadline_left_ms=deadline_left_ms,
                               **self._terms(work, job_id, offers))
        except NoPlacement as exc:
            raise ClientError(str(exc)) from None

    # --- requests -----------------------------------------------------------------------

    async def infer(self, model: Model | str | Path, inputs: dict[str, np.ndarray], *,
                    deadline_ms: float | None = None, max_price: float | None = None,
                    timeout_s: float | None = None) -> Inference:
        """Run one job on the market and return its outputs with the verified receipt.
        A wrong input raises InputError before anything is sent; a provider that fails
        or vanishes is replaced by the next placement (up to RETRY_PROVIDERS)."""
        if self._nursery is None:
            raise ClientError("the client is not open (use `async with Client(...)`)")
        wanted_before = set(self.wanted)
        found = self.model(model)
        work = Work.prepare(found, inputs, max_price=self.max_price if max_price is None else max_price,
                            timeout_s=timeout_s or self.job_timeout_s)
        if found.sha256 not in wanted_before:
            await self.refresh()  # the bootstraps' offers of a model we had not asked for
        active = self._active_requests
        active[found.sha256] = active.get(found.sha256, 0) + 1
        try:
            # Company is worth waiting for only while others of the model are in flight:
            # a request on its own goes at once.
            if self.micro_batch_ms > 0 and active[found.sha256] > 1 and _stackable(found):
                offers = self._placeable(found.sha256)
                if batches_pay(offers, found.sha256):
                    wait_ms = wait_allowed_ms(self.micro_batch_ms, deadline_ms, offers, found.sha256, work.items)
                    if wait_ms > 0:
                        return await self._join_batch(work, deadline_ms, wait_ms)
            return await self._run_work(work, deadline_ms, self.clock.elapsed_s())
        finally:
            active[found.sha256] -= 1
            if not active[found.sha256]:
                del active[found.sha256]

    async def _run_work(self, work: Work, deadline_ms: float | None, submitted_s: float) -> Inference:
        """One job on the market, placed and re-placed (up to RETRY_PROVIDERS)."""
        found = work.model
        job_id = secrets.token_hex(16)
        new_request = partial(self.journal.new_request, job_id, model=found.label, model_sha256=found.sha256,
                              max_price=work.max_price, now_ms=self.clock.now_ms())
        outcome = JobOutcome(job_id, 0)
        kept: dict[str, np.ndarray] = {}

        def keep(outputs) -> str:
            kept.update({t.name: t.to_array() for t in outputs})
            return ""

        tried: set[str] = set()
        busy: set[str] = set()  # answered busy last time: elsewhere first, else back after a wait
        busy_answers = 0
        try:
            try:
                self.candidates(found.sha256)
            except ClientError:
                # Nothing current in the book (a bootstrap restarted, gossip lagged): ask
                # again before saying no; a request never fails on a stale book alone.
                await self.refresh(wait_for_offers=True)
            while len(tried) < RETRY_PROVIDERS:
                offers = self.candidates(found.sha256)
                if not retry_offers(offers, tried):
                    break
                in_time = True
                if not tried and not busy:
                    offer = self.place(work, job_id, offers, deadline_ms=deadline_ms)
                else:
                    left_ms = remaining_deadline_ms(deadline_ms, self.since_ms(submitted_s), 0.0)
                    offer, in_time = self.place_again(work, job_id, offers, tried=tried, busy=busy,
                                                      deadline_left_ms=left_ms)
                    if offer.peer_id in busy:  # nobody else can take it: back once the queue there drains
                        await self.wait_out_busy(offer.peer_id)
                busy.clear()
                tried.add(offer.peer_id)
                try:
                    receipt, envelope = await self._nursery.start(partial(
                        self.attempt, work, outcome, offer, keep=keep, new_request=new_request,
                        deadline_ms=deadline_ms if in_time else None, submitted_s=submitted_s))
                except ProviderBusy as exc:
                    outcome.error = f"{type(exc).__name__}: {exc}"
                    if busy_answers < BUSY_RETRIES:
                        busy_answers += 1
                        tried.discard(offer.peer_id)
                        busy.add(offer.peer_id)
                    continue
                except (ClientError, *ATTEMPT_ERRORS) as exc:
                    outcome.error = f"{type(exc).__name__}: {exc}"
                    log.warning("job %s on %s: %s", job_id[:8], offer.peer_id[-8:], outcome.error)
                    continue
                finally:
                    if outcome.attempts:
                        new_request = None  # journalled by the first attempt
                if chosen_for_check(job_id, self.spot_check_fraction):
                    self._nursery.start_soon(self._check_aside, work, outcome, dict(kept))
                return Inference(job_id, kept, receipt, envelope, outcome)
        except ClientError as exc:
            outcome.error = outcome.error or str(exc)
        outcome.state = "failed"
        if outcome.attempts:
            await self.offload(self.journal.failed, job_id, outcome.error, self.clock.now_ms())
        raise ClientError(f"job {job_id[:8]} failed after {len(tried)} provider(s): {outcome.error}")

    async def _join_batch(self, work: Work, deadline_ms: float | None, wait_ms: float) -> Inference:
        """Wait up to `wait_ms` (market time) for requests to go with this one."""
        key = (work.model.sha256, stack_key(work.tensors))
        member = _Member(work, deadline_ms, self.clock.elapsed_s())
        flush_at = trio.current_time() + wait_ms * self.time_scale / 1000
        group = self._gathering.get(key)
        if group is None or group.full:
            group = self._gathering[key] = _Group(flush_at)
            self._nursery.start_soon(self._gather, key, group)
        group.members.append(member)
        group.flush_at = min(group.flush_at, flush_at)
        group.changed.set()
        await member.done.wait()
        if member.error is not None:
            raise member.error
        return member.result

    async def _gather(self, key: tuple, group: _Group) -> None:
        while not group.full:
            with trio.move_on_at(group.flush_at) as waited:
                await group.changed.wait()
            if waited.cancelled_caught:
                break
            group.changed = trio.Event()
        if self._gathering.get(key) is group:
            del self._gathering[key]
        try:
            await self._run_group(group.members)
        except Exception as exc:  # noqa: BLE001 - each member's caller hears it; the client goes on
            log.warning("micro-batch of %d requests failed: %s", len(group.members), exc)
            for m in group.members:
                if not m.done.is_set():
                    m.error = exc if isinstance(exc, ClientError) else ClientError(f"{type(exc).__name__}: {exc}")
                    m.done.set()

    async def _run_group(self, members: list[_Member]) -> None:
        """As one job when that lowers the energy per item (node.batching.combine), else
        each alone; a batch that fails sends its members alone."""
        model = members[0].work.model
        rows = [m.work.items for m in members]
        if combine(rows, self._placeable(model.sha256), model.sha256):
            parts = tuple(rows)
            start_s = min(m.submitted_s for m in members)
            # Counted from the first member's submission, as _run_work counts it: what has
            # passed since is taken off there, once.
            deadline_ms = group_deadline_ms([(m.deadline_ms, m.submitted_s) for m in members], start_s,
                                            self.time_scale)
            together = Work(model, stack([m.work.tensors for m in members]), sum(rows),
                            sum(m.work.max_price for m in members), max(m.work.timeout_s for m in members), parts)
            try:
                answer = await self._run_work(together, deadline_ms, start_s)
            except ClientError as exc:
                log.info("micro-batch of %d requests failed (%s); each goes alone", len(members), exc)
            else:
                self.batches["jobs"] += 1
                self.batches["requests"] += len(members)
                for index, (m, outputs) in enumerate(zip(members, split(answer.outputs, parts))):
                    m.result = answer.member(index, outputs)
                    m.done.set()
                return
        async with trio.open_nursery() as alone:
            for m in members:
                alone.start_soon(self._run_member, m)

    async def _run_member(self, member: _Member) -> None:
        try:
            member.result = await self._run_work(member.work, member.deadline_ms, member.submitted_s)
        except ClientError as exc:
            member.error = exc
        finally:
            member.done.set()

    async def attempt(self, work: Work, outcome: JobOutcome, offer: Offer, *, keep: Callable[[tuple], str],
                      new_request: Callable[[], None] | None = None, deadline_ms: float | None = None,
                      submitted_s: float | None = None, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """One attempt of one job on one provider, driven by the protocol's BuyerJob
        machine. A provider that breaks the protocol fails this attempt (DecodeError),
        never the caller. `keep(outputs)` stores the outputs (a file, or memory) and
        returns their path; it runs before the ledger, so a paid job's outputs exist.
        `new_request`: journals the job first (a warm client's first attempt).
        `deadline_ms`, counted from `submitted_s` (clock.elapsed_s()): what is left of it
        goes in the request, and a provider that cannot finish in time refuses at once.
        Once the
        job is paid for and our ack sent, `task_status.started((receipt, envelope))`
        lets the caller go on while this journals it settled and waits for the
        provider's confirmation."""
        issued_ms = self.clock.now_ms()
        elapsed_ms = 0.0 if submitted_s is None else self.since_ms(submitted_s)
        request = JobRequest(
            job_id=outcome.job_id, buyer=self.key.public_key, provider=offer.provider,
            model_sha256=work.model.sha256, model_name=work.model.name[:128], inputs=work.tensors,
            items=work.items, max_price=work.max_price, issued_at_ms=issued_ms,
            expires_at_ms=issued_ms + JOB_TTL_MS, timeout_ms=int(work.timeout_s * 1000),
            deadline_ms=remaining_deadline_ms(deadline_ms, elapsed_ms, offer.link_rtt_ms), parts=work.parts)
        job = BuyerJob.create(self.key, request, work.model.data)
        started = self.clock.elapsed_s()
        outcome.provider = offer.peer_id
        outcome.attempts.append(offer.peer_id)
        outcome.state = job.state
        estimate_ms = expected_ms(work.items, offer.items_per_s(work.model.sha256, work.items) or 1.0)
        load = self.in_flight.setdefault(offer.peer_id, [])
        load.append(estimate_ms)
        paid = False
        done = trio.Event()
        self._confirming.add(done)
        prepared: dict = {}
        ready = trio.Event()

        def journal_sent():
            if new_request is not None:
                new_request(sent_to=offer.peer_id)
            else:
                self.journal.sent(outcome.job_id, offer.peer_id, self.clock.now_ms())

        async def sign() -> None:
            prepared["step"] = await self.offload_cpu(job.start)

        async def prepare_aside() -> None:
            # Off the trio thread, while the stream opens: signing the request hashes
            # every input byte, and the journal's row must be durable before the request
            # goes on the wire; neither needs the other, so they run side by side. (Both
            # run to their end even if the stream cannot be opened: a row then says
            # `requested` of a request never sent.)
            try:
                async with trio.open_nursery() as both:
                    both.start_soon(sign)
                    await self.offload(journal_sent)
            except ExceptionGroup as group:  # handed to the attempt, raised there (a cancellation is not)
                prepared["error"] = group.exceptions[0]
            finally:
                ready.set()

        try:
            with trio.fail_after(work.timeout_s + 30):
                self._nursery.start_soon(prepare_aside)
                async with self.p2p.open_stream(offer.peer_id, offer.addrs, JOB_PROTOCOL) as stream:
                    await ready.wait()
                    if "error" in prepared:
                        raise prepared["error"]
                    step = prepared["step"]
                    while True:
                        outcome.state = job.state
                        event = step.events[0] if step.events else None
                        if isinstance(event, (JobAccepted, Refused)) and event.backlog_ms is not None:
                            self.heard_backlog[offer.peer_id] = (event.backlog_ms, self.clock.now_ms())
                        if isinstance(event, (Delivered, Rejected, Refused)):
                            break  # its ack goes only once our decision is durable, below
                        if isinstance(event, ModelSent):
                            fault_point("buyer-model-upload")
                        for payload in step.send:
                            await stream.send(payload, timeout_s=MODEL_UPLOAD_TIMEOUT_S)
                        try:
                            payload = await stream.receive(max_bytes=job.max_frame_bytes, timeout_s=work.timeout_s)
                        except trio.TooSlowError:
                            job.expire()
                            outcome.state = job.state
                            raise
                        step = job.receive(payload, now_ms=self.clock.now_ms())
                    if isinstance(event, Refused):
                        message = f"provider {offer.peer_id[-8:]} refused: {event.code}: {event.message}"
                        if event.code == "busy":
                            raise ProviderBusy(message, event.backlog_ms)
                        raise ClientError(message)
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
                    outcome.output_path = keep(event.outputs)
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
                    await self._settled(outcome, offer, event.receipt, started, task_status)
                    with trio.move_on_after(ACK_CONFIRM_TIMEOUT_S):
                        try:
                            await self._confirmation(stream, job)
                        except LedgerError as exc:  # the caller has gone on: this must not raise
                            log.warning("job %s: confirmation not recorded: %s", outcome.job_id[:8], exc)
        except (StreamClosed, trio.TooSlowError, OSError) as exc:
            if not paid:
                raise
            # Paid and durable on our side: the job is settled here whatever became of
            # the ack (the provider keeps its receipt unacked until it hears again).
            log.info("job %s: settled; the ack did not reach %s: %s", outcome.job_id[:8], offer.peer_id[-8:], exc)
            if job.state == "delivered":
                job.settle()
            if outcome.state != "settled":
                await self._settled(outcome, offer, event.receipt, started, task_status)
        finally:
            load.remove(estimate_ms)
            if not load:
                self.in_flight.pop(offer.peer_id, None)
            done.set()
            self._confirming.discard(done)

    async def _settled(self, outcome: JobOutcome, offer: Offer, signed, started_s: float, task_status) -> None:
        latency_ms = (self.clock.elapsed_s() - started_s) * 1000
        receipt = signed.receipt
        outcome.state = "settled"
        outcome.latency_ms = latency_ms
        outcome.compute_ms = receipt.compute_ms
        # Only comparable for real devices: a simulated one reports profile time, not wall time.
        outcome.overhead_ms = latency_ms - receipt.compute_ms
        outcome.energy_j = receipt.energy_j
        outcome.device_latency_ms = latency_ms if receipt.energy_source != "simulated" else \
            (offer.link_rtt_ms or 0.0) + receipt.queue_ms + receipt.compute_ms
        outcome.energy_source = receipt.energy_source
        outcome.price = receipt.price
        task_status.started((receipt, signed.envelope_bytes))
        # The ledger already holds the payment; the journal row follows off the caller's path.
        await self.offload(self.journal.settled, outcome.job_id, outcome.output_path, self.clock.now_ms())

    # --- spot checks --------------------------------------------------------------------

    async def spot_check(self, work: Work, outcome: JobOutcome, outputs: list[np.ndarray], offers: list[Offer], *,
                         keep: Callable | None = None, tally: dict | None = None, atol: float = 1e-4,
                         rtol: float = 1e-3) -> dict | None:
        """Run the settled job `outcome` again on another provider and compare outputs. On
        a mismatch a third provider breaks the tie, and the one that disagrees with the
        other two gets a signed dispute; with no third provider the mismatch is reported
        as inconclusive, never pinned on anyone. `keep(outcome, tensors)` stores each
        re-run's outputs (files for submit); None when no other provider could run it."""
        tally = self.spot_checks if tally is None else tally
        others = [o for o in offers if o.peer_id != outcome.provider]
        check = await self._rerun(work, outcome, others, keep)
        if check is None:
            return None
        tally["checked"] += 1
        checked, check_outputs = check
        diff, agree = compare_outputs(outputs, check_outputs, atol, rtol)
        verdict = {"by": checked.provider, "max_abs_diff": diff, "agree": agree}
        if agree:
            return verdict
        third = await self._rerun(work, outcome, [o for o in others if o.peer_id != checked.provider], keep)
        if third is None:
            tally["inconclusive"] += 1
            return {**verdict, "verdict": "inconclusive: no third provider to break the tie"}
        witness, third_outputs = third
        _, original_ok = compare_outputs(outputs, third_outputs, atol, rtol)
        _, check_ok = compare_outputs(check_outputs, third_outputs, atol, rtol)
        if original_ok == check_ok:
            tally["inconclusive"] += 1
            return {**verdict, "verdict": "inconclusive: the tie-break agrees with both or neither"}
        outlier = checked if original_ok else outcome
        tally["disputes"] += 1
        self._dispute(outlier, witness, diff, atol)
        log.warning("job %s: provider %s disagrees with two others (by up to %.3g): disputed",
                    outcome.job_id[:8], outlier.provider[-8:], diff)
        return {**verdict, "verdict": f"disputed {outlier.provider}"}

    async def _check_aside(self, work: Work, outcome: JobOutcome, outputs: dict[str, np.ndarray]) -> None:
        """A warm client's spot check, after the caller has its answer: never raises."""
        ordered = [outputs[name] for name in sorted(outputs, key=output_key)]
        done = trio.Event()
        self._checking.add(done)
        try:
            await self.spot_check(work, outcome, ordered, self.candidates(work.model.sha256))
        except (ClientError, LedgerError) as exc:
            log.info("spot check of %s not done: %s", outcome.job_id[:8], exc)
        finally:
            self._checking.discard(done)
            done.set()

    async def _rerun(self, work: Work, outcome: JobOutcome, candidates: list[Offer],
                     keep: Callable | None) -> tuple[JobOutcome, list[np.ndarray]] | None:
        for offer in candidates[:2]:
            rerun = JobOutcome(secrets.token_hex(16), outcome.index)
            arrays: list[np.ndarray] = []

            def kept(tensors, rerun=rerun, arrays=arrays) -> str:
                arrays[:] = [t.to_array() for t in sorted(tensors, key=lambda t: output_key(t.name))]
                return keep(rerun, tensors) if keep else ""

            try:
                await self.attempt(work, rerun, offer, keep=kept)
                return rerun, arrays
            except (ClientError, *ATTEMPT_ERRORS) as exc:
                log.warning("spot check of %s on %s failed: %s", outcome.job_id[:8], offer.peer_id[-8:], exc)
        return None

    def _dispute(self, outlier: JobOutcome, witness: JobOutcome, diff: float, atol: float) -> None:
        bad = SignedReceipt.parse(self.ledger.receipt_bytes(outlier.job_id)[0])
        good = SignedReceipt.parse(self.ledger.receipt_bytes(witness.job_id)[0])
        dispute = Dispute(outlier.job_id, bad.receipt.provider, bad.body_sha256, good.receipt.provider,
                          good.body_sha256, diff, atol, self.clock.now_ms())
        self.ledger.record_dispute(sign_dispute(self.key, dispute), dispute, now_ms=self.clock.now_ms())
        self._read_standing()  # the disputed provider is scored down from the next request on

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


def _stackable(model: Model) -> bool:
    """Whether requests for the model can be stacked along a batch axis: every input and
    output has a leading axis (the provider checks the outputs again)."""
    signature = model.signature
    return signature is not None and all(p.shape for p in (*signature.inputs, *signature.outputs))


def output_key(name: str) -> str:
    """An output's name as a file key (submit writes outputs under it), and so the order
    in which spot checks compare a job's outputs: every side must sort by this."""
    return name.replace("/", "_")


def chosen_for_check(job_id: str, fraction: float) -> bool:
    """Which jobs are spot-checked: a hash of the job id, so the choice is reproducible
    and not something a provider can predict."""
    return int(hashlib.sha256(bytes.fromhex(job_id)).hexdigest()[:8], 16) / 2**32 < fraction


def compare_outputs(left: list[np.ndarray], right: list[np.ndarray], atol: float, rtol: float) -> tuple[float, bool]:
    """The largest difference, and whether every output agrees within |a-b| <= atol + rtol*|b|."""
    if len(left) != len(right) or any(x.shape != y.shape for x, y in zip(left, right)):
        return float("inf"), False
    diff = max((float(np.max(np.abs(x.astype(np.float64) - y))) if x.size else 0.0) for x, y in zip(left, right))
    agree = all(np.allclose(x, y, atol=atol, rtol=rtol) for x, y in zip(left, right))
    return diff, agree


class SyncClient:
    """The warm client for threaded code: the Client runs in a trio loop on a thread of
    its own; `infer` may be called from many threads at once. Use as a context manager,
    or call close()."""

    def __init__(self, home: Path | str, bootstrap: list[str], **options):
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._client: Client | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main, home, bootstrap, options),
                                        name="idlemesh-client", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise self._failure

    async def _main(self, home, bootstrap, options) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        try:
            # Built on this thread: its SQLite connections belong to the trio loop's thread.
            async with Client(home, bootstrap, **options) as client:
                self._client = client
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor's caller
            self._failure = exc
        finally:
            self._ready.set()

    def add_model(self, path: Path | str, name: str | None = None) -> Model:
        return trio.from_thread.run_sync(self._client.add_model, path, name, trio_token=self._token)

    def infer(self, model: Model | str | Path, inputs: dict[str, np.ndarray], **terms) -> Inference:
        """As Client.infer; blocks this thread until the answer (or ClientError)."""
        if self._client is None or self._stop.is_set():
            raise ClientError("the client is closed")
        return trio.from_thread.run(partial(self._client.infer, model, inputs, **terms), trio_token=self._token)

    def close(self) -> None:
        if self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join()

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


__all__ = ["SyncClient", "Client", "ClientError", "InputError", "Inference", "JobOutcome", "Model", "Work"]
