"""Provider reputation: counts of accepted, rejected and disputed receipts.

A buyer's own ledger is its first source. Signed digests from other buyers travel in
offer sync and, relayed by bootstrap nodes, on gossip at a low rate. A digest is a
claim anyone can sign, so it counts only in proportion to evidence we hold ourselves:
the jobs its issuer settled with us (as buyer or provider), full weight from
`HISTORY_FOR_FULL_WEIGHT` of them. A fresh key weighs nothing, so no number of them can
move a score; each issuer's newest unexpired digest counts, with every count capped.
The score is a smoothed share of good receipts, a dispute weighing like four rejections.
"""

from __future__ import annotations

import logging

from protocol.errors import DecodeError
from protocol.settlement import ReputationDigest, ReputationEntry, open_reputation, sign_reputation
from protocol.signing import SigningKey, peer_id_from_public_key

log = logging.getLogger("idlemesh.reputation")

DIGEST_TTL_MS = 24 * 3600 * 1000
MAX_ISSUERS = 1000
COUNT_CAP_PER_ISSUER = 50      # how much one other buyer's report can weigh, per provider
OTHERS_WEIGHT = 0.5            # others' reports count half as much as our own, at most
HISTORY_FOR_FULL_WEIGHT = 20   # jobs an issuer settled with us before its digest weighs fully
DISPUTE_WEIGHT = 4.0


def score(accepted: float, rejected: float, disputed: float) -> float:
    """In (0, 1]; 0.5 for a provider nobody has seen."""
    return (accepted + 1.0) / (accepted + rejected + DISPUTE_WEIGHT * disputed + 2.0)


class ReputationBook:
    def __init__(self) -> None:
        self.digests: dict[bytes, tuple[ReputationDigest, bytes]] = {}  # issuer -> newest
        self.rejected = 0

    def add(self, signed: bytes, *, now_ms: int) -> bool:
        """Keep a valid digest if it is its issuer's newest; False if dropped."""
        try:
            _, digest = open_reputation(signed)
        except DecodeError as exc:
            self.rejected += 1
            log.info("dropped reputation digest: %s", exc)
            return False
        if digest.expires_at_ms <= now_ms or digest.issued_at_ms > now_ms + 60_000 or \
                digest.expires_at_ms - digest.issued_at_ms > DIGEST_TTL_MS:
            self.rejected += 1
            return False
        held = self.digests.get(digest.issuer)
        if held is not None and held[0].issued_at_ms >= digest.issued_at_ms:
            return False
        if held is None and len(self.digests) >= MAX_ISSUERS:
            return False
        self.digests[digest.issuer] = (digest, signed)
        return True

    def current(self, *, now_ms: int) -> list[bytes]:
        for issuer in [i for i, (d, _) in self.digests.items() if d.expires_at_ms <= now_ms]:
            del self.digests[issuer]
        return [signed for _, signed in self.digests.values()]

    def counts(self, history: dict[str, int], *, exclude_issuer: bytes | None = None) -> dict[str, list[float]]:
        """peer id -> [accepted, rejected, disputed] from others, capped, and weighted by
        `history`: jobs each issuer (by peer id) settled with us."""
        out: dict[str, list[float]] = {}
        for issuer, (digest, _) in self.digests.items():
            weight = OTHERS_WEIGHT * min(1.0, history.get(peer_id_from_public_key(issuer), 0) / HISTORY_FOR_FULL_WEIGHT)
            if issuer == exclude_issuer or weight == 0:
                continue
            for e in digest.entries:
                row = out.setdefault(peer_id_from_public_key(e.provider), [0.0, 0.0, 0.0])
                for i, n in enumerate((e.accepted, e.rejected, e.disputed)):
                    row[i] += weight * min(n, COUNT_CAP_PER_ISSUER)
        return out


def provider_scores(own: dict[str, dict[str, int]], book: ReputationBook | None, me: bytes,
                    history: dict[str, int] | None = None) -> dict[str, float]:
    """Score per provider peer id from our ledger's counts plus others' digests, each
    weighted by the jobs its issuer settled with us (`history`, by peer id)."""
    totals: dict[str, list[float]] = book.counts(history or {}, exclude_issuer=me) if book else {}
    for provider, c in own.items():
        row = totals.setdefault(provider, [0.0, 0.0, 0.0])
        row[0] += c.get("accepted", 0)
        row[1] += c.get("rejected", 0)
        row[2] += c.get("disputed", 0)
    return {p: score(*row) for p, row in totals.items()}


def own_digest(key: SigningKey, own: dict[str, dict[str, int]], keys: dict[str, bytes], *,
               now_ms: int) -> bytes | None:
    """Our ledger's view, signed; None when we have bought nothing yet."""
    entries = tuple(ReputationEntry(keys[p], c.get("accepted", 0), c.get("rejected", 0), c.get("disputed", 0))
                    for p, c in sorted(own.items()) if p in keys)[:512]
    if not entries:
        return None
    return sign_reputation(key, ReputationDigest(key.public_key, entries, now_ms, now_ms + DIGEST_TTL_MS))
