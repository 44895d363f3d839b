"""Energy-aware micro-batching, the decisions (pure; the warm client does the waiting).

Concurrent small requests for one model may go as one job: their inputs are stacked
along the batch axis, the request names each member's rows (JobRequest.parts), and the
receipt commits to each member's inputs and outputs, so every member gets a share it
can verify alone. It pays only on devices whose runs have a large fixed part, which an
offer says with a peak rate (ModelCapability.peak_items_per_s): on them a job of n rows
costs far less than n jobs of one. So a request waits for company only when some offer
for its model batches, never longer than its deadline allows, and a gathered group goes
as one job only when that lowers the energy per item.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from protocol.messages import MAX_PARTS, Offer
from protocol.tensors import Tensor

from .admission import expected_ms

# Combine only when the group's energy per item is at least this much lower than its
# members' alone: a batch delays its first member and ties every member to one provider.
MIN_BATCH_SAVING = 0.10
MAX_BATCH_ROWS = 256  # rows in one micro-batched job


def energy_per_item_j(offer: Offer, model_sha: str, rows: int) -> float | None:
    """The marginal energy one item costs in a job of `rows` rows on this offer."""
    rate = offer.items_per_s(model_sha, rows)
    return offer.power.marginal_w_per_slot / rate if rate else None


def best_energy_per_item_j(offers: Sequence[Offer], model_sha: str, rows: int) -> float | None:
    figures = [e for o in offers if (e := energy_per_item_j(o, model_sha, rows)) is not None]
    return min(figures, default=None)


def batches_pay(offers: Sequence[Offer], model_sha: str) -> bool:
    """Whether any offer for the model runs batches faster per item (a peak rate): the
    only case where waiting for company can save energy."""
    for offer in offers:
        capability = offer.model(model_sha)
        if capability is not None and capability.peak_items_per_s is not None:
            return True
    return False


def batch_saving(offers: Sequence[Offer], model_sha: str, member_rows: Sequence[int]) -> float:
    """1 - (energy per item of the members as one job) / (their energy per item alone),
    each on the offer best for it; 0 when nothing can be said."""
    total = sum(member_rows)
    together = best_energy_per_item_j(offers, model_sha, total)
    alone = [best_energy_per_item_j(offers, model_sha, rows) for rows in member_rows]
    if together is None or any(a is None for a in alone) or total == 0:
        return 0.0
    alone_per_item = sum(a * rows for a, rows in zip(alone, member_rows)) / total
    return 1.0 - together / alone_per_item if alone_per_item > 0 else 0.0


def combine(member_rows: Sequence[int], offers: Sequence[Offer], model_sha: str) -> bool:
    """Whether a gathered group goes as one job."""
    return (2 <= len(member_rows) <= MAX_PARTS and sum(member_rows) <= MAX_BATCH_ROWS
            and batch_saving(offers, model_sha, member_rows) >= MIN_BATCH_SAVING)


def wait_allowed_ms(window_ms: float, deadline_ms: float | None, offers: Sequence[Offer], model_sha: str,
                    rows: int) -> float:
    """How long a request may wait for company: the window, but at most half of what its
    deadline leaves after the quickest offer would finish it alone; 0 means go now."""
    if deadline_ms is None:
        return window_ms
    finish_ms = [o.backlog_ms + (o.link_rtt_ms or 0.0) + expected_ms(rows, rate)
                 for o in offers if (rate := o.items_per_s(model_sha, rows))]
    if not finish_ms:
        return 0.0
    return max(0.0, min(window_ms, (deadline_ms - min(finish_ms)) / 2))


def group_deadline_ms(members: Sequence[tuple[float | None, float]], start_s: float,
                      time_scale: float = 1.0) -> float | None:
    """The deadline of a group's one job, counted from `start_s` (its first member's
    submission, clock.elapsed_s()): the tightest member's. `members`: each one's
    (deadline_ms or None, submitted_s); a deadline counts from its own member's
    submission, in market ms (wall time over `time_scale`)."""
    return min((deadline + 1000.0 * (submitted_s - start_s) / time_scale
                for deadline, submitted_s in members if deadline is not None), default=None)


def stack_key(tensors: Sequence[Tensor]) -> tuple:
    """Requests whose tensors agree on this stack along the batch axis into one job."""
    return tuple((t.name, t.dtype, t.shape[1:]) for t in tensors)


def stack(members: Sequence[Sequence[Tensor]]) -> tuple[Tensor, ...]:
    """The members' tensors, name by name, stacked along the batch axis in order."""
    first = members[0]
    return tuple(Tensor.from_array(t.name, np.concatenate([m[i].to_array() for m in members], axis=0))
                 for i, t in enumerate(first))


def split(outputs: dict[str, np.ndarray], parts: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """A batched job's outputs cut back into each member's rows."""
    shares, start = [], 0
    for rows in parts:
        shares.append({name: array[start:start + rows] for name, array in outputs.items()})
        start += rows
    return shares
