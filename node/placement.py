"""Where one buyer sends a job, and where it goes when that fails (pure: no clock, no
I/O). The warm client, `submit`'s batches and the devnet simulator (devnet/simulate.py)
all place and re-place through these functions, so the simulator's buyers decide exactly
as the real ones do.

A job is placed by the matcher on the current state: the offers held now (whose backlog
follows each provider's queue) plus the queue our own jobs in flight add there, which
no offer can show yet. A job that fails on one provider is placed again the same way
among the providers not yet tried, up to RETRY_PROVIDERS in all; a provider that
vanished earlier is used only when nobody else can take the job.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from matcher import Job, Problem, Provider, Weights, solve
from protocol.messages import Offer

RETRY_PROVIDERS = 3  # the placed provider and up to two others, per job
# A provider that answers `busy` holds all the request bytes it will (its request
# budget): it is full for now, not failing, so that answer is no try against it. The job
# goes to another provider if one can take it, else back to the busy one once about its
# told queue has drained (BUSY_WAIT_MS bounds that wait); after BUSY_RETRIES busy
# answers a job counts them as tries, so it is never bounced for ever.
BUSY_RETRIES = 6
BUSY_WAIT_MS = (50.0, 1_000.0)
# A batch's jobs placed on one provider slot (a lane) are sent up to this many at a time:
# they wait in the provider's queue back to back, as the matcher assumes, rather than
# each after the previous result (a link round trip between them); a window, not the
# whole lane, so a long batch never floods one provider's request budget (192 MiB by
# default): a lane holds at most LANE_WINDOW_BYTES of requests there.
LANE_WINDOW = 4
LANE_WINDOW_BYTES = 32 << 20


def lane_window(request_bytes: int) -> int:
    """How many of a lane's jobs, each of `request_bytes`, go to the provider at once."""
    return max(1, min(LANE_WINDOW, LANE_WINDOW_BYTES // max(1, request_bytes)))


# What a buyer weighs when it does not say. A job with a deadline has its latency
# requirement in the deadline, so latency only breaks ties: 0.5 J per second of waiting
# (0.0005 J/ms). Without a deadline, the matcher's default: 10 J per second (0.01 J/ms),
# which for a 0.03 J image job means a millisecond saved is worth a third of its energy.
# Measured in `devnet simulate` over the 8 fleet x scenario files of bench/scenarios: with
# 10 J/s our placement used 48-53% more energy than greedy-energy on the mid-range GPU
# fleet (and missed 7 deadlines where greedy-energy missed none); with 0.5 J/s it used the
# same energy as greedy-energy on all 8.
DEADLINE_LATENCY_WEIGHT = 0.0005


def buyer_weights(weights: Weights | None, deadline_ms: float | None) -> Weights:
    """The weights a job is placed with: the buyer's own when it gave them, else the
    deadline-driven default above."""
    if weights is not None:
        return weights
    return Weights(latency=DEADLINE_LATENCY_WEIGHT) if deadline_ms is not None else Weights()


class NoPlacement(Exception):
    """No offer can take the job; the message says why (the matcher's explanation)."""


def offers_to_problem(offers: list[Offer], model_sha: str, items: int | list[int], count: int, max_price: float,
                      weights: Weights, job_ids: list[str], deadline_ms: float | None = None,
                      own_backlog_ms: Mapping[str, float] | None = None) -> Problem:
    """The matcher's view of `offers`. `items`: rows per job (one figure for all, or one
    per job); `own_backlog_ms`: per provider, the queue our own jobs in flight there add
    to what its offer last said."""
    rows = items if isinstance(items, list) else [items] * count
    # The matcher prices a job as rows / throughput; a device that batches (a peak rate)
    # gets the rate a job of these rows sees (jobs of one placement are alike in size).
    typical_rows = max(rows, default=1)
    providers = []
    for offer in offers:
        throughput = {m.sha256: m.rate(typical_rows) for m in offer.models}
        if model_sha not in throughput and offer.open_models_items_per_s:
            throughput[model_sha] = offer.open_models_items_per_s
        providers.append(Provider(
            id=offer.peer_id, arch=offer.device.arch, slots=offer.slots,
            slot_memory_mb=offer.device.memory_mb / offer.slots, marginal_w=offer.power.marginal_w_per_slot,
            carbon_g_per_kwh=offer.carbon_g_per_kwh, rtt_ms=offer.link_rtt_ms or 0.0,
            backlog_ms=offer.backlog_ms + (own_backlog_ms or {}).get(offer.peer_id, 0.0),
            price_per_s=offer.price_per_s, throughput=throughput))
    jobs = tuple(Job(id=job_ids[i], model=model_sha, items=rows[i], max_price=max_price, deadline_ms=deadline_ms)
                 for i in range(count))
    return Problem(tuple(providers), jobs, weights)


def own_backlog_ms(in_flight: Mapping[str, Sequence[float]], slots: Mapping[str, int]) -> dict[str, float]:
    """The queue our jobs in flight (their expected compute ms, per provider) add at each
    provider, spread over its slots."""
    return {pid: sum(jobs) / max(1, slots.get(pid, 1)) for pid, jobs in in_flight.items() if jobs}


def heard_extra_ms(heard: Mapping[str, tuple[float, float]], offers: list[Offer], now_ms: float, *,
                   time_scale: float = 1.0) -> dict[str, float]:
    """The queue providers told us of (with `accepted` and refusals) since their offers
    were signed, aged to now, beyond what those offers say: per provider, the ms to add
    to its offer's backlog. `heard`: provider -> (backlog_ms, when heard, in ms of the
    clock the offers' issued_at_ms use)."""
    out = {}
    for offer in offers:
        said = heard.get(offer.peer_id)
        if said is None or said[1] <= offer.issued_at_ms:
            continue  # the offer is newer than what we heard
        left = said[0] - (now_ms - said[1]) / time_scale
        if left > offer.backlog_ms:
            out[offer.peer_id] = left - offer.backlog_ms
    return out


def known_backlog_ms(in_flight: Mapping[str, Sequence[float]], slots: Mapping[str, int],
                     heard: Mapping[str, tuple[float, float]], offers: list[Offer], now_ms: float, *,
                     time_scale: float = 1.0) -> dict[str, float]:
    """What a buyer adds to each offer's backlog: the queue its own jobs in flight add
    (own_backlog_ms) and what providers told it since (heard_extra_ms)."""
    own = own_backlog_ms(in_flight, slots)
    told = heard_extra_ms(heard, offers, now_ms, time_scale=time_scale)
    return {pid: own.get(pid, 0.0) + told.get(pid, 0.0) for pid in {*own, *told}}


def place_one(offers: list[Offer], *, model_sha: str, items: int, max_price: float, weights: Weights | None,
              solver: str, job_id: str, deadline_ms: float | None,
              own_backlog: Mapping[str, float] | None = None) -> Offer:
    """The matcher's choice for one job among `offers`; NoPlacement says why none fits.
    `weights` None: buyer_weights' default for the deadline. No clock reaches the
    matcher: the same state gives the same choice."""
    problem = offers_to_problem(offers, model_sha, items, 1, max_price, buyer_weights(weights, deadline_ms),
                                [job_id], deadline_ms,
                                own_backlog_ms=own_backlog)
    result = solve(problem, solver=solver)
    if not result.assignments:
        raise NoPlacement(result.unassigned[0].explain if result.unassigned else "no placement")
    chosen = result.assignments[0].provider
    return next(o for o in offers if o.peer_id == chosen)


def busy_wait_ms(backlog_ms: float | None) -> float:
    """How long a job waits before it goes back to a provider that answered busy."""
    low, high = BUSY_WAIT_MS
    return min(max(backlog_ms or 0.0, low), high)


def place_again(offers: list[Offer], *, tried: set[str], vanished: set[str] = frozenset(),
                busy: set[str] = frozenset(), deadline_left_ms: float | None, **terms) -> tuple[Offer, bool]:
    """Where a failed job goes next, and whether its deadline still goes with it.
    `offers`: best established first (what Client.candidates returns); `terms`: the
    rest of place_one's.

    The matcher places it among the providers not yet tried for it (retry_offers),
    except on its last try (RETRY_PROVIDERS), which goes to the most established provider
    left whatever it costs: fresh offers that are too good to be true (a Sybil swarm)
    can take the cheaper tries, never all of them. When no provider can meet what is
    left of the deadline, the job goes without it: a late result is a miss the buyer
    sees, a job given up is a loss it cannot use at all. `busy`: providers that just
    answered busy (not in `tried`), taken again only when nobody else can be."""
    candidates = retry_offers(offers, tried | set(busy), vanished) or retry_offers(offers, tried, vanished)
    if not candidates:
        raise NoPlacement("no provider left that was not tried for this job")
    if len(tried) + 1 >= RETRY_PROVIDERS:
        try:
            return _with_deadline(candidates[:1], deadline_left_ms, terms)
        except NoPlacement:
            pass  # it cannot take this job at all (model, price): the matcher chooses
    return _with_deadline(candidates, deadline_left_ms, terms)


def _with_deadline(offers: list[Offer], deadline_left_ms: float | None, terms: dict) -> tuple[Offer, bool]:
    try:
        return place_one(offers, deadline_ms=deadline_left_ms, **terms), True
    except NoPlacement:
        if deadline_left_ms is None:
            raise
    return place_one(offers, deadline_ms=None, **terms), False


def retry_offers(offers: Iterable[Offer], tried: set[str], vanished: set[str] = frozenset()) -> list[Offer]:
    """The offers a failed job may be placed on next: none already tried for it; one
    whose provider vanished earlier only when there is nothing else."""
    fresh = [o for o in offers if o.peer_id not in tried]
    alive = [o for o in fresh if o.peer_id not in vanished]
    return alive or fresh


def remaining_deadline_ms(deadline_ms: float | None, elapsed_ms: float, rtt_ms: float | None) -> float | None:
    """What a request tells its provider of the deadline: the time left once what has
    passed since the job was submitted and the link's round trip are taken off."""
    if deadline_ms is None:
        return None
    return max(0.0, deadline_ms - elapsed_ms - (rtt_ms or 0.0))
