"""The provider daemon: advertise a signed offer, run jobs for real, return signed receipts.

A peer's input never kills the daemon: every stream handler turns bad input into a
counted, logged drop (with the peer id) and, where the stream still works, a JobError.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import trio

from protocol.errors import DecodeError
from protocol.job import ProviderJob, Step
from protocol.messages import Device, ModelCapability, Offer, PowerProfile, sign_offer
from protocol.tensors import Tensor
from protocol.stream import (
    MAX_SETTLE_ENTRIES, MAX_SETTLE_FRAME_BYTES, HeldReceipt, OfferWant, SettleHeld, decode_message, encode_message,
)
from protocol.topics import JOB_PROTOCOL, OFFERS_TOPIC, SETTLE_PROTOCOL

from . import modelcheck
from .admission import REPUBLISH_MIN_INTERVAL_S, ByteBudget, DeviceQueue, expected_ms, worth_republishing
from .slots import SlotGate
from .calibrate import (
    DEFAULT_MODELS, PowerFigures, Profile, calibrate, load_profile, merge_profiles, power_figures,
    reference_model_path, save_profile,
)
from .config import ProviderConfig
from .executor import Executor, JobFailed, ModelStore
from .faults import fault_point
from .clock import SYSTEM_CLOCK, Clock
from .gossip import SYNC_TIMEOUT_S, TRACE_OFFERS, OfferGossip, emit
from .identity import load_key
from .ledger import Ledger, LedgerError, LedgerWriter
from .metrics import NodeMetrics
from .offers import OfferBook
from .net import FrameRefused, OpenNetwork, Stream, StreamClosed
from .p2p import ListenError, check_listen_addrs, open_p2p_node
from .reachability import announce_problem
from .policy import Availability, CarbonSchedule, IdleGate, OwnerLoad, decide
from .power import probe_meter
from .ratelimit import PeerRateLimit
from .output import write_json_atomic
from .refusals import Refusals

log = logging.getLogger("idlemesh.provider")

# An offer lives `offer_ttl_s` (config, default 60 s) and is refreshed every third of
# that: within the gossip budget of one message per node per 10-30 s, and two refreshes
# can be lost before it expires anywhere.
REFRESHES_PER_TTL = 3
# The bootstrap's copy of our offer older than this many refresh periods: gossip is
# not reaching it (status warns, and we push the offer by sync).
STALE_REFRESHES = 2
READ_TIMEOUT_S = 30.0
CREDIT_WINDOW_MS = 24 * 3600 * 1000  # rejected work counts against a buyer's credit this long
SUBSCRIPTION_WAIT_S = 15.0  # after a connect, for the bootstrap's pubsub greeting
MODEL_UPLOAD_TIMEOUT_S = 120.0


POLICY_INTERVAL_S = 2.0
JOBS_PER_PEER = (20.0, 60.0)  # job streams per second sustained, burst, per peer
KEPT_RESULTS_BYTES = 256 << 20  # acked results beyond this go first; unacked ones stay until their request expires
KEPT_RESULTS_PRUNE_S = 60.0  # expired results go within this, jobs or none
MIN_KEEP_RESULT_MS = 10 * 60_000  # a result is kept at least this long, whatever its request's expiry

STATUS_NAME = "status.json"





class Provider:
    def __init__(self, config: ProviderConfig, *, clock: Clock = SYSTEM_CLOCK,
                 open_network: OpenNetwork = open_p2p_node, executor=None):
        """`clock`, `open_network` and `executor` are what a test under MockClock replaces
        (node.clock.TrioClock, node.memnet, a fake executor); the daemon uses the real ones."""
        self.config = config
        self.clock = clock
        self.open_network = open_network
        self.seed, self.key = load_key(config.home)
        self.simulated = config.speed_factor != 1.0
        # A simulated device lives in virtual time: its queue, compute and link last
        # time_scale times longer on the wall clock (devnet run on a host slower than the
        # fleet). A real device: 1.
        self.time_scale = config.time_scale if self.simulated else 1.0
        self.overruns = 0  # simulated jobs whose outputs took the host longer than the device's time
        self.store = ModelStore(config.home / "models", budget_bytes=int(config.model_budget_mb * (1 << 20)))
        self.executor = executor or Executor(self.store, slots=config.slots, job_memory_mb=config.job_memory_mb)
        # A simulated device's energy follows its profile; metering this machine would mislabel it.
        self.meter = None if self.simulated else probe_meter(
            want_gpu=self.executor.execution_provider == "CUDAExecutionProvider")
        self.ledger = Ledger(config.home / "ledger.sqlite", self.key.public_key)  # reads, on the trio thread
        # Where blocking work runs (ledger commits): a worker thread; a MockClock test
        # runs it inline, since MockClock would jump while a thread works.
        self.offload = trio.to_thread.run_sync
        self.writer = LedgerWriter(config.home / "ledger.sqlite", self.key.public_key,
                                   offload=lambda fn, *args: self.offload(fn, *args))
        self.models: list[ModelCapability] = []
        self.profile: Profile | None = None
        self.power: PowerFigures | None = None
        self.book = OfferBook()
        self.refusals = Refusals(log, emit=emit, on_count=lambda code: self.metrics.refused.labels(code).inc(),
                                 clock=self.clock)
        self.counters = self.refusals.by_reason
        self.jobs_done = 0
        self._job_limit = PeerRateLimit(*JOBS_PER_PEER)
        self._claimed: set[str] = set()  # jobs being uploaded or run: a second stream for one is `busy`
        self.request_budget = ByteBudget(int(config.request_budget_mb * 1024 * 1024))
        self._running: set[str] = set()  # jobs accepted and not yet finished
        # The queue buyers see in our offer and the deadline admission (shared with the
        # devnet simulator); a job holds a device slot from its start to its end.
        self.queue = DeviceQueue(config.slots)
        self._device_slots = SlotGate(config.slots, self.queue.order_key)  # earliest deadline first
        self._queue_moved = trio.Event()
        self._published_backlog_ms = 0.0
        self._signed_offer: bytes | None = None
        self.offer_log: dict = {}  # our current offer: issued/expires, publishes, last error
        self.seen_by: dict[str, dict] = {}  # bootstrap peer id -> what its book holds of ours
        self.gossip: OfferGossip | None = None
        self._redialled_ms: dict[str, float] = {}  # bootstrap -> when we last redialled it for a lost subscription
        self.metrics = NodeMetrics("provider")
        self.started_at_ms = self.clock.now_ms()
        self.carbon = CarbonSchedule(config.carbon_g_per_kwh, config.carbon_csv, config.carbon_source)
        self.idle_gate = IdleGate(config.idle_threshold, config.idle_hold_s)
        self.owner_load = 0.0
        self.availability = self._decide(0.0, 0.0, first=True)
        self.p2p = None

    def count(self, name: str, peer: str, detail: object) -> None:
        """Count a refused input from a peer (by reason and peer); the log line and the
        `refused` event that lets a watcher (devnet, tests) see it are rate-limited."""
        self.refusals(name, peer, detail)

    # --- capability and offer ---------------------------------------------------------

    def model_paths(self) -> list[Path]:
        return self.config.models or [reference_model_path(name) for name in DEFAULT_MODELS]

    def prepare(self) -> None:
        """Throughput from HOME/profile.json when it covers our models, else measured now
        (and saved); power from the meter, else declared, else published estimates."""
        c = self.config
        if c.open_models:
            log.warning("open_models is on: models that buyers send run here (each checked in a throwaway "
                        "subprocess first, then under a timeout and a memory ceiling); set open_models = false "
                        "in provider.toml to run only your own")
        paths = self.model_paths()
        wanted = {}
        for path in paths:
            verdict = modelcheck.check(str(path))  # the operator's own files: checked in-process
            if not verdict["ok"]:
                raise SystemExit(f"model {path}: {verdict['error']}")
            data = path.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            wanted[sha] = path
            self.executor.trust(sha, verdict)
            if not self.store.has(sha):
                # Held from the start: a buyer of a model we offer never uploads it.
                self.store.put(sha, data)
        profile = load_profile(c.home)
        if profile is not None and profile.speed_factor != c.speed_factor:
            profile = None  # measured as another (simulated) device: none of it applies
        missing = [path for sha, path in wanted.items() if profile is None or profile.model(sha) is None]
        if missing:
            # Measure only what the profile lacks, and keep everything it has.
            measured = calibrate(missing, batches=(), meter=self.meter, declared_idle_w=c.idle_w,
                                 declared_busy_w=c.busy_w, device_name=c.device_name, speed_factor=c.speed_factor,
                                 seconds_per_point=0.3, progress=lambda line: log.info("calibrate: %s", line))
            if profile is not None:
                kept_power = profile.power  # from a fuller calibration than this quick one
                profile = merge_profiles(profile, measured)
                profile.power = kept_power
            else:
                profile = measured
            save_profile(c.home, profile)
        self.profile = profile
        self.models = [ModelCapability(m.name, m.sha256, m.items_per_s, m.throughput_source, m.peak_items_per_s)
                       for m in profile.models if m.sha256 in wanted]
        if self.meter is not None and profile.power.busy_source == self.meter.source:
            power = profile.power
        else:
            power = power_figures(None, [], None, c.idle_w, c.busy_w, c.device_name or profile.device_name,
                                   self.simulated)
        if c.marginal_w is not None:
            power = PowerFigures(power.idle_w, power.idle_source, power.busy_w, power.busy_source, c.marginal_w,
                                 "simulated" if self.simulated else "declared", power.note)
        self.power = power
        self.executor.idle_w = power.idle_w
        for m in self.models:
            log.info("model %s: %.1f items/s per slot (%s)", m.name, m.items_per_s, m.throughput_source)
            self.executor.warm(m.sha256)
        log.info("power: idle %.1f W (%s), marginal %.1f W/slot (%s)", power.idle_w, power.idle_source,
                 power.marginal_w_per_slot, power.marginal_source)

    def build_offer(self) -> Offer:
        c, power = self.config, self.power
        issued = self.clock.now_ms()
        backlog_ms = self.queue.wait_ms(self.vnow_ms())
        open_rate = min((m.items_per_s for m in self.models), default=None) if c.open_models else None
        return Offer(
            provider=self.key.public_key, peer_id=self.key.peer_id, addrs=tuple(self.p2p.offer_addrs()),
            device=Device(c.arch, (c.device_name or self.profile.device_name)[:128], c.memory_mb), slots=c.slots,
            models=tuple(self.models),
            power=PowerProfile(power.idle_w, power.busy_w, power.marginal_w_per_slot, power.idle_source,
                               power.busy_source, power.marginal_source),
            carbon_g_per_kwh=self.carbon.at(datetime.now(timezone.utc)), carbon_source=self.carbon.source,
            price_per_s=c.price_per_s, backlog_ms=backlog_ms, issued_at_ms=issued,
            expires_at_ms=issued + int(c.offer_ttl_s * 1000), idle_only=c.idle_only,
            execution_provider=self.executor.execution_provider, available=self.availability.selling,
            carbon_ceiling_g_per_kwh=c.carbon_ceiling, open_models_items_per_s=open_rate,
            link_rtt_ms=2 * c.link_delay_ms if c.link_delay_ms else None,
        )

    def refresh_offer(self) -> bytes:
        # Never into our own book: gossip validates our own publishes against it.
        offer = self.build_offer()
        self._signed_offer = sign_offer(self.key, offer)
        self._published_backlog_ms = offer.backlog_ms
        self.offer_log.update(issued_at_ms=offer.issued_at_ms, expires_at_ms=offer.expires_at_ms)
        return self._signed_offer

    # --- when to sell -----------------------------------------------------------------

    def _decide(self, owner_load: float, now_s: float, *, first: bool = False) -> Availability:
        idle_open = self.idle_gate.update(owner_load, now_s) if not first else not self.config.idle_only
        return decide(idle_only=self.config.idle_only, idle_open=idle_open, owner_load=owner_load,
                      carbon_now=self.carbon.at(datetime.now(timezone.utc)),
                      carbon_ceiling=self.config.carbon_ceiling)

    async def _watch_policy(self) -> None:
        sensor = OwnerLoad(gpu=self.meter if hasattr(self.meter, "other_processes") else None)
        while True:
            await trio.sleep(POLICY_INTERVAL_S)
            self.owner_load = sensor.read()
            now = self._decide(self.owner_load, self.clock.elapsed_s())
            if now.selling != self.availability.selling:
                # Jobs in flight finish; the offer changes at once so buyers stop placing.
                log.info("capacity %s: %s", "offered again" if now.selling else "withdrawn", now.reason)
                emit("availability", selling=now.selling, reason=now.reason)
                self.availability = now
                await self._publish_now()
            self.availability = now
            self.write_status()

    async def _addrs_changed(self) -> None:
        """How buyers reach us changed (a dial-back's verdict, a relay slot gained or
        lost): the offer says so at once, to the mesh and to each bootstrap's book."""
        await self._publish_now()
        for peer_id, link in list(self.p2p.links.items()):
            if link.get("connected") and self.gossip is not None:
                await self._announce_to(self.gossip, peer_id)
        self.write_status()
        # After the bootstraps hold the new offer: a devnet waiting on this event may
        # send buyers at once.
        reach = self.p2p.reach_status()
        emit("reachability", state=reach["state"], addrs=self.p2p.offer_addrs(), how=reach["how"])

    async def _publish_now(self) -> None:
        signed = self.refresh_offer()
        offer = self.offer_log
        try:
            await self.p2p.publish(OFFERS_TOPIC, signed)
            offer.update(published=offer.get("published", 0) + 1, last_publish_ms=self.clock.now_ms(), last_publish_error=None)
        except (StreamClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            offer["last_publish_error"] = f"{type(exc).__name__}: {exc}"
            log.info("publish failed: %s", exc)
        if TRACE_OFFERS:
            emit("offer-published", issued_at_ms=offer["issued_at_ms"], published=offer.get("published", 0))

    def status(self) -> dict:
        return {
            "pid": os.getpid(), "peer_id": self.key.peer_id, "updated_at_ms": self.clock.now_ms(),
            "selling": self.availability.selling, "reason": self.availability.reason,
            "owner_load": round(self.owner_load, 3), "jobs_running": len(self._running), "jobs_done": self.jobs_done,
            "time_scale": self.time_scale, "overruns": self.overruns,
            "counters": dict(self.counters), "refused": self.refusals.snapshot(),
            "buyers_owing": self.ledger.buyers_owing(rejected_since_ms=self.clock.now_ms() - CREDIT_WINDOW_MS),
            "credit_s": self.config.credit_s,
            "request_budget": {"capacity_mb": self.request_budget.capacity >> 20,
                               "held_mb": round(self.request_budget.held / (1 << 20), 1),
                               "peak_mb": round(self.request_budget.peak / (1 << 20), 1)},
            "slots": self.config.slots,
            "carbon_g_per_kwh": self.carbon.at(datetime.now(timezone.utc)), "carbon_source": self.carbon.source,
            "carbon_ceiling": self.config.carbon_ceiling, "idle_only": self.config.idle_only,
            "meter": self.meter.source if self.meter else None,
            "execution_provider": self.executor.execution_provider,
            "power": vars(self.power) if self.power else None,
            "models": [{"name": m.name, "items_per_s": m.items_per_s, "source": m.throughput_source}
                       for m in self.models],
            "addrs": list(self.p2p.offer_addrs()) if self.p2p else [],
            "reachability": self.p2p.reach_status() if self.p2p else None,
            "listen": list(self.config.listen), "started_at_ms": self.started_at_ms,
            "price_per_s": self.config.price_per_s, "price_unit": "price units per busy second",
            "metrics": self.config.metrics,
            "offer": self.network_view(),
        }

    def write_status(self) -> None:
        write_json_atomic(self.config.home / STATUS_NAME, self.status())

    @property
    def refresh_s(self) -> float:
        return self.config.offer_ttl_s / REFRESHES_PER_TTL

    async def _advertise(self) -> None:
        while True:
            await self._publish_now()
            await self._heal_deaf_links()
            await trio.sleep(self.refresh_s)

    async def _heal_deaf_links(self) -> None:
        """A bootstrap connected for longer than its pubsub greeting takes, whose
        subscription we do not hold, got nothing from the publish just made: py-libp2p
        forgets a subscription when one read fails and never asks again on that
        connection. Redial it now (on_connect then pushes the offer by sync), not at the
        next visibility check a lifetime later, while its book of our offer ages; at most
        once per offer lifetime per bootstrap."""
        now_ms = SYSTEM_CLOCK.now_ms()  # the clock the links' connected_at_ms is on
        for peer_id, link in list(self.p2p.links.items()):
            connected_at_ms = link.get("connected_at_ms")
            if (not link.get("connected") or connected_at_ms is None
                    or now_ms - connected_at_ms < SUBSCRIPTION_WAIT_S * 1000
                    or now_ms - self._redialled_ms.get(peer_id, -math.inf) < self.config.offer_ttl_s * 1000
                    or self.p2p.subscribes(peer_id, OFFERS_TOPIC)):
                continue
            self._redialled_ms[peer_id] = now_ms
            await self._redial_deaf(peer_id)

    async def _follow_queue(self) -> None:
        """Sign and publish the offer again when the queue moved enough, at most once per
        REPUBLISH_MIN_INTERVAL_S: buyers place on the load we really have, not on what
        the last periodic refresh said."""
        while True:
            await self._queue_moved.wait()
            self._queue_moved = trio.Event()
            if worth_republishing(self._published_backlog_ms, self.queue.wait_ms(self.vnow_ms())):
                await self._publish_now()
                await trio.sleep(REPUBLISH_MIN_INTERVAL_S)

    def vnow_ms(self) -> float:
        """The device's clock: the wall clock, or virtual time for a simulated device."""
        return self.clock.now_ms() / self.time_scale

    def _queue_changed(self) -> None:
        self._queue_moved.set()

    async def _announce_to(self, gossip: OfferGossip, peer_id: str) -> None:
        # Push our offer straight to each bootstrap peer on (re)connect: a fresh buyer
        # syncing from it sees us at once, without waiting for the gossip mesh.
        try:
            await gossip.sync_with(peer_id, want=self._own_want())
            emit("announced", peer_id=self.key.peer_id, to=peer_id)
        except (DecodeError, StreamClosed, trio.TooSlowError) as exc:
            log.info("offer sync with %s failed: %s", peer_id, exc)
        # We publish without subscribing: gossip reaches this bootstrap only once its
        # subscription has reached us.
        try:
            await self.p2p.wait_for_subscription(peer_id, OFFERS_TOPIC, timeout_s=SUBSCRIPTION_WAIT_S)
        except trio.TooSlowError:
            await self._redial_deaf(peer_id)

    async def _redial_deaf(self, peer_id: str) -> None:
        """A connected bootstrap whose subscription we do not hold hears none of our
        offers by gossip: dial it again, so pubsub greets it afresh."""
        if self.p2p.links.get(peer_id, {}).get("connected") and not self.p2p.subscribes(peer_id, OFFERS_TOPIC):
            log.warning("bootstrap %s: its subscription to the offers never reached us, so gossip cannot carry our "
                        "offer to it; connecting again", peer_id)
            emit("redial", peer_id=self.key.peer_id, to=peer_id, why="no-subscription")
            await self.p2p.redial(peer_id)

    def _own_want(self) -> OfferWant:
        """What a provider takes back from a sync: its own offer as the bootstrap holds
        it. A seller has no use for the others' offers, and a bootstrap of a large network
        would page its whole book to every provider every lifetime."""
        return OfferWant(providers=(self.key.peer_id,))

    async def _check_visibility(self, gossip: OfferGossip) -> None:
        """Once per offer lifetime, ask each connected bootstrap for its book without
        pushing ours: the copy of our offer it holds shows whether gossip reaches it.
        A stale or missing copy is a warning in status, and we push the offer by sync.
        (A lost subscription, the usual cause, is redialled at each refresh:
        _heal_deaf_links.)"""
        while True:
            await trio.sleep(self.config.offer_ttl_s)
            for peer_id, link in list(self.p2p.links.items()):
                if link.get("connected"):
                    await self._probe(gossip, peer_id)

    async def _probe(self, gossip: OfferGossip, peer_id: str) -> None:
        seen = self.seen_by.setdefault(peer_id, {})
        try:
            with trio.fail_after(SYNC_TIMEOUT_S):
                await gossip.sync_with(peer_id, push_own=False, want=self._own_want())
        except (DecodeError, StreamClosed, trio.TooSlowError) as exc:
            seen.update(checked_at_ms=self.clock.now_ms(), error=f"offer sync failed: {exc}")
            return
        # The sync already verified each offer; find the bootstrap's copy of ours.
        theirs = next((o for o in gossip.last_sync["offers"] if o.peer_id == self.key.peer_id), None)
        checked = self.clock.now_ms()
        age_ms = checked - theirs.issued_at_ms if theirs else None
        stale = age_ms is None or age_ms > STALE_REFRESHES * self.refresh_s * 1000
        seen.update(checked_at_ms=checked, error=None, offer_age_ms=age_ms, stale=stale)
        self.write_status()
        if TRACE_OFFERS:
            emit("offer-checked", bootstrap=peer_id, offer_age_ms=age_ms, stale=stale)
        if stale:
            log.warning("bootstrap %s %s: gossip is not reaching it; pushing the offer by sync", peer_id,
                        "holds no offer of ours" if theirs is None else f"holds our offer from {age_ms / 1000:.0f} s ago")
            await self._announce_to(gossip, peer_id)

    def _export_metrics(self, p2p) -> None:
        m = self.metrics
        m.slots.set(self.config.slots)
        m.slots_busy.set_function(lambda: len(self._running))
        m.connected_peers.set_function(lambda: len(p2p.connected_peers()))
        m.offers_held.set_function(lambda: self.book.count(now_ms=self.clock.now_ms()))
        m.offer_age.set_function(lambda: (self.clock.now_ms() - self.offer_log.get("issued_at_ms", self.clock.now_ms())) / 1000)
        m.offer_visible.set_function(lambda: float("nan") if not self.seen_by else float(not any(
            v.get("stale") or v.get("error") for v in self.seen_by.values())))
        m.serve(self.config.metrics)
        log.info("metrics on http://%s/metrics", self.config.metrics)

    def network_view(self) -> dict:
        """What the network sees of our offer, for `provider status`."""
        now = self.clock.now_ms()
        offer = dict(self.offer_log)
        bootstraps = []
        for peer_id, link in self.p2p.links.items() if self.p2p else ():
            bootstraps.append({"peer_id": peer_id, **link, **self.seen_by.get(peer_id, {})})
        synced = self.gossip.synced_by if self.gossip else {}
        warnings = []
        if not self.config.bootstrap:
            warnings.append("no bootstrap configured: only buyers that dial this node directly see the offer")
        for b in bootstraps:
            if not b.get("connected"):
                warnings.append(f"cannot reach bootstrap {b['addr']}" + (f" ({b['last_error']})" if b.get("last_error") else ""))
            elif b.get("stale"):
                age = b.get("offer_age_ms")
                warnings.append(f"bootstrap {b['peer_id']} " + ("holds no offer of ours" if age is None else
                                f"holds our offer from {age / 1000:.0f} s ago") + ": gossip is not reaching it")
        if bootstraps and not any(b.get("connected") for b in bootstraps):
            warnings.append("no bootstrap reachable: buyers cannot find this provider")
        if offer.get("last_publish_error"):
            warnings.append(f"last publish failed: {offer['last_publish_error']}")
        return {
            **offer, "ttl_s": self.config.offer_ttl_s, "refresh_s": self.refresh_s,
            "age_ms": now - offer["issued_at_ms"] if "issued_at_ms" in offer else None,
            "mesh_peers": self.p2p.mesh_peers(OFFERS_TOPIC) if self.p2p else [],
            "bootstraps": bootstraps,
            "synced_by": [{"peer_id": p, "at_ms": t} for p, t in sorted(synced.items(), key=lambda kv: -kv[1])],
            "warnings": warnings,
        }

    # --- jobs -------------------------------------------------------------------------

    async def _send(self, stream: Stream, step: Step, *, timeout_s: float = 30.0) -> None:
        for payload in step.send:
            await stream.send(payload, timeout_s=timeout_s)

    async def _refuse(self, stream: Stream, job: ProviderJob, peer: str, code: str, message: str) -> None:
        """Count the refusal and tell the buyer why, if the stream still works."""
        self.count(code, peer, message)
        try:
            await self._send(stream, job.refuse(code, message, self.queue.wait_ms(self.vnow_ms())))
        except (StreamClosed, trio.TooSlowError):
            pass

    async def _receive(self, stream: Stream, job: ProviderJob, *, timeout_s: float = READ_TIMEOUT_S,
                       held: list[int] | None = None) -> Step:
        """The next frame, through the machine. With `held` (a request or a model), the
        frame must fit the request budget first; its size is appended to `held`, for the
        caller to give back once the job is done."""
        def admit(length: int) -> bool:
            if not self.request_budget.take(length):
                return False
            held.append(length)
            return True

        payload = await stream.receive(max_bytes=job.max_frame_bytes, timeout_s=timeout_s,
                                       admit=admit if held is not None else None)
        return job.receive(payload, now_ms=self.clock.now_ms())

    def _over_credit(self, buyer_peer: str) -> str:
        """Why this buyer gets settle-first instead of service, or ""."""
        owed = self.ledger.owed_by(buyer_peer, rejected_since_ms=self.clock.now_ms() - CREDIT_WINDOW_MS)
        if owed["unacked_s"] + owed["rejected_s"] <= self.config.credit_s:
            return ""
        return (f"{owed['unacked']} jobs ({owed['unacked_s']:.1f} compute s) unacked and {owed['rejected']} "
                f"({owed['rejected_s']:.1f} s) rejected in the last day exceed the credit of {self.config.credit_s:g} s "
                "this provider extends: ack them (idlemesh settle) first")

    async def _serve_job(self, stream: Stream) -> None:
        """One job stream, driven by the protocol's ProviderJob machine: it decides which
        frames are legal, checks the request and the price, and signs the receipt; here
        we decide whether to sell, move the bytes, run the model and persist."""
        peer = stream.remote_peer_id
        job = ProviderJob.create(self.key, peer_id=peer)
        if not self._job_limit.allow(peer, self.clock.elapsed_s()):
            with trio.move_on_after(READ_TIMEOUT_S):
                await self._refuse(stream, job, peer, "rate-limited", "too many job streams from this peer; slow down")
            return
        held: list[int] = []  # bytes of this job's big frames, given back to the budget at the end
        try:
            step = await self._receive(stream, job, held=held)
            if job.state == "failed":  # refused by the machine: wrong provider, expired
                refused = step.events[0]
                self.count(refused.code, peer, refused.message)
                await self._send(stream, step)
                return
            request = job.request
            if request.job_id in self._claimed:
                return await self._refuse(stream, job, peer, "busy", f"job {request.job_id} is still running; ask again later")
            if self.ledger.has(request.job_id):
                kept = self.ledger.kept_result(request.job_id, now_ms=self.clock.now_ms())
                if kept is not None and kept[0] == request.buyer:
                    # The buyer lost our answer (it crashed, the stream broke, or we
                    # restarted): the same stored bytes again, then its ack as before.
                    await self._send(stream, job.redeliver(kept[1]))
                    await self._settle(stream, job, peer)
                    return
                return await self._refuse(stream, job, peer, "replay", f"job {request.job_id} was already run "
                                          "and its result is no longer kept")
            over_credit = self._over_credit(peer)
            if over_credit:
                return await self._refuse(stream, job, peer, "settle-first", over_credit)
            if not self.availability.selling:
                return await self._refuse(stream, job, peer, "withdrawn", f"not selling now: {self.availability.reason}")
            capability = next((m for m in self.models if m.sha256 == request.model_sha256), None)
            if capability is None and self.config.open_models and self.models:
                # A model we do not list: priced at the open-model estimate we advertise.
                capability = ModelCapability(request.model_name or "open", request.model_sha256,
                                             min(m.items_per_s for m in self.models), "declared")
            if capability is None:
                return await self._refuse(stream, job, peer, "unknown-model",
                                          f"model {request.model_sha256} is not offered here")
            rate = capability.rate(request.items)  # what a job of this many rows sees (batching)
            step = job.quote(rate, self.config.price_per_s)
            if job.state == "failed":
                self.count("price", peer, step.events[0].message)
                await self._send(stream, step)
                return
            expected = expected_ms(request.items, rate)
            ahead = self.queue.wait_ms(self.vnow_ms())
            late = self.queue.admit(request.job_id, expected, self.vnow_ms(), deadline_ms=request.deadline_ms)
            if late:
                return await self._refuse(stream, job, peer, "deadline", late)
            self._queue_changed()
            # Claimed from here until it is run or refused: a second stream for the same
            # job is `busy`, and a buyer that dies mid-upload can submit again at once.
            self._claimed.add(request.job_id)
            try:
                if not self.store.has(request.model_sha256):
                    await self._send(stream, job.need_model())
                    before = len(held)
                    step = await self._receive(stream, job, timeout_s=MODEL_UPLOAD_TIMEOUT_S, held=held)
                    if job.state == "failed":
                        self.count("model-invalid", peer, step.events[0].message)
                        await self._send(stream, step)
                        return
                    self.store.put(step.events[0].sha256, step.events[0].data)
                    step = None  # the model's bytes are on disk now: its share of the budget goes back
                    if len(held) > before:
                        self.request_budget.give(held.pop())
                await self._run_job(stream, job, peer, expected, ahead)
            finally:
                self._claimed.discard(request.job_id)
                self.queue.finish(request.job_id)
                self._queue_changed()
        except FrameRefused as exc:
            await self._refuse(stream, job, peer, "busy", f"{exc.length} bytes do not fit in the "
                               f"{self.request_budget.capacity >> 20} MiB of requests this provider holds at once; "
                               "ask again later")
        except JobFailed as exc:
            await self._refuse(stream, job, peer, exc.code, str(exc))
        except DecodeError as exc:
            if job.state == "delivered":  # a bad ack: our receipt stays, unacked
                self.count("bad-ack", peer, exc)
                return
            await self._refuse(stream, job, peer, "bad-request", str(exc))
        except (StreamClosed, trio.TooSlowError) as exc:
            self.count("stream-closed" if job.state != "delivered" else "no-ack", peer, exc)
            if job.state == "delivered":
                self.metrics.jobs.labels("unacked").inc()
        finally:
            self.request_budget.give(sum(held))

    async def _run_job(self, stream: Stream, job: ProviderJob, peer: str, expected: float, ahead: float) -> None:
        """Run an admitted job. `expected`: its compute ms at the advertised rate, which is
        a simulated device's own time: it holds a device slot that long (in virtual
        time) while this machine computes the real outputs beside it, and its receipt
        says that time. The result goes once both are done; when the host is the later
        one, the run overran its time scale (counted). `ahead`: the queue it joined,
        told to the buyer with `accepted`."""
        request = job.request
        received_ms = self.vnow_ms()
        self._running.add(request.job_id)
        host: dict = {}

        async def compute() -> None:
            try:
                host["result"] = await self.executor.run(request.model_sha256, request.inputs,
                                                         timeout_s=request.timeout_ms / 1000)
            except JobFailed as exc:  # raised below, outside the nursery
                host["error"] = exc
            host["done_s"] = trio.current_time()

        try:
            await self._send(stream, job.accept(len(self._running) - 1, ahead))
            emit("accepted", job_id=request.job_id, buyer=peer)
            async with trio.open_nursery() as beside:
                # The receipt commits to the inputs' hash: taken beside the run, not after it.
                beside.start_soon(self.offload, job.input_sha256)
                async with self._device_slots.slot(request.job_id):
                    started_ms = self.vnow_ms()
                    self.queue.start(request.job_id, started_ms)
                    if self.simulated:
                        beside.start_soon(compute)
                        device_done_s = trio.current_time() + expected * self.time_scale / 1000
                        await trio.sleep_until(device_done_s)
                    else:
                        await compute()
                # The device slot is free at the device's own end, whatever this machine does.
                self.queue.finish(request.job_id)
                self._queue_changed()
        finally:
            self._running.discard(request.job_id)  # (the queue entry goes in _serve_job, however it ends)
        if "error" in host:
            raise host["error"]
        result = host["result"]
        if self.simulated and host["done_s"] > device_done_s:
            self.overruns += 1
        outputs = tuple(result.outputs)
        if self.config.fault_output_noise:
            # Devnet fault injection: a provider that returns wrong numbers under a
            # self-consistent receipt, which only a spot check can catch.
            outputs = tuple(Tensor.from_array(t.name, t.to_array() + np.float32(self.config.fault_output_noise))
                            for t in outputs)
        c = self.config
        # A simulated device reports the time its profile implies; the outputs stay real.
        compute_ms = expected if self.simulated else result.compute_ms
        if result.energy_j is not None:
            energy_j, energy_source = result.energy_j, result.energy_source  # the meter's delta
        else:
            energy_j = compute_ms / 1000 * self.power.marginal_w_per_slot
            energy_source = self.power.marginal_source
        try:
            step = job.deliver(
                outputs, compute_ms=compute_ms,
                # In the device's own time (virtual for a simulated one, as its queue runs).
                queue_ms=float(max(0.0, started_ms - received_ms)),
                energy_j=energy_j, energy_source=energy_source, price_per_s=c.price_per_s,
                execution_provider=self.executor.execution_provider, now_ms=self.clock.now_ms())
        except DecodeError as exc:  # a micro-batch whose outputs cannot be cut by its parts; nothing signed
            raise JobFailed("bad-request", f"a micro-batch needs outputs along the batch axis: {exc}") from None
        # Durable before the buyer can see it, receipt and result in one transaction: a
        # crash from here on loses neither, and a resubmission of the job, before or after
        # a restart, gets these same bytes back until the request expires.
        now = self.clock.now_ms()
        await self.writer.apply(job.receipt.envelope_bytes, None, now_ms=now,
                          keep=(request.buyer, step.send[0], max(request.expires_at_ms, now + MIN_KEEP_RESULT_MS)))
        self.jobs_done += 1
        self.metrics.jobs.labels("completed").inc()
        self.metrics.compute_seconds.inc(compute_ms / 1000)
        self.metrics.energy_joules.labels(energy_source).inc(energy_j)
        emit("job", job_id=request.job_id, buyer=peer, compute_ms=round(compute_ms, 3),
             energy_j=round(energy_j, 6), energy_source=energy_source, overruns=self.overruns)
        fault_point("provider-before-result")  # durable, not yet sent
        try:
            await self._send(stream, step)
        except (StreamClosed, trio.TooSlowError):
            # The buyer vanished before its answer: the bound is kept all the same (the
            # result stays, unacked, for a resubmission until its request expires).
            await self._prune_kept_results()
            raise
        # Off the buyer's path: bounding the kept results can wait until it has its answer.
        await self._prune_kept_results()
        await self._settle(stream, job, peer)

    async def _prune_kept_results(self) -> None:
        await self.writer.prune_results(now_ms=self.clock.now_ms(), max_bytes=KEPT_RESULTS_BYTES)

    async def _prune_kept_results_forever(self) -> None:
        """Expired results go even when no job ends to prune them (every buyer vanished,
        or none came back): an idle provider's disk does not hold them for months."""
        while True:
            await trio.sleep(KEPT_RESULTS_PRUNE_S)
            await self._prune_kept_results()

    async def _settle(self, stream: Stream, job: ProviderJob, peer: str) -> None:
        """Wait for the buyer's countersignature, apply it once, then tell the buyer the
        status we now durably hold (it delivers the ack again later if it never hears)."""
        job_id = job.request.job_id
        fault_point("provider-before-ack")
        (acknowledged,) = (await self._receive(stream, job, timeout_s=self.config.ack_timeout_s)).events
        try:
            applied = await self.writer.apply_ack(acknowledged.ack, now_ms=self.clock.now_ms())
        except LedgerError as exc:
            self.count("bad-ack", peer, exc)  # our receipt stays, unacked
            return
        fault_point("provider-after-ack")
        if applied.applied:
            self.metrics.jobs.labels("settled" if applied.status == "accepted" else applied.status).inc()
            if applied.status == "accepted":
                self.metrics.earnings.inc(job.receipt.receipt.price)
        emit("settled", job_id=job_id, status=applied.status)
        with trio.move_on_after(READ_TIMEOUT_S):
            try:
                await self._send(stream, job.confirm(applied.status))
            except StreamClosed:
                pass  # the buyer asks again by the settle protocol

    async def _serve_settle(self, stream: Stream) -> None:
        """A buyer delivers acks we never received and asks what we hold for its jobs."""
        peer = stream.remote_peer_id
        if not self._job_limit.allow(peer, self.clock.elapsed_s()):
            self.count("rate-limited", peer, "settle streams over the per-peer rate")
            return
        try:
            payload = await stream.receive(max_bytes=MAX_SETTLE_FRAME_BYTES, timeout_s=READ_TIMEOUT_S)
            request = decode_message(payload, max_bytes=MAX_SETTLE_FRAME_BYTES, expect=("settle-acks",))
        except DecodeError as exc:
            self.count("bad-settle", peer, exc)
            return
        except (StreamClosed, trio.TooSlowError) as exc:
            log.info("settle from %s ended early: %s", peer, exc)
            return
        entries, named = [], set()
        for ack in request.acks:
            try:
                applied = await self.writer.apply_ack(ack, now_ms=self.clock.now_ms())
            except LedgerError as exc:
                self.count("bad-ack", peer, exc)
                continue
            if applied.applied:
                emit("settled", job_id=applied.receipt_id, status=applied.status, late=True)
            named.add(applied.receipt_id)
            status, sha = self.ledger.status(applied.receipt_id)
            entries.append(HeldReceipt(applied.receipt_id, sha, status))
        unnamed = [HeldReceipt(job_id, sha, status) for job_id, sha, status in self.ledger.held_with(peer)
                   if job_id not in named and status == "unacked"][:MAX_SETTLE_ENTRIES]
        try:
            await stream.send(encode_message(SettleHeld(tuple(entries), tuple(unnamed))))
        except (StreamClosed, trio.TooSlowError):
            pass

    # --- lifetime ---------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGINT or SIGTERM; returns the signal's number."""
        check_listen_addrs(self.config.listen)  # before minutes of calibration, not after
        for addr in self.config.announce:
            if problem := announce_problem(addr):
                raise ListenError(problem)
        self.prepare()
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                await nursery.start(self.serve)
                async for signum in signals:
                    break
            nursery.cancel_scope.cancel()
        self.ledger.close()
        self.writer.close()
        (self.config.home / STATUS_NAME).unlink(missing_ok=True)
        emit("stopped", role="provider", counters=dict(self.counters))
        return signum

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Sell capacity until cancelled (a prepared provider); started once the first
        dial of each bootstrap has answered or failed."""
        async with self.open_network(self.seed, self.config.listen) as p2p:
            self.p2p = p2p
            p2p.announce = list(self.config.announce)
            p2p.on_direct = lambda peer_id: emit("hole-punched", peer=peer_id)
            p2p.send_delay_s = 0.0 if self.config.link_on_wire else \
                2 * self.config.link_delay_ms * self.time_scale / 1000
            self.refresh_offer()
            if self.config.metrics:
                self._export_metrics(p2p)
            gossip = self.gossip = OfferGossip(p2p, self.book, own_offer=lambda: self._signed_offer, clock=self.clock)
            gossip.on_bad_input = self.count
            p2p.set_stream_handler(JOB_PROTOCOL, self._serve_job)
            p2p.set_stream_handler(SETTLE_PROTOCOL, self._serve_settle)
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(gossip.run, hear_offers=False))
                p2p.keep_connected(self.config.bootstrap,
                                   on_connect=lambda pid: self._announce_to(gossip, pid))
                nursery.start_soon(self._advertise)
                nursery.start_soon(self._follow_queue)
                nursery.start_soon(self._check_visibility, gossip)
                nursery.start_soon(self._watch_policy)
                nursery.start_soon(self._prune_kept_results_forever)
                for addr, why in (await p2p.first_dials(self.config.bootstrap)).items():
                    log.warning("cannot reach bootstrap %s (%s); retrying: buyers cannot find this provider "
                                "until one answers", addr, why)
                # How buyers reach us: a dial-back, and behind NAT a relay slot; each change
                # is an event ("reachability") and a new offer.
                nursery.start_soon(p2p.track_reachability, self.config.bootstrap, self._addrs_changed)
                self.write_status()
                emit("ready", role="provider", peer_id=p2p.peer_id, addrs=p2p.listen_addrs,
                     models=[m.name for m in self.models])
                task_status.started(p2p)
                await trio.sleep_forever()
