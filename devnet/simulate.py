"""`idlemesh devnet simulate SCENARIO`: the scenario's trace on its fleet as a
discrete-event run in virtual time, once per solver. Deterministic: the same files give
the same report, on any machine under any load, in seconds for thousands of jobs. This
is where the energy comparison between solvers is judged.

What runs here is the real nodes' decision code, not a copy of it:
- buyers place with node.placement (the matcher, their own jobs in flight, the same
  re-placement rules and deadline arithmetic as `submit`'s batches);
- providers queue, admit, refuse late jobs and republish their offer with
  node.admission, as the provider daemon does;
- offers are protocol.messages.Offer, read by the same offers_to_problem.

The `central` solver is not a buyer's: one matcher places the jobs of every buyer that
arrive at the same instant together, with each provider's true queue (its jobs waiting
and running, and every job on its way to it) and only providers that are alive, and
places failed jobs again the same way. It is the best coordination possible, the yardstick
for many buyers each running their own matcher on gossiped offers.

What is modelled, not run: a job takes exactly its items at the device's rate (the
fleet's published resnet50 rate times the model's speed relative to resnet50); a link
adds its one-way delay each way; a killed provider resets its streams at once and stops
refreshing its offer (buyers still see it until it expires); a restarted one is away
RESTART_AWAY_MS and loses its queue; a paused one holds everything until it resumes.
Energy is compute time times the device's marginal watts per slot, as a simulated
provider's receipt says. Every figure is labelled `simulated`.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable


from matcher import Job, Problem, solve
from node.admission import REPUBLISH_MIN_INTERVAL_S, ByteBudget, DeviceQueue, expected_ms, worth_republishing
from node.config import ProviderConfig
from node.calibrate import model_name
from node.placement import (BUSY_RETRIES, RETRY_PROVIDERS, NoPlacement, busy_wait_ms, buyer_weights,
                            known_backlog_ms, lane_window, offers_to_problem, place_again, remaining_deadline_ms,
                            retry_offers)
from protocol.messages import Device, ModelCapability, Offer, PowerProfile

from .fleet import Fleet, Member, capability
from .run import JobRecord, SolverRun, job_timeout_s
from .scenario import CENTRAL, Scenario, input_bytes_per_item

OFFER_TTL_MS = 60_000           # the provider's default offer_ttl_s
REFRESH_MS = OFFER_TTL_MS / 3   # refreshed every third of it (node/provider.py REFRESHES_PER_TTL)
RESTART_AWAY_MS = 3_000         # a restarted provider: down, then back with an empty queue
# A provider holds this many bytes of requests at once and answers `busy` beyond them
# (the daemon's request_budget_mb default; node.admission.ByteBudget).
REQUEST_BUDGET_BYTES = int(ProviderConfig(home=Path(".")).request_budget_mb * (1 << 20))
SIMULATED = "simulated"


@dataclass
class _Attempt:
    job: "_Job"
    provider: "_Provider"
    expected_ms: float
    sent_ms: float
    then: Callable[[], None] | None  # the lane's next job, once this one ends
    vanished: set[str]               # providers its buyer saw vanish (shared by the arrival's lanes)
    offers: list[Offer]              # what its buyer placed on
    done: bool = False               # the buyer has heard the end of it (or gave up on it)
    computed_ms: float | None = None
    request_bytes: int = 0
    arrived: bool = False            # its request reached the provider


@dataclass
class _Job:
    arrival: int
    job_id: str
    items: int
    model_sha: str
    model_name: str
    deadline_ms: float | None
    submitted_ms: float
    tried: set[str] = field(default_factory=set)
    attempts: list[str] = field(default_factory=list)
    record: JobRecord | None = None
    error: str = ""
    wasted_energy_j: float = 0.0  # spent on attempts that were not paid for
    busy_answers: int = 0
    in_time: bool = True          # False once re-placed as late: its requests carry no deadline


@dataclass
class _Provider:
    index: int
    peer_id: str
    member: Member
    capabilities: dict[str, ModelCapability]  # per model sha: what the device advertises
    queue: DeviceQueue
    budget: ByteBudget = field(default_factory=lambda: ByteBudget(REQUEST_BUDGET_BYTES))
    alive: bool = True
    paused_until_ms: float = 0.0
    running: dict[str, _Attempt] = field(default_factory=dict)   # job id -> attempt, computing
    waiting: list[_Attempt] = field(default_factory=list)        # admitted, waiting for a slot
    offer: Offer | None = None
    published_ms: float = -1e18
    epoch: int = 0                                               # bumps on kill/restart: stale events drop

    @property
    def rtt_ms(self) -> float:
        return 2 * self.member.link_ms


class Simulation:
    def __init__(self, scenario: Scenario, fleet: Fleet, solver: str, *, peer_ids: list[str] | None = None):
        """`peer_ids`: the providers' ids, by index (a `devnet run`'s, so that ties the
        matcher breaks by id break the same way); default sim-000, sim-001, ..."""
        self.scenario = scenario
        self.central = solver == CENTRAL
        self.solver = "optimal" if self.central else solver
        self.in_transit: dict[str, dict[str, float]] = {}  # provider -> job id -> expected ms, sent, not yet there
        self.transit_bytes: dict[str, int] = {}  # central: provider -> request bytes sent, not yet there
        self.gate: dict[str, list[tuple]] = {}   # central: provider -> sends held until its budget has room
        self._placed_at: float | None = None  # central: the instant whose arrivals were placed together
        self.now = 0.0
        self._events: list = []
        self._seq = itertools.count()
        self.run = SolverRun(solver)
        self.models = {}
        self.row_bytes = {}  # per model: one item's input bytes, for the lanes' window
        for path in scenario.models:
            self.models[path] = (hashlib.sha256(Path(path).read_bytes()).hexdigest(), model_name(Path(path)))
            self.row_bytes[path] = sum(input_bytes_per_item(Path(path)))
        self.row_bytes_by_sha = {self.models[path][0]: b for path, b in self.row_bytes.items()}
        self.providers = []
        for i, member in enumerate(fleet.pick(scenario.providers)):
            capabilities = {sha: capability(fleet, member.device, name, sha) for sha, name in self.models.values()}
            peer_id = peer_ids[i] if peer_ids else f"sim-{i:03d}"
            self.providers.append(_Provider(i, peer_id, member, capabilities, DeviceQueue(member.device.slots)))
        self.by_id = {p.peer_id: p for p in self.providers}
        self.in_flight: dict[int, dict[str, list[float]]] = {}  # per arrival (one buyer each): provider -> ms
        self.heard: dict[int, dict[str, tuple[float, float]]] = {}  # per arrival: provider -> (queue ms, when)
        self.jobs: list[_Job] = []

    # --- the event loop ---------------------------------------------------------------

    def at(self, when_ms: float, action: Callable, *args) -> None:
        heapq.heappush(self._events, (when_ms, next(self._seq), action, args))

    def go(self) -> SolverRun:
        for p in self.providers:
            self.publish(p)
            self.at(REFRESH_MS, self.refresh, p, p.epoch)
        for index, arrival in enumerate(self.scenario.arrivals):
            self.at(1000 * arrival.at_s, self.arrive, index)
        for fault in self.scenario.faults:
            self.at(1000 * fault.at_s, self.fault, fault)
        end_ms = 1000 * max([a.at_s for a in self.scenario.arrivals] + [f.at_s + f.duration_s
                                                                         for f in self.scenario.faults])
        while self._events:
            when, _, action, args = heapq.heappop(self._events)
            self.now = when
            if action == self.refresh and self.now > end_ms + OFFER_TTL_MS:
                continue  # the trace is over: refreshes alone would run for ever
            action(*args)
        self.run.wall_s = self.now / 1000  # virtual seconds until the last event
        for job in self.jobs:
            self.run.jobs.append(job.record)
        return self.run

    # --- providers --------------------------------------------------------------------

    def publish(self, p: _Provider) -> None:
        d = p.member.device
        backlog = p.queue.wait_ms(self.now)
        p.offer = Offer(
            provider=bytes(32), peer_id=p.peer_id, addrs=(), device=Device(d.arch, d.name, d.memory_mb),
            slots=d.slots, models=tuple(p.capabilities[sha] for sha, _ in self.models.values()),
            power=PowerProfile(d.idle_w, d.busy_w, d.marginal_w_per_slot, SIMULATED, SIMULATED, SIMULATED),
            carbon_g_per_kwh=p.member.region.carbon_g_per_kwh, carbon_source=SIMULATED,
            price_per_s=d.price_per_s, backlog_ms=backlog, issued_at_ms=int(self.now),
            expires_at_ms=int(self.now + OFFER_TTL_MS), link_rtt_ms=p.rtt_ms or None)
        p.published_ms = self.now

    def refresh(self, p: _Provider, epoch: int) -> None:
        if p.alive and epoch == p.epoch and self.now >= p.paused_until_ms:
            self.publish(p)
        if epoch == p.epoch:
            self.at(self.now + REFRESH_MS, self.refresh, p, epoch)

    def queue_moved(self, p: _Provider) -> None:
        """As Provider._follow_queue: republish when the backlog moved enough, at most
        once per REPUBLISH_MIN_INTERVAL_S (a later change waits for the interval)."""
        if not p.alive or not worth_republishing(p.offer.backlog_ms, p.queue.wait_ms(self.now)):
            return
        ready = p.published_ms + 1000 * REPUBLISH_MIN_INTERVAL_S
        if self.now >= ready:
            self.publish(p)
        else:
            self.at(ready, self._republish_later, p, p.epoch)

    def _republish_later(self, p: _Provider, epoch: int) -> None:
        if epoch == p.epoch and p.alive and worth_republishing(p.offer.backlog_ms, p.queue.wait_ms(self.now)) \
                and self.now >= p.published_ms + 1000 * REPUBLISH_MIN_INTERVAL_S:
            self.publish(p)

    def receive(self, attempt: _Attempt, epoch: int) -> None:
        """A request reaches its provider."""
        p, job = attempt.provider, attempt.job
        self.in_transit.get(p.peer_id, {}).pop(job.job_id, None)
        if not attempt.arrived:
            attempt.arrived = True
            self.transit_bytes[p.peer_id] -= attempt.request_bytes
        if attempt.done:
            return  # the buyer gave up and closed the stream before it was read
        if not p.alive or epoch != p.epoch:
            return self.fail(attempt, "StreamClosed: the provider is gone", vanished=True, delay_ms=p.rtt_ms / 2)
        if self.now < p.paused_until_ms:
            return self.at(p.paused_until_ms, self.receive, attempt, epoch)  # held in its socket buffers
        left = remaining_deadline_ms(job.deadline_ms, self.now - job.submitted_ms, p.rtt_ms / 2) \
            if job.in_time else None
        ahead = p.queue.wait_ms(self.now)
        # `accepted` and refusals tell the buyer the queue (Client.heard_backlog); a
        # refused job left it as it was.
        self.at(self.now + p.rtt_ms / 2, self.hear, job.arrival, p.peer_id, ahead)
        if not p.budget.take(attempt.request_bytes):  # held from the moment its frame is read
            return self.fail(attempt, f"ClientError: provider {p.peer_id} refused: busy: {attempt.request_bytes} "
                             f"bytes do not fit in its {p.budget.capacity >> 20} MiB of requests",
                             delay_ms=p.rtt_ms / 2, busy_backlog_ms=ahead)
        late = p.queue.admit(job.job_id, attempt.expected_ms, self.now, deadline_ms=left)
        if late:
            self.release(p, attempt.request_bytes, p.epoch)
            return self.fail(attempt, f"ClientError: provider {p.peer_id} refused: deadline: {late}",
                             delay_ms=p.rtt_ms / 2)
        p.waiting.append(attempt)
        self.queue_moved(p)
        self.start_next(p)

    def release(self, p: _Provider, request_bytes: int, epoch: int) -> None:
        """The provider lets go of a request's bytes: it was refused, or its conversation
        ended (the ack is in)."""
        if epoch == p.epoch:
            p.budget.give(request_bytes)
        if self.central:
            self.open_gate(p)

    def hear(self, arrival: int, peer_id: str, backlog_ms: float) -> None:
        self.heard[arrival][peer_id] = (backlog_ms, self.now)

    def start_next(self, p: _Provider) -> None:
        p.waiting.sort(key=lambda a: p.queue.order_key(a.job.job_id))  # as the provider's slot gate
        while p.waiting and len(p.running) < p.member.device.slots and self.now >= p.paused_until_ms:
            attempt = p.waiting.pop(0)
            p.queue.start(attempt.job.job_id, self.now)
            p.running[attempt.job.job_id] = attempt
            self.at(self.now + attempt.expected_ms, self.complete, attempt, p.epoch)

    def complete(self, attempt: _Attempt, epoch: int) -> None:
        p = attempt.provider
        if epoch != p.epoch or p.running.get(attempt.job.job_id) is not attempt:
            return  # lost in a kill or restart
        if self.now < p.paused_until_ms:  # paused mid-compute: it ends that much later
            return self.at(self.now + (p.paused_until_ms - self.now), self.complete, attempt, epoch)
        del p.running[attempt.job.job_id]
        p.queue.finish(attempt.job.job_id)
        attempt.computed_ms = attempt.expected_ms
        self.at(self.now + p.rtt_ms, self.release, p, attempt.request_bytes, epoch)  # the result out, the ack in
        self.queue_moved(p)
        self.start_next(p)
        self.at(self.now + p.rtt_ms / 2, self.delivered, attempt)

    def fault(self, fault) -> None:
        p = self.providers[fault.provider]
        self.run.faults.append({"at_s": fault.at_s, "provider": fault.provider, "action": fault.action,
                                "peer_id": p.peer_id})
        if fault.action == "pause":
            p.paused_until_ms = self.now + 1000 * fault.duration_s
            self.at(p.paused_until_ms, self.start_next, p)
            return
        lost = list(p.running.values()) + p.waiting
        p.running.clear()
        p.waiting.clear()
        p.queue = DeviceQueue(p.member.device.slots)
        p.budget = ByteBudget(REQUEST_BUDGET_BYTES)
        p.epoch += 1
        p.alive = False
        if self.central:
            self.open_gate(p, everything=True)  # they reach a provider that is gone, as anyone's would
        for attempt in lost:
            self.fail(attempt, "StreamClosed: the provider went away mid-job", vanished=True, delay_ms=p.rtt_ms / 2)
        if fault.action == "restart":
            self.at(self.now + RESTART_AWAY_MS, self.back, p)

    def back(self, p: _Provider) -> None:
        p.alive = True
        self.publish(p)
        self.at(self.now + REFRESH_MS, self.refresh, p, p.epoch)

    # --- buyers: one per arrival, as `devnet run` starts one `submit` per arrival ----------

    def live_offers(self, sha: str) -> list[Offer]:
        """Central: every live provider of the model with its true queue as backlog."""
        out = []
        for p in self.providers:
            if p.alive and p.offer is not None and sha in p.capabilities:
                transit = sum(self.in_transit.get(p.peer_id, {}).values()) / p.member.device.slots
                out.append(replace(p.offer, backlog_ms=p.queue.wait_ms(self.now) + transit))
        return out

    def arrive_together(self) -> None:
        """Central: every arrival of this instant, placed in one problem."""
        if self._placed_at == self.now:
            return
        self._placed_at = self.now
        indices = [i for i, a in enumerate(self.scenario.arrivals) if 1000 * a.at_s == self.now]
        jobs_by_arrival = {}
        for index in indices:
            arrival = self.scenario.arrivals[index]
            sha, name = self.models[arrival.model]
            jobs_by_arrival[index] = [_Job(index, f"a{index:04d}-j{k:03d}", arrival.items, sha, name,
                                           arrival.deadline_ms, self.now) for k in range(arrival.count)]
            self.jobs.extend(jobs_by_arrival[index])
            self.in_flight[index] = {}
            self.heard[index] = {}
        everyone = [p.offer for p in self.providers if p.alive and p.offer is not None]
        shas = sorted({self.models[self.scenario.arrivals[i].model][0] for i in indices})
        live = {o.peer_id: o for sha in shas for o in self.live_offers(sha)}  # one per device
        jobs = tuple(Job(id=j.job_id, model=j.model_sha, items=j.items, max_price=1.0, deadline_ms=j.deadline_ms)
                     for index in indices for j in jobs_by_arrival[index])
        # The buyers' own view of the devices: every model an offer lists, at the rate the
        # largest job of the instant sees.
        providers = offers_to_problem(list(live.values()), shas[0], [j.items for j in jobs], len(jobs), 1.0,
                                      buyer_weights(self.scenario.weights, None), [j.id for j in jobs]).providers
        by_id = {j.job_id: j for index in indices for j in jobs_by_arrival[index]}
        if not providers:
            for job in by_id.values():
                self.lose(job, "no offers for the model")
            return
        weights = buyer_weights(self.scenario.weights, min((j.deadline_ms for j in jobs if j.deadline_ms),
                                                           default=None))
        result = solve(Problem(tuple(providers), jobs, weights), solver=self.solver)
        for u in result.unassigned:
            self.lose(by_id[u.job], u.explain)
        lanes: dict[tuple[str, int], list[_Job]] = {}
        for a in sorted(result.assignments, key=lambda a: (a.provider, a.slot, a.position)):
            lanes.setdefault((a.provider, a.slot), []).append(by_id[a.job])
        for index in indices:
            arrival = self.scenario.arrivals[index]
            vanished: set[str] = set()
            window = lane_window(arrival.items * self.row_bytes[arrival.model])
            for (pid, _slot), lane in lanes.items():
                mine = [j for j in lane if j.arrival == index]
                if mine:
                    self.start_lane(mine, pid, vanished, everyone, window)

    def arrive(self, index: int) -> None:
        if self.central:
            return self.arrive_together()
        arrival = self.scenario.arrivals[index]
        sha, name = self.models[arrival.model]
        offers = [p.offer for p in self.providers
                  if p.offer is not None and p.offer.expires_at_ms > self.now and sha in p.capabilities]
        jobs = [_Job(index, f"a{index:04d}-j{k:03d}", arrival.items, sha, name, arrival.deadline_ms, self.now)
                for k in range(arrival.count)]
        self.jobs.extend(jobs)
        self.in_flight[index] = {}
        self.heard[index] = {}
        if not offers:
            for job in jobs:
                self.lose(job, "no offers for the model")
            return
        problem = offers_to_problem(offers, sha, arrival.items, arrival.count, 1.0,
                                    buyer_weights(self.scenario.weights, arrival.deadline_ms),
                                    [j.job_id for j in jobs], arrival.deadline_ms)
        result = solve(problem, solver=self.solver)  # no clock: work budgets only, so it repeats
        by_id = {j.job_id: j for j in jobs}
        for u in result.unassigned:
            self.lose(by_id[u.job], u.explain)
        lanes: dict[tuple[str, int], list[_Job]] = {}
        for a in sorted(result.assignments, key=lambda a: (a.provider, a.slot, a.position)):
            lanes.setdefault((a.provider, a.slot), []).append(by_id[a.job])
        vanished: set[str] = set()
        window = lane_window(arrival.items * self.row_bytes[arrival.model])
        for (pid, _slot), lane in lanes.items():
            self.start_lane(lane, pid, vanished, offers, window)

    def start_lane(self, lane: list[_Job], pid: str, vanished: set[str], offers: list[Offer], window: int) -> None:
        """As Buyer.run_lane: a lane's jobs go `window` at a time, each to the placed
        provider first, then wherever the matcher places it again; as one ends, the
        next is sent."""
        left = list(lane)

        def next_one() -> None:
            if left:
                self.send(left.pop(0), self.by_id[pid], next_one, vanished, offers)

        for _ in range(min(window, len(lane))):
            next_one()

    def send(self, job: _Job, p: _Provider, then: Callable | None, vanished: set[str], offers: list[Offer]) -> None:
        if self.central:
            # The central dispatcher knows what each provider holds: a request waits with
            # it, never refused busy, until the provider's request budget has room.
            self.gate.setdefault(p.peer_id, []).append((job, p, then, vanished, offers))
            return self.open_gate(p)
        self._send(job, p, then, vanished, offers)

    def open_gate(self, p: _Provider, *, everything: bool = False) -> None:
        waiting = self.gate.get(p.peer_id, [])
        while waiting:
            size = waiting[0][0].items * self.row_bytes_by_sha[waiting[0][0].model_sha]
            on_the_way = self.transit_bytes.get(p.peer_id, 0)
            if not everything and (p.budget.held or on_the_way) and \
                    p.budget.held + on_the_way + size > p.budget.capacity:
                return
            self._send(*waiting.pop(0))

    def _send(self, job: _Job, p: _Provider, then: Callable | None, vanished: set[str], offers: list[Offer]) -> None:
        job.tried.add(p.peer_id)
        job.attempts.append(p.peer_id)
        rate = p.capabilities[job.model_sha].rate(job.items)
        attempt = _Attempt(job, p, expected_ms(job.items, rate), self.now, then, vanished, offers,
                           request_bytes=job.items * self.row_bytes_by_sha[job.model_sha])
        self.transit_bytes[p.peer_id] = self.transit_bytes.get(p.peer_id, 0) + attempt.request_bytes
        self.in_flight[job.arrival].setdefault(p.peer_id, []).append(attempt.expected_ms)
        self.in_transit.setdefault(p.peer_id, {})[job.job_id] = attempt.expected_ms
        timeout_ms = 1000 * job_timeout_s(job.deadline_ms)
        self.at(self.now + timeout_ms, self.time_out, attempt)
        self.at(self.now + p.rtt_ms / 2, self.receive, attempt, p.epoch)

    def _end_attempt(self, attempt: _Attempt) -> bool:
        if attempt.done:
            return False
        attempt.done = True
        load = self.in_flight[attempt.job.arrival].get(attempt.provider.peer_id, [])
        if attempt.expected_ms in load:
            load.remove(attempt.expected_ms)
        return True

    def time_out(self, attempt: _Attempt) -> None:
        # The buyer gives up on the stream; the provider, if it still computes, spends
        # the energy anyway, for nobody.
        self.fail(attempt, "TooSlowError: no result within the job timeout", delay_ms=0.0)

    def fail(self, attempt: _Attempt, error: str, *, vanished: bool = False, delay_ms: float,
             busy_backlog_ms: float | None = None) -> None:
        if delay_ms:
            return self.at(self.now + delay_ms, self._failed, attempt, error, vanished, busy_backlog_ms)
        self._failed(attempt, error, vanished, busy_backlog_ms)

    def _failed(self, attempt: _Attempt, error: str, vanished: bool, busy_backlog_ms: float | None = None) -> None:
        if not self._end_attempt(attempt):
            return
        job = attempt.job
        if attempt.job.job_id in attempt.provider.running and attempt.provider.running[job.job_id] is attempt:
            job.wasted_energy_j += self.energy_j(attempt.provider, attempt.expected_ms)  # it runs to its end
        job.error = error
        if vanished:
            attempt.vanished.add(attempt.provider.peer_id)
        self.in_transit.get(attempt.provider.peer_id, {}).pop(job.job_id, None)
        nxt = None
        busy = set()
        if busy_backlog_ms is not None and job.busy_answers < BUSY_RETRIES:  # as Buyer.run_job
            job.busy_answers += 1
            job.tried.discard(attempt.provider.peer_id)
            busy = {attempt.provider.peer_id}
        if self.central:
            attempt.offers = self.live_offers(job.model_sha)  # it knows who is alive, and every queue
        if len(job.tried) < RETRY_PROVIDERS:
            if retry_offers(attempt.offers, job.tried, attempt.vanished):
                left = remaining_deadline_ms(job.deadline_ms, self.now - job.submitted_ms, 0.0)
                slots = {o.peer_id: o.slots for o in attempt.offers}
                try:
                    nxt, job.in_time = place_again(
                        attempt.offers, tried=job.tried, vanished=attempt.vanished, busy=busy, model_sha=job.model_sha,
                        items=job.items, max_price=1.0,
                        weights=self.scenario.weights, solver=self.solver, job_id=job.job_id,
                        deadline_left_ms=left if job.in_time else None,
                        own_backlog={} if self.central else known_backlog_ms(
                            self.in_flight[job.arrival], slots, self.heard[job.arrival], attempt.offers, self.now))
                except NoPlacement as exc:
                    job.error += f"; no other provider can take it: {exc}"
        if nxt is not None:
            if nxt.peer_id in busy:  # nobody else can take it: back once the queue there drains
                return self.at(self.now + busy_wait_ms(busy_backlog_ms), self.send, job, self.by_id[nxt.peer_id],
                               attempt.then, attempt.vanished, attempt.offers)
            return self.send(job, self.by_id[nxt.peer_id], attempt.then, attempt.vanished, attempt.offers)
        self.lose(job, job.error)
        if attempt.then:
            attempt.then()

    def delivered(self, attempt: _Attempt) -> None:
        if not self._end_attempt(attempt):
            # Timed out first: computed for nobody.
            attempt.job.wasted_energy_j += self.energy_j(attempt.provider, attempt.computed_ms or 0.0)
            return
        job, p = attempt.job, attempt.provider
        energy = self.energy_j(p, attempt.computed_ms)
        device = p.member.device
        job.record = JobRecord(
            job.arrival, job.job_id, "settled", p.peer_id, f"{p.index}: {device.name}", energy, SIMULATED,
            energy / 3.6e6 * p.member.region.carbon_g_per_kwh, self.now - job.submitted_ms,
            self.now - job.submitted_ms, job.deadline_ms, len(job.attempts), "", wasted_energy_j=job.wasted_energy_j,
            model=job.model_name, items=job.items)
        if attempt.then:
            attempt.then()

    def lose(self, job: _Job, error: str) -> None:
        job.record = JobRecord(job.arrival, job.job_id, "failed", "", "", 0.0, SIMULATED, 0.0, 0.0,
                               self.now - job.submitted_ms, job.deadline_ms, len(job.attempts), error,
                               wasted_energy_j=job.wasted_energy_j, model=job.model_name, items=job.items)

    @staticmethod
    def energy_j(p: _Provider, compute_ms: float) -> float:
        return compute_ms / 1000 * p.member.device.marginal_w_per_slot


def simulate(scenario: Scenario, fleet: Fleet, *, say: Callable[[str], None] = lambda line: None) -> list[SolverRun]:
    runs = []
    for solver in scenario.solvers:
        run = Simulation(scenario, fleet, solver).go()
        settled = sum(j.state == "settled" for j in run.jobs)
        say(f"[{solver}] {settled}/{len(run.jobs)} settled, {sum(j.energy_j for j in run.jobs):.3f} J (simulated), "
            f"{sum(j.missed for j in run.jobs)} deadline misses or losses")
        runs.append(run)
    return runs
