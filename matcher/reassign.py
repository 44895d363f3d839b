"""Deadline-aware reassignment on the relaxation's positions (pure; no I/O here).

The flow without deadlines (exact.py) gives every slot its jobs and so every position
(provider, k from the end) a start time. Its schedule misses deadlines where a job
waits too long; repairing it job by job keeps its choice of which jobs share a
provider, and so keeps its mistakes. Here the positions stay (as many per provider
and k as the relaxation used) and every job is assigned again, by one more min-cost
flow, to positions whose start time lets it finish by its deadline:

- start(p, k): the latest start of the k-th position from the end over p's slots
  (late, so a job that fits there fits in any of them); it falls as k grows;
- a job may take (p, k) when start(p, k) + its compute time on p meets its deadline,
  i.e. for k at least some k_min(j, p); the cost is the relaxation's own;
- arcs: each job's REASSIGN_PROVIDERS cheapest providers at their k_min, and on each
  REASSIGN_WINDOW positions from k_min on (deeper ones cost more);
- a job no arc takes stays out, for the repair to place.

Start times move once jobs change places, so the result still goes through the
repair (Smith's rule, late jobs re-inserted) and the local search; it is a better
start for them, not a schedule that is sure to meet every deadline.
"""

from __future__ import annotations

import math

import numpy as np
from ortools.graph.python import min_cost_flow

from .costs import Costs
from .exact import INT_COST_TOP, placement_from_positions
from .result import Placement

REASSIGN_PROVIDERS = 30   # cheapest providers per job that get arcs
REASSIGN_WINDOW = 15      # positions per provider from the first that meets the job's deadline
REASSIGN_MAX_ARCS = 1_000_000  # beyond this (jobs x providers x window), both shrink alike: the flow's time grows with it
TIME_TOLERANCE_MS = 1e-9


def reassign(costs: Costs, placement: Placement, allowed: np.ndarray, jobs: np.ndarray,
             tie_rank: np.ndarray) -> tuple[Placement, list[int]]:
    """`jobs` (indices) assigned again to `placement`'s positions where their deadlines
    allow. Returns (placement, jobs left out)."""
    n_prov = len(costs.slots)
    depth = np.zeros(n_prov, dtype=np.int64)
    for p, lanes in placement.items():
        depth[p] = max((len(lane) for lane in lanes), default=0)
    offsets = np.concatenate([[0], np.cumsum(depth)])
    n_pos = int(offsets[-1])
    if not n_pos or not len(jobs):
        return {}, [int(j) for j in jobs]
    capacity = np.zeros(n_pos, dtype=np.int64)
    start_ms = np.full(n_pos, -np.inf)
    for p, lanes in placement.items():
        for lane in lanes:
            if not lane:
                continue
            finish = costs.rtt_backlog_ms[p] + np.cumsum(1000.0 * costs.compute_s[lane, p])
            starts = np.r_[costs.rtt_backlog_ms[p], finish[:-1]][::-1]  # k = 1, 2, ... from the end
            at = offsets[p] + np.arange(len(lane))
            capacity[at] += 1
            np.maximum.at(start_ms, at, starts)

    # k_min per (job, provider): start(p, k) falls with k, so count the positions that start too late.
    compute_ms = 1000.0 * costs.compute_s[jobs]
    with np.errstate(invalid="ignore"):  # inf - inf where a model is not offered: such pairs are never allowed
        room_ms = costs.deadline_ms[jobs][:, None] - compute_ms + TIME_TOLERANCE_MS  # latest start that meets the deadline
    k_min = np.full((len(jobs), n_prov), n_pos + 1, dtype=np.int64)  # past any depth: providers without positions
    for p in np.flatnonzero(depth).tolist():
        later_first = -start_ms[offsets[p]:offsets[p + 1]]  # increasing in k
        k_min[:, p] = np.searchsorted(later_first, -room_ms[:, p], side="left") + 1
    ok = allowed[jobs] & (k_min <= depth[None, :])
    with np.errstate(invalid="ignore"):
        first_cost = np.where(ok, costs.compute_s[jobs] * (costs.beta[None, :] + costs.gamma * k_min)
                              + costs.delta[None, :], np.inf)
    shrink = min(1.0, math.sqrt(REASSIGN_MAX_ARCS / (len(jobs) * REASSIGN_PROVIDERS * REASSIGN_WINDOW)))
    n_best = min(max(1, int(REASSIGN_PROVIDERS * shrink)), n_prov)
    window = max(1, int(REASSIGN_WINDOW * shrink))
    best_prov = (np.argpartition(first_cost, n_best - 1, axis=1)[:, :n_best] if n_best < n_prov
                 else np.broadcast_to(np.arange(n_prov), (len(jobs), n_prov)))
    row = np.repeat(np.arange(len(jobs)), best_prov.shape[1])
    prov = best_prov.ravel()
    keep = np.isfinite(first_cost[row, prov])
    row, prov = row[keep], prov[keep]
    k = k_min[row, prov][:, None] + np.arange(window)[None, :]
    row, prov, k = np.repeat(row, window), np.repeat(prov, window), k.ravel()
    keep = k <= depth[prov]
    row, prov, k = row[keep], prov[keep], k[keep]
    job = jobs[row]
    arc_cost = costs.compute_s[job, prov] * (costs.beta[prov] + costs.gamma * k) + costs.delta[prov]
    if not len(arc_cost):
        return {}, [int(j) for j in jobs]

    flow = min_cost_flow.SimpleMinCostFlow()
    n_jobs = len(jobs)
    sink = n_jobs + n_pos
    scale = INT_COST_TOP / max(float(arc_cost.max()), 1e-30)
    # A job may also stay out, at a cost above any placement, so the flow always exists.
    left_out_cost = np.int64(INT_COST_TOP) * 4
    tails = np.concatenate([row, n_jobs + np.arange(n_pos), np.arange(n_jobs)])
    heads = np.concatenate([n_jobs + offsets[prov] + k - 1, np.full(n_pos, sink), np.full(n_jobs, sink)])
    caps = np.concatenate([np.ones(len(row), dtype=np.int64), capacity, np.ones(n_jobs, dtype=np.int64)])
    unit = np.concatenate([np.rint(arc_cost * scale).astype(np.int64), np.zeros(n_pos, dtype=np.int64),
                           np.full(n_jobs, left_out_cost)])
    arcs = flow.add_arcs_with_capacity_and_unit_cost(tails, heads, caps, unit)
    supplies = np.zeros(sink + 1, dtype=np.int64)
    supplies[:n_jobs] = 1
    supplies[sink] = -n_jobs
    flow.set_nodes_supplies(np.arange(sink + 1), supplies)
    status = flow.solve()
    if status != flow.OPTIMAL:
        raise RuntimeError(f"min-cost flow ended with status {status}")
    used = flow.flows(arcs[: len(row)]) > 0
    placed = set(job[used].tolist())
    out = placement_from_positions(job[used], prov[used], k[used], costs.slots, tie_rank)
    return out, [int(j) for j in jobs if int(j) not in placed]
