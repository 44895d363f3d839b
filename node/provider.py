"""The provider daemon: advertise a signed offer, run jobs for real, return signed receipts.

A peer's input never kills the daemon: every stream handler turns bad input into a
counted, logged drop (with the peer id) and, where the stream still works, a JobError.
"""

from __future__ import annotations

import hashlib
import logging
import math
import platform
import signal
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import trio

from protocol.errors import DecodeError, ExpiredError
from protocol.messages import (
    Device, ModelCapability, Offer, PowerProfile, Receipt, SignedReceipt, check_window, open_job_request,
    open_receipt_ack, sign_offer, sign_receipt,
)
from protocol.signing import SigningKey
from protocol.stream import (
    MAX_CONTROL_FRAME_BYTES, MAX_MODEL_BYTES, Accepted, JobError, JobResult, ModelBlob, NeedModel,
    decode_message, encode_message,
)
from protocol.messages import MAX_REQUEST_BYTES
from protocol.tensors import tensors_sha256
from protocol.topics import JOB_PROTOCOL, OFFERS_TOPIC

from .executor import Executor, JobFailed, ModelStore
from .gossip import OfferGossip, bootstrap_peer_id, emit, now_ms
from .identity import load_key
from .ledger import Ledger
from .offers import OfferBook
from .p2p import FramedStream, StreamClosed, open_p2p_node

log = logging.getLogger("idlemesh.provider")

OFFER_TTL_MS = 60_000
OFFER_REFRESH_S = 20.0  # within the gossip budget of one message per node per 10-30 s
READ_TIMEOUT_S = 30.0
SEEN_JOBS_MAX = 100_000


def local_arch() -> str:
    machine = platform.machine().lower()
    return "arm64" if machine in ("arm64", "aarch64") else "x86_64"


@dataclass
class ProviderConfig:
    home: Path
    listen: list[str]
    bootstrap: list[str]
    slots: int = 1
    device_name: str = field(default_factory=lambda: platform.processor() or platform.machine())
    arch: str = field(default_factory=local_arch)
    memory_mb: int = 4096
    idle_w: float = 10.0
    busy_w: float = 40.0
    marginal_w_per_slot: float = 30.0
    power_source: str = "declared"
    carbon_g_per_kwh: float = 300.0
    carbon_source: str = "declared"
    price_per_s: float = 0.0001
    reference_models: list[Path] = field(default_factory=list)
    # Simulated devices scale measured throughput; 1.0 means this machine as it is.
    speed_factor: float = 1.0


class Provider:
    def __init__(self, config: ProviderConfig):
        self.config = config
        self.seed, self.key = load_key(config.home)
        self.store = ModelStore(config.home / "models")
        self.executor = Executor(self.store, slots=config.slots)
        self.ledger = Ledger(config.home / "ledger.sqlite")
        self.models: list[ModelCapability] = []
        self.book = OfferBook()
        self.counters: dict[str, int] = {}
        self._seen_jobs: OrderedDict[str, None] = OrderedDict()
        self._signed_offer: bytes | None = None
        self._queued = 0
        self.p2p = None

    def count(self, name: str, peer: str, detail: object) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1
        log.info("%s from %s: %s", name, peer, detail)

    # --- capability and offer ---------------------------------------------------------

    def calibrate(self) -> None:
        """Measure items/s per slot for each reference model on this machine."""
        # Measure from a scratch store so the model store starts empty: buyers send
        # models by hash only when a provider does not hold them.
        scratch = Executor(ModelStore(self.config.home / "calibration"), slots=1)
        for path in self.config.reference_models:
            data = path.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            scratch.store.put(sha, data)
            rate = scratch.measure_throughput(sha) * self.config.speed_factor
            source = "measured" if self.config.speed_factor == 1.0 else "simulated"
            name = path.stem.removeprefix("light_")
            self.models.append(ModelCapability(name, sha, rate, source))
            log.info("calibrated %s: %.1f items/s per slot (%s)", name, rate, source)

    def build_offer(self) -> Offer:
        c = self.config
        issued = now_ms()
        backlog_ms = 1000.0 * self._queued / max(1, c.slots)  # crude: a second per queued job
        return Offer(
            provider=self.key.public_key, peer_id=self.key.peer_id, addrs=tuple(self.p2p.listen_addrs),
            device=Device(c.arch, c.device_name[:128], c.memory_mb), slots=c.slots, models=tuple(self.models),
            power=PowerProfile(c.idle_w, c.busy_w, c.marginal_w_per_slot, c.power_source, c.power_source,
                               c.power_source),
            carbon_g_per_kwh=c.carbon_g_per_kwh, carbon_source=c.carbon_source, price_per_s=c.price_per_s,
            backlog_ms=backlog_ms, issued_at_ms=issued, expires_at_ms=issued + OFFER_TTL_MS,
            execution_provider=self.executor.execution_provider,
        )

    def refresh_offer(self) -> bytes:
        self._signed_offer = sign_offer(self.key, self.build_offer())
        self.book.add(self._signed_offer, now_ms=now_ms())
        return self._signed_offer

    async def _advertise(self, gossip: OfferGossip) -> None:
        while True:
            signed = self.refresh_offer()
            try:
                await self.p2p.publish(OFFERS_TOPIC, signed)
            except (StreamClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.info("publish failed: %s", exc)
            await trio.sleep(OFFER_REFRESH_S)

    async def _announce_to(self, gossip: OfferGossip, peer_id: str) -> None:
        # Push our offer straight to each bootstrap peer on (re)connect: a fresh buyer
        # syncing from it sees us at once, without waiting for the gossip mesh.
        try:
            await gossip.sync_with(peer_id)
            emit("announced", peer_id=self.key.peer_id, to=peer_id)
        except (DecodeError, StreamClosed, trio.TooSlowError) as exc:
            log.info("offer sync with %s failed: %s", peer_id, exc)

    # --- jobs -------------------------------------------------------------------------

    async def _fail(self, stream: FramedStream, code: str, message: str) -> None:
        try:
            await stream.send(encode_message(JobError(code, message[:2048])))
        except (StreamClosed, trio.TooSlowError):
            pass

    async def _serve_job(self, stream: FramedStream) -> None:
        peer = stream.remote_peer_id
        try:
            payload = await stream.receive(max_bytes=MAX_REQUEST_BYTES + 1024, timeout_s=READ_TIMEOUT_S)
            submit = decode_message(payload, max_bytes=MAX_REQUEST_BYTES + 1024, expect=("submit",))
            envelope, request = open_job_request(submit.request)
        except (DecodeError, trio.TooSlowError) as exc:
            self.count("bad-request", peer, exc)
            await self._fail(stream, "bad-request", str(exc))
            return
        except StreamClosed as exc:
            self.count("stream-closed", peer, exc)
            return
        try:
            if request.provider != self.key.public_key:
                raise JobFailed("wrong-provider", "job is addressed to another provider")
            try:
                check_window("job", request.issued_at_ms, request.expires_at_ms, now_ms=now_ms(),
                             max_ttl_ms=3_600_000, max_skew_ms=30_000)
            except ExpiredError as exc:
                raise JobFailed("expired", str(exc)) from None
            if request.job_id in self._seen_jobs:
                raise JobFailed("replay", f"job {request.job_id} was already received")
            self._seen_jobs[request.job_id] = None
            if len(self._seen_jobs) > SEEN_JOBS_MAX:
                self._seen_jobs.popitem(last=False)
            capability = next((m for m in self.models if m.sha256 == request.model_sha256), None)
            if capability is None:
                raise JobFailed("unknown-model", f"model {request.model_sha256} is not offered here")
            expected_price = request.items / capability.items_per_s * self.config.price_per_s
            if expected_price > request.max_price * (1 + 1e-9):
                raise JobFailed("price", f"expected price {expected_price:.6g} exceeds ceiling {request.max_price:.6g}")
            if not self.store.has(request.model_sha256):
                await stream.send(encode_message(NeedModel(request.model_sha256)))
                payload = await stream.receive(max_bytes=MAX_MODEL_BYTES + 1024, timeout_s=120.0)
                blob = decode_message(payload, max_bytes=MAX_MODEL_BYTES + 1024, expect=("model",))
                if blob.sha256 != request.model_sha256:
                    raise JobFailed("model-invalid", "sent a different model than requested")
                self.store.put(blob.sha256, blob.data)
            await self._run_job(stream, peer, request, capability)
        except JobFailed as exc:
            self.count(exc.code, peer, exc)
            await self._fail(stream, exc.code, str(exc))
        except DecodeError as exc:
            self.count("bad-request", peer, exc)
            await self._fail(stream, "bad-request", str(exc))
        except (StreamClosed, trio.TooSlowError) as exc:
            self.count("stream-closed", peer, exc)

    async def _run_job(self, stream: FramedStream, peer: str, request, capability: ModelCapability) -> None:
        received_ms = now_ms()
        self._queued += 1
        try:
            await stream.send(encode_message(Accepted(request.job_id, self._queued - 1)))
            with trio.fail_after(request.timeout_ms / 1000):
                started_ms = now_ms()
                result = await self.executor.run(request.model_sha256, request.inputs)
        except trio.TooSlowError:
            raise JobFailed("timeout", f"job ran past its {request.timeout_ms} ms timeout") from None
        finally:
            self._queued -= 1
        c = self.config
        # A simulated device reports the time its profile implies; the outputs stay real.
        compute_ms = result.compute_ms if c.speed_factor == 1.0 else result.compute_ms / c.speed_factor
        energy_source = c.power_source if c.speed_factor == 1.0 else "simulated"
        energy_j = compute_ms / 1000 * c.marginal_w_per_slot
        price = min(compute_ms / 1000 * c.price_per_s, request.max_price)
        receipt = Receipt(
            job_id=request.job_id, buyer=request.buyer, provider=self.key.public_key,
            model_sha256=request.model_sha256, input_sha256=tensors_sha256(request.inputs),
            output_sha256=tensors_sha256(result.outputs), queue_ms=float(max(0, started_ms - received_ms)),
            compute_ms=compute_ms, energy_j=energy_j, energy_source=energy_source, price=price,
            issued_at_ms=now_ms(), execution_provider=self.executor.execution_provider,
        )
        signed = sign_receipt(self.key, receipt)
        await stream.send(encode_message(JobResult(request.job_id, tuple(result.outputs), signed)))
        emit("job", job_id=request.job_id, buyer=peer, compute_ms=round(compute_ms, 3))
        ack_bytes = None
        accepted = None
        try:
            payload = await stream.receive(max_bytes=MAX_CONTROL_FRAME_BYTES, timeout_s=READ_TIMEOUT_S)
            ack_frame = decode_message(payload, max_bytes=MAX_CONTROL_FRAME_BYTES, expect=("ack",))
            env, ack = open_receipt_ack(ack_frame.ack)
            if env.signer != request.buyer or ack.job_id != request.job_id or \
                    ack.receipt_sha256 != SignedReceipt.parse(signed).body_sha256:
                raise DecodeError("ack does not match this job's receipt or buyer")
            ack_bytes, accepted = ack_frame.ack, ack.accepted
        except (DecodeError, StreamClosed, trio.TooSlowError) as exc:
            self.count("no-ack", peer, exc)
        self.ledger.apply(job_id=request.job_id, role="provider", counterparty=peer, receipt=signed,
                          ack=ack_bytes, accepted=accepted, price=price, energy_j=energy_j,
                          energy_source=energy_source, compute_ms=compute_ms, now_ms=now_ms())

    # --- lifetime ---------------------------------------------------------------------

    async def run(self) -> None:
        self.calibrate()
        async with open_p2p_node(self.seed, self.config.listen) as p2p:
            self.p2p = p2p
            self.refresh_offer()
            gossip = OfferGossip(p2p, self.book, own_offer=lambda: self._signed_offer)
            p2p.set_stream_handler(JOB_PROTOCOL, self._serve_job)
            async with trio.open_nursery() as nursery:
                await nursery.start(gossip.run)
                p2p.keep_connected(self.config.bootstrap,
                                   on_connect=lambda pid: self._announce_to(gossip, pid))
                nursery.start_soon(self._advertise, gossip)
                emit("ready", role="provider", peer_id=p2p.peer_id, addrs=p2p.listen_addrs,
                     models=[m.name for m in self.models])
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        break
                nursery.cancel_scope.cancel()
        self.ledger.close()
        emit("stopped", role="provider", counters=self.counters)
