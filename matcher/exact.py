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
3. dual potentials of that optimum: fixed along the forest of arcs carrying flow, then
   shifted tree by tree (Bellman-Ford over trees) to the largest that are feasible;
4. pricing checks every allowed (class, provider, k) at once per group of classes (same
   model, same allowed providers): within a group a class's cost at a position is
   items * slope + intercept, so each class's cheapest position and each position's
   cheapest classes are queries on convex hulls. Each class's cheapest position, with
   the position duals, is a feasible dual of the whole problem, so its value is a lower
   bound on every placement (Lagrangian bound);
5. the placement is optimal once the flow's cost is within OPTIMALITY_TOLERANCE of that
   bound (or pricing finds nothing). Otherwise arcs with negative reduced cost join
   (every one of them, once, when the duals first come within COMPLETE_PRICING_GAP),
   arcs far from tight leave, arcs whose reduced cost under the feasible dual exceeds
   the gap leave for good (they cannot carry flow in any better placement), and the
   flow is solved again.
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
COMPLETE_PRICING_GAP = 5e-3  # relative gap below which one round prices every column, not the best few
OPTIMALITY_TOLERANCE = 1e-9  # relative gap at which the bound proves the placement optimal
K_LIMIT = 1 << 20         # positions per provider, for packing (job, provider, k) into one int64


@dataclass
class ExactSolution:
    job: np.ndarray                           # job indices, with
    provider: np.ndarray                      # the provider each runs on and
    k: np.ndarray                             # its position there, counted from the end (1 = last)
    objective: float                          # flow objective in float cost units
    lower_bound: float                        # proven: no placement of these jobs costs less
    certified: bool                           # objective within OPTIMALITY_TOLERANCE of lower_bound
    rounds: int
    arcs: int


def _greedy_positions(costs: Costs, allowed: np.ndarray, compute: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest jobs first, each to the position that costs it least now. A job placed
    later is smaller, so it runs in front of the jobs already there: its k is the
    provider's fill / slots + 1 and it delays none of them. Returns (provider, k)."""
    n, n_prov = compute.shape
    masked = np.where(allowed, compute, np.inf)
    beta, slots, gamma = costs.beta.tolist(), costs.slots.tolist(), float(costs.gamma)
    fill = [0] * n_prov
    multiplier = costs.beta + costs.gamma  # cost per compute-second at each next position
    prov = np.zeros(n, dtype=np.int64)
    k_of = np.zeros(n, dtype=np.int64)
    score = np.empty(n_prov)
    with np.errstate(invalid="ignore"):
        for j in np.argsort(-masked.min(axis=1), kind="stable").tolist():
            np.multiply(masked[j], multiplier, out=score)
            np.add(score, costs.delta, out=score)
            p = int(score.argmin())
            prov[j] = p
            k_of[j] = fill[p] // slots[p] + 1
            fill[p] += 1
            multiplier[p] = beta[p] + gamma * (fill[p] // slots[p] + 1)
    return prov, k_of


def _upper_hull(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the upper convex hull of points (x, y), left to right, and the slopes of
    its edges (decreasing), for queries s >= 0: max over points of y - s*x sits at hull
    vertex number count(edge slopes > s)."""
    order = np.lexsort((-y, x))
    keep = np.r_[True, x[order][1:] != x[order][:-1]]  # highest y for each x
    order = order[keep]
    # Queries have s >= 0, where a point with more x and no more y than another never wins:
    # keep the points that beat every point left of them.
    ys_sorted = y[order]
    order = order[ys_sorted > np.r_[-np.inf, np.maximum.accumulate(ys_sorted)[:-1]]]
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
                 eps: float, complete: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Columns with negative reduced cost for the classes `g` (one model, allowed on
    `provs`), as packed keys: for each class its cheapest position, for each position its
    cheapest classes (`complete`: every such column). Also each class's least reduced
    cost over every position it may take: exact minima, so they give a lower bound (and
    finding no column proves the group's duals feasible)."""
    n_prov = len(depth)
    reps = depth[provs] + 1  # positions (p, k) for k <= depth_p + 1; deeper ones cost more at dual 0
    q_prov = np.repeat(provs, reps)
    q_k = np.arange(len(q_prov)) - np.repeat(np.cumsum(reps) - reps, reps) + 1
    q_v = np.where(q_k <= depth[q_prov], v[np.minimum(offsets[q_prov] + q_k - 1, n_pos)], 0.0)
    # Within the group a job's reduced cost at position q is items * slope_q + intercept_q - u_j.
    slope = costs.seconds_per_item[model, q_prov] * (costs.beta[q_prov] + costs.gamma * q_k)
    intercept = costs.delta[q_prov] - q_v

    def reduced_costs(classes: np.ndarray) -> np.ndarray:  # (class, position)
        return items[classes][:, None] * slope[None, :] + intercept[None, :] - u[classes][:, None]

    if complete:
        keys, least = [], []
        for chunk in np.array_split(g, min(len(g), max(1, len(g) * len(q_prov) // DENSE_PRICING_CELLS))):
            red = reduced_costs(chunk)
            least.append(red.min(axis=1))
            at_class, at_pos = np.nonzero(red < -eps)
            keys.append((chunk[at_class] * n_prov + q_prov[at_pos]) * K_LIMIT + q_k[at_pos])
        return np.concatenate(keys), np.concatenate(least)
    if len(g) * len(q_prov) <= DENSE_PRICING_CELLS:
        red = reduced_costs(g)
        least = red.min(axis=1)
        # Each class's few cheapest positions and each position's few cheapest classes:
        # more than the single best, so fewer rounds are needed.
        top_q = min(PRICE_TOP, red.shape[1])
        top_j = min(PRICE_TOP, red.shape[0])
        by_job = np.argpartition(red, top_q - 1, axis=1)[:, :top_q]
        by_pos = np.argpartition(red, top_j - 1, axis=0)[:top_j, :]
        pick_j = np.concatenate([np.repeat(np.arange(len(g)), top_q), by_pos.ravel()])
        pick_q = np.concatenate([by_job.ravel(), np.tile(np.arange(len(q_prov)), top_j)])
        bad = red[pick_j, pick_q] < -eps
        return (g[pick_j[bad]] * n_prov + q_prov[pick_q[bad]]) * K_LIMIT + q_k[pick_q[bad]], least
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
    least = np.full(len(g), np.inf)
    for shift in (0, -1, 1):  # the vertex the search names, and its neighbours against float ties
        q = q_hull[np.clip(at + shift, 0, len(q_hull) - 1)]
        red = items[g] * slope[q] + intercept[q] - u[g]
        least = np.minimum(least, red)
        bad = red < -eps
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
    return np.concatenate(out), least


def _duals(s_cls: np.ndarray, s_pos: np.ndarray, s_cost: np.ndarray, t_cls: np.ndarray, t_pos: np.ndarray,
           t_cost: np.ndarray, n_cls: int, n_pos: int, tolerance: float) -> np.ndarray:
    """Position duals v (<= 0; v[n_pos] = 0 for every position past a provider's depth)
    of a restricted optimum: the largest v with each arc carrying flow tight
    (u_c = cost(c, s) - v_s) and no arc with room left cheaper (u_c <= cost(c, t) - v_t).

    The arcs carrying flow form a forest over classes and positions (plus, in a
    degenerate optimum, a few arcs that agree with it). A walk over each tree fixes its
    potentials up to one shift per tree; the shifts are then the largest with every
    position <= 0 and every arc with room satisfied: Bellman-Ford over trees, whose
    chains are far shorter than over positions (tens of passes instead of hundreds)."""
    n = n_cls + n_pos
    # Tree edges both ways, node ids: classes, then positions. Along class c -> position
    # s the potential rises by cost(c, s): v_s = y_c + cost(c, s) with y_c = -u_c.
    a = np.concatenate([s_cls, n_cls + s_pos])
    b = np.concatenate([n_cls + s_pos, s_cls])
    rise = np.concatenate([s_cost, -s_cost])
    order = np.argsort(a, kind="stable")
    first_edge = np.searchsorted(a[order], np.arange(n + 1)).tolist()
    other, step = b[order].tolist(), rise[order].tolist()
    potential = [0.0] * n
    tree = [-1] * n
    n_trees = 0
    for root in range(n):
        if tree[root] >= 0:
            continue
        tree[root] = n_trees
        stack = [root]
        while stack:
            x = stack.pop()
            for e in range(first_edge[x], first_edge[x + 1]):
                y = other[e]
                if tree[y] < 0:
                    tree[y] = n_trees
                    potential[y] = potential[x] + step[e]
                    stack.append(y)
        n_trees += 1
    potential_arr, tree_arr = np.array(potential), np.array(tree)
    pos_tree, pos_potential = tree_arr[n_cls:], potential_arr[n_cls:]
    shift = np.full(n_trees, np.inf)
    np.minimum.at(shift, pos_tree, -pos_potential)  # each tree's positions <= 0
    # Room arc c -> t: shift[tree(t)] <= shift[tree(c)] + cost(c, t) + y_c - v_t (relative).
    src, dst = tree_arr[t_cls], pos_tree[t_pos]
    w = t_cost + potential_arr[t_cls] - pos_potential[t_pos]
    cross = src != dst
    src, dst, w = src[cross], dst[cross], w[cross]
    if len(src):
        # One edge per (target, source) pair, the cheapest, sorted by target.
        pair = dst * n_trees + src
        order = np.argsort(pair)
        pair = pair[order]
        first = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
        w = np.minimum.reduceat(w[order], first)
        dst, src = pair[first] // n_trees, pair[first] % n_trees
        starts = np.flatnonzero(np.r_[True, dst[1:] != dst[:-1]])
        targets = dst[starts]
        for _ in range(n_trees + 1):
            relaxed = np.minimum.reduceat(shift[src] + w, starts)
            # Improvements below float noise would chase rounding around near-zero cycles.
            improved = relaxed < shift[targets] - tolerance
            if not improved.any():
                break
            shift[targets[improved]] = relaxed[improved]
    v = np.zeros(n_pos + 1)
    v[:n_pos] = np.minimum(pos_potential + shift[pos_tree], 0.0)
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
        empty = np.zeros(0, dtype=np.int64)
        return ExactSolution(empty, empty, empty, 0.0, 0.0, True, 0, 0)
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
    priced_completely = False
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

        # --- duals: v over positions, u_c = cost - v[pos] of an arc carrying flow -----
        used = a_flow > 0
        s_cls, s_pos, s_cost = a_cls[used], a_pos[used], a_cost_r[used]
        room = a_flow < a_cap
        max_cost = float(np.max(np.abs(a_cost)))
        v = _duals(s_cls, s_pos, s_cost, a_cls[room], a_pos[room], a_cost_r[room], n_cls, n_pos,
                   1e-13 * max(1.0, max_cost))
        eps = 1e-9 * max(1.0, max_cost) + 2.0 / scale
        v[n_pos] = 0.0
        duals_ok = not np.any((v[:n_pos] < -eps) & (fill < slots[pos_prov]))
        u = np.full(n_cls, np.inf)
        np.minimum.at(u, s_cls, s_cost - v[s_pos])

        # --- pricing over every allowed (class, provider, k), group by group -----------
        priced = [(cls, _price_group(costs, cls, provs, model, class_items, u, v, depth, offsets, n_pos, eps))
                  for cls, provs, model in zip(group_classes, group_prov, group_model) if len(provs)]
        least = np.zeros(n_cls)
        for cls, (_, least_of_group) in priced:
            least[cls] = least_of_group
        # Each class's cheapest position at prices v, over every position it may take, with
        # v make a feasible dual of the whole problem: its value bounds every placement.
        u_all = u + least
        lower_bound = float(class_size @ u_all + slots[pos_prov] @ v[:n_pos])
        upper = float(a_flow @ a_cost)
        gap = max(0.0, upper - lower_bound)
        proven = gap <= OPTIMALITY_TOLERANCE * max(1.0, abs(upper))

        # Columns far from tight leave the graph, so each flow stays small; pricing
        # covers every column, deleted or not, so the certificate is unaffected. A column
        # whose reduced cost under that feasible dual exceeds the gap can carry no flow in
        # any placement better than this one, so once the gap is small few columns stay.
        reduced = a_cost_r - u[a_cls] - v[a_pos]
        reduced_all = a_cost - u_all[a_cls] - v[a_pos]
        columns = columns[used | ((reduced < KEEP_REDUCED * np.abs(u[a_cls])) & (reduced_all <= gap + eps))]

        new_cols = [keys for _, (keys, _) in priced]
        if not proven and not priced_completely and gap <= COMPLETE_PRICING_GAP * max(1.0, abs(upper)):
            # The duals are fair now: every column with negative reduced cost joins, not just
            # each class's and each position's best few. Once, as it costs a pass over every
            # (class, position); it saves a round or two.
            priced_completely = True
            new_cols = [_price_group(costs, cls, provs, model, class_items, u, v, depth, offsets, n_pos, eps,
                                     complete=True)[0]
                        for cls, provs, model in zip(group_classes, group_prov, group_model) if len(provs)]
        added = 0
        if new_cols and not proven:
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
        if proven or added == 0 or rounds >= MAX_ROUNDS:
            return ExactSolution(*_positions_of_jobs(jobs, class_of, a_cls, a_pos, a_flow, pos_prov, offsets),
                                 upper, min(lower_bound, upper), proven or (duals_ok and added == 0),
                                 rounds, len(a_cls))


def _positions_of_jobs(jobs, class_of, a_cls, a_pos, a_flow, pos_prov, offsets
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hand each class's flow out to its jobs: positions in index order to jobs in index
    order. Returns (job, provider, k from last) arrays."""
    used = a_flow > 0
    order = np.lexsort((a_pos[used], a_cls[used]))
    slot_pos = np.repeat(a_pos[used][order], a_flow[used][order])
    job_order = np.argsort(class_of, kind="stable")  # class by class, in index order, as slot_pos
    p_of = pos_prov[slot_pos]
    return jobs[job_order], p_of, slot_pos - offsets[p_of] + 1


def placement_from_positions(jobs: np.ndarray, provider: np.ndarray, k: np.ndarray, slots: np.ndarray,
                             tie_rank: np.ndarray) -> dict[int, list[list[int]]]:
    """Turn (provider, k from last) into slots in run order: the jobs sharing a position
    take slots 0, 1, ... in `tie_rank` order, and within a slot the job farthest from the
    end runs first."""
    if not len(jobs):
        return {}
    order = np.lexsort((tie_rank[jobs], k, provider))
    jobs, provider, k = jobs[order], provider[order], k[order]
    index = np.arange(len(jobs))
    first = np.r_[True, (provider[1:] != provider[:-1]) | (k[1:] != k[:-1])]
    lane = index - np.maximum.accumulate(np.where(first, index, 0))
    if np.any(lane >= slots[provider]):
        raise ValueError("more jobs at one position than the provider has slots")
    run = np.lexsort((-k, lane, provider))
    jobs, provider, lane = jobs[run], provider[run], lane[run]
    cuts = np.flatnonzero(np.r_[True, (provider[1:] != provider[:-1]) | (lane[1:] != lane[:-1]), True]).tolist()
    placement: dict[int, list[list[int]]] = {}
    job_list, provider_list = jobs.tolist(), provider.tolist()
    for a, b in zip(cuts[:-1], cuts[1:]):
        placement.setdefault(provider_list[a], []).append(job_list[a:b])
    return placement
