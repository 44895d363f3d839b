"""Exact placement without deadlines: min-cost flow with column generation (pure).

Without deadlines the problem is an assignment of jobs to (provider, k) positions,
k counted from the end of a slot: a job k-th from last delays k-1 jobs, so its cost
there is compute_s * (beta + gamma * k) + delta, and each (provider, k) holds at most
`slots` jobs. The full graph (10,000 jobs x 1,000 providers x k) is far too large, so:

1. start from a sparse graph: each job's L cheapest providers, a few positions each;
2. solve it exactly with OR-tools' min-cost flow;
3. compute dual potentials of that optimum (Bellman-Ford over difference constraints);
4. price every (job, provider, k) arc left out, including the next unused position;
5. add arcs with negative reduced cost and repeat. When none is left, the duals are
   feasible for the full problem, which proves the placement optimal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from ortools.graph.python import min_cost_flow

from .costs import Costs

INITIAL_CANDIDATES = 6
MAX_ROUNDS = 50
INT_COST_TOP = 2.0 ** 34  # scale float costs so the largest arc is about 1.7e10
OVERFLOW_INT_COST = 2 ** 42  # far above any arc; OR-tools refuses costs that could overflow in its sums


@dataclass
class ExactSolution:
    position_of: dict[int, tuple[int, int]]  # job -> (provider, k from last)
    objective: float                          # flow objective in float cost units
    certified: bool
    rounds: int
    arcs: int


def _initial_candidates(cost1: np.ndarray, feasible_rows: np.ndarray, count: int) -> list[np.ndarray]:
    n_prov = cost1.shape[1]
    if n_prov <= count:
        return [np.flatnonzero(np.isfinite(row)) for row in cost1[feasible_rows]]
    part = np.argpartition(cost1[feasible_rows], count - 1, axis=1)[:, :count]
    out = []
    for row, cand in zip(cost1[feasible_rows], part):
        out.append(cand[np.isfinite(row[cand])])
    return out


def solve_exact(costs: Costs, jobs: np.ndarray, allowed: np.ndarray | None = None) -> ExactSolution:
    """Optimal placement of `jobs` (indices), each allowed where `allowed` (J x P) is true."""
    allowed = costs.feasible if allowed is None else allowed
    n = len(jobs)
    if n == 0:
        return ExactSolution({}, 0.0, True, 0, 0)
    slots = costs.slots
    n_prov = len(slots)
    with np.errstate(invalid="ignore"):
        cost1 = np.where(allowed[jobs], costs.cost_at(jobs[:, None], np.arange(n_prov)[None, :], 1), np.inf)
    candidates = [set(c.tolist()) for c in _initial_candidates(cost1, np.arange(n), INITIAL_CANDIDATES)]
    # Enough positions for an even spread, and for each provider's first-choice jobs.
    best = np.argmin(cost1, axis=1)
    first_choice = np.bincount(best, minlength=n_prov)
    spread = math.ceil(n / max(1, int(slots.sum()))) + 1
    depth = np.minimum(np.maximum(spread, -(-first_choice // slots) + 1), 2 * spread + 2).astype(np.int64)

    rounds = 0
    while True:
        rounds += 1
        # --- the sparse graph ---------------------------------------------------------
        offsets = np.concatenate([[0], np.cumsum(depth)])
        n_pos = int(offsets[-1])
        arc_job, arc_prov = [], []
        for local, cand in enumerate(candidates):
            for p in cand:
                arc_job.append(local)
                arc_prov.append(p)
        arc_job = np.array(arc_job, dtype=np.int64)
        arc_prov = np.array(arc_prov, dtype=np.int64)
        reps = depth[arc_prov]
        a_job = np.repeat(arc_job, reps)
        a_prov = np.repeat(arc_prov, reps)
        a_k = np.arange(len(a_job)) - np.repeat(np.cumsum(reps) - reps, reps) + 1
        a_cost = costs.cost_at(jobs[a_job], a_prov, a_k)
        a_pos = offsets[a_prov] + a_k - 1

        scale = INT_COST_TOP / max(float(np.max(np.abs(a_cost))), 1e-30)
        flow = min_cost_flow.SimpleMinCostFlow()
        sink = n + n_pos
        # Each job may also overflow straight to the sink at a prohibitive cost, so the
        # sparse graph is always feasible; pricing then adds the positions it lacked.
        starts = np.concatenate([a_job, n + np.arange(n_pos), np.arange(n)])
        ends = np.concatenate([n + a_pos, np.full(n_pos, sink), np.full(n, sink)])
        pos_prov = np.repeat(np.arange(n_prov), depth)
        caps = np.concatenate([np.ones(len(a_job), dtype=np.int64), slots[pos_prov], np.ones(n, dtype=np.int64)])
        unit = np.concatenate([np.rint(a_cost * scale).astype(np.int64), np.zeros(n_pos, dtype=np.int64),
                               np.full(n, OVERFLOW_INT_COST, dtype=np.int64)])
        arcs = flow.add_arcs_with_capacity_and_unit_cost(starts, ends, caps, unit)
        supplies = np.zeros(sink + 1, dtype=np.int64)
        supplies[:n] = 1
        supplies[sink] = -n
        flow.set_nodes_supplies(np.arange(sink + 1), supplies)
        status = flow.solve()
        if status != flow.OPTIMAL:
            raise RuntimeError(f"min-cost flow ended with status {status}")
        flows = flow.flows(arcs[: len(a_job)])
        used = flows > 0
        # Overflowed jobs sit on a virtual position (index n_pos) whose dual is 0.
        job_pos = np.full(n, n_pos, dtype=np.int64)
        job_pos[a_job[used]] = a_pos[used]
        job_cost = np.full(n, OVERFLOW_INT_COST / scale)
        job_cost[a_job[used]] = a_cost[used]
        overflowed = int(np.sum(job_pos == n_pos))
        fill = np.bincount(job_pos, minlength=n_pos + 1)[:n_pos]

        # --- duals: v over positions (<= 0, 0 where not full), u_j = cost_j - v[pos_j] ---
        v = np.zeros(n_pos + 1)
        other = ~used
        src = job_pos[a_job[other]]
        dst = a_pos[other]
        w = a_cost[other] - job_cost[a_job[other]]
        order = np.argsort(dst, kind="stable")
        src, dst, w = src[order], dst[order], w[order]
        if len(dst):
            starts_idx = np.flatnonzero(np.r_[True, dst[1:] != dst[:-1]])
            targets = dst[starts_idx]
            for _ in range(n_pos + 1):
                relaxed = np.minimum.reduceat(v[src] + w, starts_idx)
                new_v = v.copy()
                new_v[targets] = np.minimum(v[targets], relaxed)
                if np.array_equal(new_v, v):
                    break
                v = new_v
        eps = 1e-9 * max(1.0, float(np.max(np.abs(a_cost))))
        v[n_pos] = 0.0
        duals_ok = overflowed == 0 and not np.any((v[:n_pos] < -eps) & (fill < slots[pos_prov]))
        u = job_cost - v[job_pos]
        v = v[:n_pos]

        # --- pricing: every allowed (job, provider, k <= depth+1) ---------------------
        v_full = np.zeros(n_pos + n_prov)  # one extra, empty position per provider: v = 0
        v_full[:n_pos] = v
        worst_v = np.zeros(n_prov)
        np.minimum.at(worst_v, pos_prov, v)
        with np.errstate(invalid="ignore"):
            screen = cost1 - u[:, None] + worst_v[None, :]  # lower bound over k
        suspects = np.argwhere(screen < -eps)
        added = 0
        if len(suspects):
            sj, sp = suspects[:, 0], suspects[:, 1]
            best_red = np.full(len(sj), np.inf)
            best_k = np.zeros(len(sj), dtype=np.int64)
            for k in range(1, int(depth[sp].max()) + 2):
                live = k <= depth[sp] + 1
                idx = np.where(k <= depth[sp], offsets[sp] + k - 1, n_pos + sp)
                red = costs.cost_at(jobs[sj], sp, k) - u[sj] - v_full[idx]
                better = live & (red < best_red)
                best_red[better] = red[better]
                best_k[better] = k
            bad = best_red < -eps
            for j_local, p, k in zip(sj[bad], sp[bad], best_k[bad]):
                if p not in candidates[j_local]:
                    candidates[j_local].add(int(p))
                    added += 1
                if k > depth[p]:
                    depth[p] += max(1, depth[p] // 2)
                    added += 1
        if added == 0 or rounds >= MAX_ROUNDS:
            position_of = {}
            for local in range(n):
                q = job_pos[local]
                if q == n_pos:  # still overflowing after MAX_ROUNDS: its cheapest provider, at the back
                    p = int(np.argmin(cost1[local]))
                    depth[p] += 1
                    position_of[int(jobs[local])] = (p, int(depth[p]))
                    continue
                p = int(pos_prov[q])
                position_of[int(jobs[local])] = (p, int(q - offsets[p] + 1))
            return ExactSolution(position_of, float(job_cost.sum()), duals_ok and added == 0,
                                 rounds, len(a_job))


def placement_from_positions(position_of: dict[int, tuple[int, int]], slots: np.ndarray,
                             tie_key) -> dict[int, list[list[int]]]:
    """Turn (provider, k from last) into slots in run order; ties broken by `tie_key(job)`."""
    by_provider: dict[int, dict[int, list[int]]] = {}
    for j, (p, k) in position_of.items():
        by_provider.setdefault(p, {}).setdefault(k, []).append(j)
    placement: dict[int, list[list[int]]] = {}
    for p, by_k in by_provider.items():
        lanes: list[list[tuple[int, int]]] = [[] for _ in range(int(slots[p]))]
        for k in sorted(by_k):
            for s, j in enumerate(sorted(by_k[k], key=tie_key)):
                lanes[s].append((k, j))
        # Within a slot the job farthest from the end runs first.
        placement[p] = [[j for k, j in sorted(lane, key=lambda kj: -kj[0])] for lane in lanes if lane]
    return placement
