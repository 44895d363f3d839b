"""Exact placement without deadlines: min-cost flow with column generation (pure).

Without deadlines the problem is an assignment of jobs to positions (p, k), k counted
from the end of a slot: a job k-th from last delays k-1 jobs, so its cost there is
compute_s * (beta_p + gamma * k) + delta_p, and each position holds at most `slots_p`
jobs. The full graph (10,000 jobs x 1,000 providers x k) is far too large, so:

0. jobs with the same model, allowed providers and item count are interchangeable:
   each such class is one flow node whose supply is its size;
1. a greedy pass (largest jobs first, each to its cheapest next position) estimates how
   deep every provider gets; each class starts with arcs around its jobs' greedy
   positions and around where they would sit on their few cheapest other providers;
2. OR-tools' min-cost flow solves that sparse graph exactly;
3. dual potentials of that optimum come from Bellman-Ford over the residual graph;
4. pricing checks every allowed (class, provider, k) at once per group of classes (same
   model, same allowed providers): within a group a class's cost at a position is
   items * slope + intercept, so the most negative reduced cost at each position is a
   query on the upper convex hull of the group's (items, dual) points;
5. arcs with negative reduced cost join, arcs far from tight leave, and the flow is
   solved again. When pricing finds nothing the duals are feasible for the full
   problem, which proves the placement optimal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from ortools.graph.python import min_cost_flow

from .costs import Costs

DENSE_PRICING_CELLS = 200_000  # groups up to this many (class, position) pairs are priced directly
PRICE_TOP = 2             # columns per class and per position that dense pricing adds
PRICE_WINDOW = 4          # jobs either side (in size order) of each position's best, priced too
INITIAL_K_SPREAD = 3      # positions either side of a job's greedy one it starts with
WINDOW_PER_SLOT = 3       # jobs per slot each estimated position starts with arcs to
MAX_ROUNDS = 60
KEEP_REDUCED = 0.01       # columns whose reduced cost exceeds this share of their class's dual are dropped
INT_COST_TOP = 2.0 ** 31  # the largest arc's integer cost: finer makes cost scaling slower, coarser makes ties that slow the duals
K_LIMIT = 1 << 20         # positions per provider, for packing (job, provider, k) into one int64


@dataclass
class ExactSolution:
    position_of: dict[int, tuple[int, int]]  # job -> (provider, k from last)
    objective: float                          # flow objective in float cost units
    certified: bool
    rounds: int
    arcs: int


def _greedy_positions(costs: Costs, allowed: np.ndarray, compute: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest jobs first, each to the position that costs it least now. A job placed
    later is smaller, so it runs in front of the jobs already there: its k is the
    provider's fill / slots + 1 and it delays none of them. Returns (provider, k)."""
    n, n_prov = compute.shape
    slots = costs.slots
    masked = np.where(allowed, compute, np.inf)
    fill = np.zeros(n_prov, dtype=np.int64)
    multiplier = costs.beta + costs.gamma  # cost per compute-second at each next position
    prov = np.zeros(n, dtype=np.int64)
    k_of = np.zeros(n, dtype=np.int64)
    with np.errstate(invalid="ignore"):
        for j in np.argsort(-masked.min(axis=1), kind="stable").tolist():
            p = int(np.argmin(masked[j] * multiplier + costs.delta))
            prov[j] = p
            k_of[j] = fill[p] // slots[p] + 1
            fill[p] += 1
            multiplier[p] = costs.beta[p] + costs.gamma * (fill[p] // slots[p] + 1)
    return prov, k_of


def _upper_hull(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the upper convex hull of points (x, y), left to right, and the slopes of
    its edges (decreasing). For a query s, max over points of y - s*x sits at hull vertex
    number count(edge slopes > s)."""
    order = np.lexsort((-y, x))
    keep = np.r_[True, x[order][1:] != x[order][:-1]]  # highest y for each x
    order = order[keep]
    hull: list[int] = []
    xs, ys = x.tolist(), y.tolist()
    for i in order.tolist():
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or under the segment a -> i
            if (ys[b] - ys[a]) * (xs[i] - xs[a]) <= (ys[i] - ys[a]) * (xs[b] - xs[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    h = np.array(hull, dtype=np.int64)
    slopes = np.diff(y[h]) / np.diff(x[h]) if len(h) > 1 else np.zeros(0)
    return h, slopes


def _job_groups(costs: Costs, jobs: np.ndarray, allowed: np.ndarray) -> list[np.ndarray]:
    """Jobs with the same model and the same allowed providers, as local index arrays."""
    packed = np.packbits(allowed, axis=1)
    key = np.concatenate([costs.job_model[jobs].astype("<i8").view(np.uint8).reshape(len(jobs), 8), packed], axis=1)
    _, inverse = np.unique(np.ascontiguousarray(key).view(np.dtype((np.void, key.shape[1]))).ravel(),
                           return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.r_[True, np.diff(inverse[order]) != 0, True])
    return [order[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]


def _price_group(costs: Costs, g: np.ndarray, provs: np.ndarray, model: int, items: np.ndarray,
                 u: np.ndarray, v: np.ndarray, depth: np.ndarray, offsets: np.ndarray, n_pos: int,
                 eps: float) -> np.ndarray:
    """Columns with negative reduced cost for the jobs `g` (one model, allowed on `provs`),
    as packed keys: for each job its cheapest position, for each position its cheapest
    jobs. Exact minima, so finding none proves the group's duals feasible."""
    n_prov = len(depth)
    reps = depth[provs] + 1  # positions (p, k) for k <= depth_p + 1; deeper ones cost more at dual 0
    q_prov = np.repeat(provs, reps)
    q_k = np.arange(len(q_prov)) - np.repeat(np.cumsum(reps) - reps, reps) + 1
    q_v = np.where(q_k <= depth[q_prov], v[np.minimum(offsets[q_prov] + q_k - 1, n_pos)], 0.0)
    # Within the group a job's reduced cost at position q is items * slope_q + intercept_q - u_j.
    slope = costs.seconds_per_item[model, q_prov] * (costs.beta[q_prov] + costs.gamma * q_k)
    intercept = costs.delta[q_prov] - q_v
    if len(g) * len(q_prov) <= DENSE_PRICING_CELLS:
        red = items[g][:, None] * slope[None, :] + intercept[None, :] - u[g][:, None]
        # Each class's few cheapest positions and each position's few cheapest classes:
        # more than the single best, so fewer rounds are needed.
        top_q = min(PRICE_TOP, red.shape[1])
        top_j = min(PRICE_TOP, red.shape[0])
        by_job = np.argpartition(red, top_q - 1, axis=1)[:, :top_q]
        by_pos = np.argpartition(red, top_j - 1, axis=0)[:top_j, :]
        pick_j = np.concatenate([np.repeat(np.arange(len(g)), top_q), by_pos.ravel()])
        pick_q = np.concatenate([by_job.ravel(), np.tile(np.arange(len(q_prov)), top_j)])
        bad = red[pick_j, pick_q] < -eps
        return (g[pick_j[bad]] * n_prov + q_prov[pick_q[bad]]) * K_LIMIT + q_k[pick_q[bad]]
    out = []
    # Job side: each job's cheapest position, on the lower hull of the points
    # (slope, intercept), i.e. the upper hull of (slope, -intercept).
    # Past a provider's first position with dual 0, every position has the same
    # intercept and a steeper slope, so none of them is any job's cheapest: skip them.
    zero = np.flatnonzero(q_v == 0.0)
    keep = np.ones(len(q_prov), dtype=bool)
    keep[zero] = False
    keep[zero[np.unique(q_prov[zero], return_index=True)[1]]] = True
    candidates = np.flatnonzero(keep)
    q_hull, q_edge = _upper_hull(slope[candidates], -intercept[candidates])
    q_hull = candidates[q_hull]
    at = np.searchsorted(-q_edge, -items[g], side="left")
    for shift in (0, -1, 1):
        q = q_hull[np.clip(at + shift, 0, len(q_hull) - 1)]
        bad = items[g] * slope[q] + intercept[q] - u[g] < -eps
        out.append((g[bad] * n_prov + q_prov[q[bad]]) * K_LIMIT + q_k[q[bad]])
    # Position side: each position's cheapest job, on the upper hull of the points
    # (items, u): the vertex maximising u - slope * items.
    hull, edge = _upper_hull(items[g], u[g])
    best = g[hull[np.searchsorted(-edge, -slope, side="left")]]
    neg = items[best] * slope + intercept - u[best] < -eps
    if neg.any():
        # Jobs of about the same size tend to want the same position: price a few either
        # side of the best in size order too, so fewer rounds are needed.
        by_size = g[np.argsort(items[g], kind="stable")]
        rank = np.searchsorted(items[by_size], items[best[neg]], side="left")
        near = np.concatenate([best[neg][:, None], by_size[np.clip(
            rank[:, None] + np.arange(-PRICE_WINDOW, PRICE_WINDOW + 1), 0, len(g) - 1)]], axis=1)
        q_at = np.flatnonzero(neg)[:, None]
        bad = items[near] * slope[q_at] + intercept[q_at] - u[near] < -eps
        q_of = np.broadcast_to(q_at, near.shape)[bad]
        out.append((near[bad] * n_prov + q_prov[q_of]) * K_LIMIT + q_k[q_of])
    return np.concatenate(out)


def _relax_duals(src: np.ndarray, dst: np.ndarray, w: np.ndarray, n_pos: int) -> np.ndarray:
    """The largest v <= 0 with v[dst] <= v[src] + w on every edge: Bellman-Ford from 0,
    each pass relaxing every target at once over one edge per (src, dst) pair, the
    cheapest (many classes give the same pair)."""
    v = np.zeros(n_pos + 1)
    if not len(src):
        return v
    order = np.lexsort((w, src, dst))  # by target, then source, cheapest first
    src, dst, w = src[order], dst[order], w[order]
    first = np.r_[True, (dst[1:] != dst[:-1]) | (src[1:] != src[:-1])]
    src, dst, w = src[first], dst[first], w[first]
    starts = np.flatnonzero(np.r_[True, dst[1:] != dst[:-1]])
    targets = dst[starts]
    for _ in range(n_pos + 1):
        relaxed = np.minimum.reduceat(v[src] + w, starts)
        improved = relaxed < v[targets]
        if not improved.any():
            break
        v[targets[improved]] = relaxed[improved]
    return v


def _classes(items: np.ndarray, groups: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]:
    """Jobs of one group with the same item count are interchangeable: one flow node each.
    Returns class_of (per local job), each group's classes, class items, class sizes."""
    class_of = np.zeros(len(items), dtype=np.int64)
    group_classes, class_items = [], []
    offset = 0
    for g in groups:
        values, inverse = np.unique(items[g], return_inverse=True)
        class_of[g] = offset + inverse
        group_classes.append(np.arange(offset, offset + len(values)))
        class_items.append(values)
        offset += len(values)
    class_items = np.concatenate(class_items) if class_items else np.zeros(0)
    return class_of, group_classes, class_items, np.bincount(class_of, minlength=offset)


def solve_exact(costs: Costs, jobs: np.ndarray, allowed: np.ndarray | None = None) -> ExactSolution:
    """Optimal placement of `jobs` (indices), each allowed where `allowed` (J x P) is true."""
    allowed = (costs.feasible if allowed is None else allowed)[jobs]
    n = len(jobs)
    if n == 0:
        return ExactSolution({}, 0.0, True, 0, 0)
    slots = costs.slots
    n_prov = len(slots)
    compute = costs.compute_s[jobs]
    items = costs.items[jobs]

    # --- initial columns, per job, then per class -------------------------------------
    greedy_prov, greedy_k = _greedy_positions(costs, allowed, compute)
    greedy_depth = np.zeros(n_prov, dtype=np.int64)
    np.maximum.at(greedy_depth, greedy_prov, greedy_k)
    groups = _job_groups(costs, jobs, allowed)
    group_prov = [np.flatnonzero(allowed[g[0]]) for g in groups]
    group_model = [int(costs.job_model[jobs[g[0]]]) for g in groups]
    class_of, group_classes, class_items, class_size = _classes(items, groups)
    n_cls = len(class_size)
    class_model = np.repeat(group_model, [len(c) for c in group_classes])
    # (a) Around each job's greedy position.
    spread = np.arange(-INITIAL_K_SPREAD, INITIAL_K_SPREAD + 1)
    seed_k = np.repeat(greedy_k, len(spread)) + np.tile(spread, n)
    seeds = [((np.repeat(class_of, len(spread)) * n_prov + np.repeat(greedy_prov, len(spread))) * K_LIMIT
              + seed_k)[seed_k >= 1]]
    # (b) From each position: on a provider the biggest jobs run last, so position k of
    # p's greedy depth takes jobs around the matching size quantile of each group.
    for g, provs in zip(groups, group_prov):
        provs = provs[greedy_depth[provs] > 0]
        if not len(provs):
            continue
        ranked = class_of[g[np.argsort(-items[g], kind="stable")]]
        reps = greedy_depth[provs]
        q_prov = np.repeat(provs, reps)
        q_k = np.arange(len(q_prov)) - np.repeat(np.cumsum(reps) - reps, reps) + 1
        centre = np.floor((q_k - 0.5) / greedy_depth[q_prov] * len(g)).astype(np.int64)
        half = max(1, math.ceil(WINDOW_PER_SLOT * int(slots[provs].max()) * len(g) / n / 2))
        spots = np.clip(centre[:, None] + np.arange(-half, half + 1), 0, len(g) - 1)
        seeds.append(((ranked[spots] * n_prov + q_prov[:, None]) * K_LIMIT + q_k[:, None]).ravel())
    columns = np.unique(np.concatenate(seeds))
    # Positions exist a little past the greedy depth, so pricing can fill them in one round.
    depth = greedy_depth + greedy_depth // 4 + 1

    rounds = 0
    while True:
        rounds += 1
        a_k = columns % K_LIMIT
        a_prov = (columns // K_LIMIT) % n_prov
        a_cls = columns // K_LIMIT // n_prov
        np.maximum.at(depth, a_prov, a_k)
        offsets = np.concatenate([[0], np.cumsum(depth)])
        n_pos = int(offsets[-1])
        pos_prov = np.repeat(np.arange(n_prov), depth)
        a_pos = offsets[a_prov] + a_k - 1
        a_cost = (class_items[a_cls] * costs.seconds_per_item[class_model[a_cls], a_prov]
                  * (costs.beta[a_prov] + costs.gamma * a_k) + costs.delta[a_prov])

        # --- the sparse flow: classes -> positions -> sink ---------------------------
        scale = INT_COST_TOP / max(float(np.max(np.abs(a_cost))), 1e-30)
        a_int = np.rint(a_cost * scale).astype(np.int64)
        # Duals are computed on the rounded costs the flow optimised, so no float
        # rounding can show up as a negative cycle; pricing allows for the rounding.
        a_cost_r = a_int / scale
        a_cap = class_size[a_cls]
        flow = min_cost_flow.SimpleMinCostFlow()
        sink = n_cls + n_pos
        # The greedy's own positions are columns and columns carrying flow are never
        # dropped, so this graph always has a flow that places every job.
        starts = np.concatenate([a_cls, n_cls + np.arange(n_pos)])
        ends = np.concatenate([n_cls + a_pos, np.full(n_pos, sink)])
        caps = np.concatenate([a_cap, slots[pos_prov]])
        unit = np.concatenate([a_int, np.zeros(n_pos, dtype=np.int64)])
        # OR-tools' cost scaling runs about a third faster on arcs in no particular
        # order than grouped by tail; a fixed shuffle keeps the result deterministic.
        shuffle = np.random.default_rng(len(starts)).permutation(len(starts))
        arcs = np.empty(len(starts), dtype=np.int64)
        arcs[shuffle] = flow.add_arcs_with_capacity_and_unit_cost(starts[shuffle], ends[shuffle], caps[shuffle],
                                                                  unit[shuffle])
        supplies = np.zeros(sink + 1, dtype=np.int64)
        supplies[:n_cls] = class_size
        supplies[sink] = -n
        flow.set_nodes_supplies(np.arange(sink + 1), supplies)
        status = flow.solve()
        if status != flow.OPTIMAL:
            raise RuntimeError(f"min-cost flow ended with status {status}")
        all_flows = flow.flows(arcs)
        a_flow = all_flows[: len(a_cls)]
        fill = all_flows[len(a_cls):]

        # --- duals: v over positions (<= 0, 0 where not full), u_c = cost - v[pos] of a
        # used arc. v[n_pos] = 0 stands for every position past a provider's depth.
        # The largest v with v[t] <= v[s] + cost(c, t) - cost(c, s) for each arc c -> s
        # carrying flow and each other arc c -> t with room left: Bellman-Ford from 0.
        used = a_flow > 0
        s_cls, s_pos, s_cost = a_cls[used], a_pos[used], a_cost_r[used]
        room = a_flow < a_cap
        t_cls, t_pos, t_cost = a_cls[room], a_pos[room], a_cost_r[room]  # columns are sorted by class
        t_start = np.searchsorted(t_cls, np.arange(n_cls), side="left")
        t_count = np.searchsorted(t_cls, np.arange(n_cls), side="right") - t_start
        per_source = t_count[s_cls]
        pair_s = np.repeat(np.arange(len(s_cls)), per_source)
        pair_t = (np.repeat(t_start[s_cls] - np.cumsum(per_source) + per_source, per_source)
                  + np.arange(len(pair_s)))
        keep = t_pos[pair_t] != s_pos[pair_s]
        src, dst = s_pos[pair_s[keep]], t_pos[pair_t[keep]]
        w = t_cost[pair_t[keep]] - s_cost[pair_s[keep]]
        v = _relax_duals(src, dst, w, n_pos)
        max_cost = float(np.max(np.abs(a_cost)))
        eps = 1e-9 * max(1.0, max_cost) + 2.0 / scale
        v[n_pos] = 0.0
        duals_ok = not np.any((v[:n_pos] < -eps) & (fill < slots[pos_prov]))
        u = np.full(n_cls, np.inf)
        np.minimum.at(u, s_cls, s_cost - v[s_pos])

        # Columns far from tight leave the graph, so each flow stays small; pricing
        # covers every column, deleted or not, so the certificate is unaffected.
        reduced = a_cost_r - u[a_cls] - v[a_pos]
        columns = columns[used | (reduced < KEEP_REDUCED * np.abs(u[a_cls]))]

        # --- pricing over every allowed (class, provider, k), group by group -----------
        new_cols = [_price_group(costs, cls, provs, model, class_items, u, v, depth, offsets, n_pos, eps)
                    for cls, provs, model in zip(group_classes, group_prov, group_model) if len(provs)]
        added = 0
        if new_cols:
            fresh = np.unique(np.concatenate(new_cols))
            at = np.minimum(np.searchsorted(columns, fresh), len(columns) - 1)
            fresh = fresh[columns[at] != fresh]
            added = len(fresh)
            columns = np.sort(np.concatenate([columns, fresh]))
            # A provider wanted one position past its depth: grow it by a quarter at once.
            f_prov = (fresh // K_LIMIT) % n_prov
            grow = np.zeros(n_prov, dtype=bool)
            grow[f_prov[fresh % K_LIMIT > depth[f_prov]]] = True
            depth[grow] += np.maximum(1, depth[grow] // 4)
        if added == 0 or rounds >= MAX_ROUNDS:
            return ExactSolution(_positions_of_jobs(jobs, class_of, a_cls, a_pos, a_flow, pos_prov, offsets),
                                 float(a_flow @ a_cost_r), duals_ok and added == 0, rounds, len(a_cls))


def _positions_of_jobs(jobs, class_of, a_cls, a_pos, a_flow, pos_prov, offsets) -> dict[int, tuple[int, int]]:
    """Hand each class's flow out to its jobs: positions in index order to jobs in index order."""
    used = a_flow > 0
    order = np.lexsort((a_pos[used], a_cls[used]))
    slot_pos = np.repeat(a_pos[used][order], a_flow[used][order])
    job_order = np.argsort(class_of, kind="stable")  # class by class, in index order, as slot_pos
    p_of = pos_prov[slot_pos]
    k_of = slot_pos - offsets[p_of] + 1
    return dict(zip(jobs[job_order].tolist(), zip(p_of.tolist(), k_of.tolist())))


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
