"""What an attacker sends, for the abuse tests and bench/abuse.py: Sybil offers no honest
provider can match, max-size offers, forged reputation, and jobs from a buyer that never
acks. Real signatures and real streams; only the intent is hostile."""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path

import base58
import numpy as np

from node.gossip import OfferGossip
from node.offers import OfferBook
from node.p2p import open_p2p_node
from protocol.job import BuyerJob, Delivered, Refused
from protocol.messages import Device, JobRequest, ModelCapability, Offer, PowerProfile, sign_offer
from protocol.settlement import ReputationDigest, ReputationEntry, sign_reputation
from protocol.signing import SigningKey, peer_id_from_public_key
from protocol.stream import OfferSync, encode_message
from protocol.tensors import Tensor
from protocol.topics import JOB_PROTOCOL, OFFER_SYNC_PROTOCOL

SQUEEZENET_ROW_BYTES = 3 * 224 * 224 * 4


def now_ms() -> int:
    return int(time.time() * 1000)


def public_key_of(peer_id: str) -> bytes:
    """An Ed25519 peer id embeds its public key (identity multihash): its last 32 bytes."""
    key = base58.b58decode(peer_id)[-32:]
    if peer_id_from_public_key(key) != peer_id:
        raise ValueError(f"{peer_id} is not an Ed25519 peer id")
    return key


def irresistible_offer(key: SigningKey, addrs: tuple[str, ...], model_sha: str, *, pad_models: int = 0) -> bytes:
    """What a Sybil advertises: the model at a speed, power and price no honest provider
    can match; `pad_models=250` makes it about as big as an offer may be (64 KiB)."""
    models = (ModelCapability("squeezenet", model_sha, 1e6, "measured"),) + tuple(
        ModelCapability(f"pad-{i}-" + "x" * 100, f"{i:064x}", 1.0, "declared") for i in range(1, pad_models + 1))
    issued = now_ms()
    return sign_offer(key, Offer(
        provider=key.public_key, peer_id=key.peer_id, addrs=addrs, device=Device("x86_64", "sybil", 1 << 20),
        slots=64, models=models, power=PowerProfile(0.1, 0.2, 0.01, "declared", "declared", "declared"),
        carbon_g_per_kwh=0.0, carbon_source="declared", price_per_s=0.0, backlog_ms=0.0,
        issued_at_ms=issued, expires_at_ms=issued + 60_000))


def forged_digest(providers: list[bytes]) -> bytes:
    """A fresh key's claim of 50 disputes against each of `providers`."""
    key = SigningKey(secrets.token_bytes(32))
    issued = now_ms()
    entries = tuple(ReputationEntry(p, 0, 0, 50) for p in providers)
    return sign_reputation(key, ReputationDigest(key.public_key, entries, issued, issued + 3_600_000))


async def push(p2p, peer_id: str, addr: str, offers: list[bytes], digests: list[bytes] = ()) -> None:
    """Offers and digests pushed in one offer sync, as if they were the pusher's book."""
    async with p2p.open_stream(peer_id, [addr], OFFER_SYNC_PROTOCOL) as stream:
        await stream.send(encode_message(OfferSync(tuple(offers), tuple(digests))))
        await stream.receive(max_bytes=8 << 20, timeout_s=60)


async def connected_sybil(peer_id: str, addr: str, model_sha: str, *, pad_models: int = 0,
                          addrs: tuple[str, ...] | None = None) -> str:
    """A fresh identity that connects, syncs its own irresistible offer, and vanishes."""
    seed = secrets.token_bytes(32)
    async with open_p2p_node(seed, ["/ip4/127.0.0.1/tcp/0"]) as sybil:
        signed = irresistible_offer(SigningKey(seed), addrs or tuple(sybil.listen_addrs), model_sha,
                                    pad_models=pad_models)
        await OfferGossip(sybil, OfferBook(), own_offer=lambda: signed).sync_with(peer_id, [addr])
        return sybil.peer_id


def squeezenet_job(key: SigningKey, provider_peer: str, model: Path, *, rows: int = 1, seed: int = 0) -> BuyerJob:
    """A buyer's machine for one job of `rows` seeded random images (602,112 bytes each)."""
    x = np.random.default_rng(seed).random((rows, 3, 224, 224), dtype=np.float32)
    issued = now_ms()
    model_bytes = model.read_bytes()
    request = JobRequest(secrets.token_hex(16), key.public_key, public_key_of(provider_peer),
                         hashlib.sha256(model_bytes).hexdigest(), "squeezenet", (Tensor.from_array("data_0", x),),
                         rows, 1.0, issued, issued + 600_000)
    return BuyerJob.create(key, request, model_bytes)


async def until_result(stream, job: BuyerJob):
    """Drive `job` on `stream` to its result or refusal: (Delivered, the ack frames not
    yet sent) or (Refused, [])."""
    step = job.start()
    while True:
        event = step.events[0] if step.events else None
        if isinstance(event, (Delivered, Refused)):
            return event, list(step.send)
        for payload in step.send:
            await stream.send(payload, timeout_s=300)
        step = job.receive(await stream.receive(max_bytes=job.max_frame_bytes, timeout_s=300), now_ms=now_ms())


async def job_without_ack(p2p, provider_peer: str, addrs, key: SigningKey, model: Path, *, rows: int = 1,
                          seed: int = 0):
    """One job as a buyer that never acks: (Delivered, the ack frames it withholds) or
    (Refused, [])."""
    job = squeezenet_job(key, provider_peer, model, rows=rows, seed=seed)
    async with p2p.open_stream(provider_peer, addrs, JOB_PROTOCOL) as stream:
        return await until_result(stream, job)
