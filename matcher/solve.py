"""`solve`: the matcher's one entry point (pure; the caller passes the clock and seed).

- `optimal` (default): exact min-cost flow with a certificate when no job has a
  deadline. With deadlines: that flow is a relaxation whose cost bounds every
  placement of all jobs from below; if its schedule meets every deadline it is optimal.
  Otherwise every job is assigned again to the relaxation's positions where its
  deadline allows (`reassign.py`, one more min-cost flow), each slot is put in Smith's
  order, the jobs still late are inserted one at a time, and the local search
  (`local.py`: relocations, swaps, ejections) improves that; the result (or
  greedy-energy, if that places more) seeds CP-SAT, on the whole problem when small and
  on a few neighbourhoods when large. Each stage has a work budget (a share of the time
  limit at the rates of the bench machine), so results repeat; the clock only caps it.
- `greedy-price`, `greedy-energy`, `round-robin`: baselines, same result format.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

from .costs import Costs, build_costs
from .cpsat import solve_subproblem
from .exact import placement_from_positions, solve_exact
from .heuristics import greedy, slot_ok, split_late
from .local import CELLS_PER_SECOND, improve
from .reassign import reassign
from .problem import Problem
from .result import Placement, Result, build_result, explain_unassigned, placement_objective

SOLVERS = ("optimal", "greedy-price", "greedy-energy", "round-robin")
FULL_CPSAT_PAIRS = 600  # jobs x providers up to which CP-SAT takes the whole problem
NEIGHBOURHOOD_PROVIDERS = 3
NEIGHBOURHOOD_JOBS = 60  # placed jobs in one neighbourhood, at most (plus up to 20 left out)
# The search with deadlines stops on work done, not on the clock, so the same input gives
# the same placement (the contract asks for that). Its budgets are shares of the time
# limit, converted at the rates measured on the 2-core bench machine; the clock only caps
# them, as a safety on slower machines, and stats["time_capped"] says when it did (that
# result may then differ between runs).
LOCAL_SEARCH_WORK_SHARE = 0.4  # of the time limit: the local search's work budget
LOCAL_SEARCH_SHARE = 0.85      # of the time limit: the clock's cap on the local search
# Without a clock only work budgets stop the search (CP-SAT's deterministic time, the
# local search's scored pairs): no clock is read, and the same input gives the same
# placement on any machine under any load.
NEIGHBOURHOOD_WORK_S = 0.05    # CP-SAT deterministic time per neighbourhood (one worker: about 3x on the clock)
NEIGHBOURHOOD_SHARE = 0.1      # of the time limit, for neighbourhoods: how many (at least one)
FULL_CPSAT_WORK_SHARE = 0.15   # of the time limit: CP-SAT's deterministic time on a small problem (one
                               # worker takes about three times that on the clock)
RESULT_RESERVE_S = 0.1  # of the time limit, kept for building the result after the search
NEIGHBOURHOOD_BUILD_S = 0.1  # allowance for building one neighbourhood's CP-SAT model


def _placed_count(placement: Placement) -> int:
    return sum(len(lane) for lanes in placement.values() for lane in lanes)


def _per_compute_second(costs: Costs, rate_per_s: list[float]) -> np.ndarray:
    """(J, P): each pair's compute time times its provider's rate (W, price per s)."""
    # compute_s is inf where a model is not offered (inf * 0 = nan); such pairs are never allowed.
    with np.errstate(invalid="ignore"):
        return costs.compute_s * np.array(rate_per_s)[None, :]


def _meets_deadlines(costs: Costs, placement: Placement) -> bool:
    return all(slot_ok(costs, p, lane) for p, lanes in placement.items() for lane in lanes)


def _better(costs: Costs, w, a: Placement, b: Placement) -> bool:
    """Is `a` better than `b`: more jobs, or as many for less cost."""
    na, nb = _placed_count(a), _placed_count(b)
    if na != nb:
        return na > nb
    return placement_objective(costs, a, w) < placement_objective(costs, b, w) - 1e-9


def solve(problem: Problem, *, solver: str = "optimal", time_limit_s: float = 2.0, seed: int = 0,
          clock: Callable[[], float] | None = None) -> Result:
    """Place `problem`'s jobs. `clock` (seconds, monotonic) times the solve and bounds the
    search; without it the search runs a fixed number of rounds and solve_ms is 0."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    started = clock() if clock else 0.0
    # Work on providers sorted by id so every tie resolves by id; jobs keep file order
    # (the baselines depend on it) and tie by id where order is free.
    ordered = replace(problem, providers=tuple(sorted(problem.providers, key=lambda p: p.id)))
    costs = build_costs(ordered)
    allowed = costs.feasible
    job_ids = [j.id for j in ordered.jobs]
    w = ordered.weights
    placeable = np.flatnonzero(allowed.any(axis=1)) if len(ordered.providers) else np.array([], dtype=np.int64)
    placeable_set = set(placeable.tolist())
    unassigned = [explain_unassigned(ordered, costs, j) for j in range(len(ordered.jobs))
                  if j not in placeable_set]
    stats: dict = {}
    file_order = placeable.tolist()

    if solver != "optimal":
        if solver == "greedy-price":
            score = _per_compute_second(costs, [p.price_per_s for p in ordered.providers])
        elif solver == "greedy-energy":
            score = _per_compute_second(costs, [p.marginal_w for p in ordered.providers])
        else:
            score = None
        placement, left = greedy(costs, allowed, file_order, score, round_robin=solver == "round-robin")
        unassigned += [explain_unassigned(ordered, costs, j, "deadline") for j in left]
        elapsed = (clock() - started) * 1000 if clock else 0.0
        return build_result(ordered, costs, placement, unassigned, solver=solver, lower_bound=0.0,
                            optimal=False, solve_ms=elapsed)

    if len(job_ids) == 1 and allowed[0].any():
        # One job (a warm client's request): the optimum is its cheapest allowed provider,
        # alone and so last in a free slot, which is where the flow would put it. Each
        # provider's cost is enumerated exactly, in a fraction of the flow's set-up time.
        row = np.flatnonzero(allowed[0])
        cost = costs.cost_at(np.zeros(len(row), dtype=np.int64), row, 1)
        best_provider = int(row[int(np.argmin(cost))])  # ties: the lower id (providers are sorted)
        elapsed = (clock() - started) * 1000 if clock else 0.0
        return build_result(ordered, costs, {best_provider: [[0]]}, unassigned, solver="optimal",
                            lower_bound=float(cost.min()), optimal=True, solve_ms=elapsed,
                            stats={"single_job": True, "certified": True})

    # Deadlines also rule out the pairs where a job alone would finish late. The flow
    # allows them anyway: a relaxation of a relaxation still bounds every placement, the
    # bound moves by about 1e-6 (relative) on the bench, and without them jobs with the
    # same model share their allowed providers again, so they group into few pricing
    # groups (otherwise nearly every job with a deadline is a group of its own).
    exact = solve_exact(costs, placeable, costs.before_deadline)
    id_rank = np.empty(len(job_ids), dtype=np.int64)
    id_rank[sorted(range(len(job_ids)), key=job_ids.__getitem__)] = np.arange(len(job_ids))
    placement = placement_from_positions(exact.job, exact.provider, exact.k, costs.slots, id_rank)
    stats.update(flow_rounds=exact.rounds, flow_arcs=exact.arcs, certified=exact.certified,
                 flow_bound_gap=(exact.objective - exact.lower_bound) / max(abs(exact.objective), 1e-30))
    lower_bound = exact.lower_bound
    optimal = exact.certified
    if _meets_deadlines(costs, placement):
        elapsed = (clock() - started) * 1000 if clock else 0.0
        return build_result(ordered, costs, placement, unassigned, solver="optimal",
                            lower_bound=lower_bound, optimal=optimal, solve_ms=elapsed, stats=stats)

    # Deadlines bind: the relaxation only bounds. Repair its schedule, improve it by
    # local search, and keep greedy-energy if that places more.
    deadline = started + time_limit_s if clock else None

    def local_search_over() -> bool:
        return clock() > started + LOCAL_SEARCH_SHARE * time_limit_s if clock else False

    # The relaxation's positions, with every job assigned again where its deadline
    # allows; then each slot in Smith's order, and what is still late (or left out)
    # inserted one job at a time, earliest deadline first, before the local search.
    reassigned, left_out = reassign(costs, placement, allowed, placeable, id_rank)
    repaired, late = split_late(costs, reassigned)
    pending = sorted(left_out + late, key=lambda j: (costs.deadline_ms[j], id_rank[j]))
    stats.update(reassign_left_out=len(left_out), late_after_reassign=len(late))
    best, left, passes, stopped = improve(
        costs, repaired, pending, allowed, w.latency, out_of_time=local_search_over, insertion_order=pending,
        work_budget=LOCAL_SEARCH_WORK_SHARE * time_limit_s * CELLS_PER_SECOND)
    stats.update(local_search_passes=passes, local_search_stop=stopped)
    time_capped = stopped == "time"
    if left:
        greedy_energy, _ = greedy(costs, allowed, sorted(file_order, key=lambda j: costs.deadline_ms[j]),
                                  _per_compute_second(costs, [p.marginal_w for p in ordered.providers]))
        if _better(costs, w, greedy_energy, best):
            best = greedy_energy
    stats["heuristic_placed"] = _placed_count(best)
    optimal = False
    rng = np.random.default_rng(seed)
    n_prov = len(ordered.providers)
    if len(placeable) * n_prov <= FULL_CPSAT_PAIRS:
        wall_s = deadline - clock() - RESULT_RESERVE_S if clock else None
        out = solve_subproblem(costs, list(range(n_prov)), file_order, allowed, w.latency, best,
                               time_limit_s=wall_s, seed=seed, must_place=_placed_count(best),
                               work_limit_s=FULL_CPSAT_WORK_SHARE * time_limit_s)
        if out is not None:
            candidate, _, clocked, proven = out
            time_capped = time_capped or clocked
            if not _better(costs, w, best, candidate):
                best = candidate
            optimal = proven
            stats["cpsat"] = "full"
    else:
        rounds = 0
        n_rounds = max(1, int(NEIGHBOURHOOD_SHARE * time_limit_s / (NEIGHBOURHOOD_WORK_S + NEIGHBOURHOOD_BUILD_S)))

        def load(p: int) -> int:
            return sum(len(lane) for lane in best.get(p, []))

        while rounds < n_rounds:
            # Stop with time left to build the result: the limit covers the whole solve.
            # A neighbourhood costs its model building on top of CP-SAT's own limit.
            if clock and clock() > deadline - RESULT_RESERVE_S - NEIGHBOURHOOD_BUILD_S - NEIGHBOURHOOD_WORK_S:
                time_capped = True
                break
            rounds += 1
            placed_jobs = {j for lanes in best.values() for lane in lanes for j in lane}
            left = [j for j in file_order if j not in placed_jobs]
            # A neighbourhood: a provider a left-out job could use (or any busy one), plus
            # a few of its cheapest alternatives, with all their jobs.
            if left and rng.random() < 0.5:
                j0 = int(rng.choice(left))
                seeds = np.flatnonzero(allowed[j0])
            else:
                seeds = np.array(sorted(best)) if best else np.flatnonzero(allowed.any(axis=0))
            # At most NEIGHBOURHOOD_JOBS jobs, so building the model stays within its allowance.
            seeds = seeds[[load(p) <= NEIGHBOURHOOD_JOBS for p in seeds.tolist()]] if len(seeds) else seeds
            if not len(seeds):
                break
            p0 = int(rng.choice(seeds))
            share = [j for lane in best.get(p0, []) for j in lane]
            hood, size = [p0], load(p0)
            for p in rng.permutation(np.flatnonzero(allowed[share].any(axis=0)) if share else seeds).tolist():
                if len(hood) == NEIGHBOURHOOD_PROVIDERS:
                    break
                if p != p0 and size + load(p) <= NEIGHBOURHOOD_JOBS:
                    hood.append(int(p))
                    size += load(p)
            hood_jobs = [j for p in hood for lane in best.get(p, []) for j in lane]
            hood_jobs += [j for j in left if allowed[j, hood].any()][:20]
            current = {p: best[p] for p in hood if p in best}
            wall_s = deadline - clock() - RESULT_RESERVE_S - NEIGHBOURHOOD_BUILD_S if clock else None
            out = solve_subproblem(costs, hood, hood_jobs, allowed, w.latency, current,
                                   time_limit_s=wall_s, seed=seed + rounds, must_place=_placed_count(current),
                                   work_limit_s=NEIGHBOURHOOD_WORK_S)
            if out is None:
                continue
            time_capped = time_capped or out[2]
            candidate = {p: lanes for p, lanes in best.items() if p not in hood}
            candidate.update(out[0])
            if _better(costs, w, candidate, best):
                best = candidate
        stats["lns_rounds"] = rounds
    stats["time_capped"] = time_capped

    placed_jobs = {j for lanes in best.values() for lane in lanes for j in lane}
    unassigned += [explain_unassigned(ordered, costs, j, "deadline") for j in file_order if j not in placed_jobs]
    if len(placed_jobs) < len(placeable):
        # The flow bound assumed every job placed; for fewer jobs bound each placed job
        # by its cheapest possible cost, summed over the cheapest such set.
        cheapest = np.min(np.where(allowed[placeable], costs.cost_at(placeable[:, None],
                                   np.arange(n_prov)[None, :], 1), np.inf), axis=1)
        lower_bound = float(np.sum(np.sort(cheapest)[: len(placed_jobs)]))
    elapsed = (clock() - started) * 1000 if clock else 0.0
    return build_result(ordered, costs, best, unassigned, solver="optimal", lower_bound=lower_bound,
                        optimal=optimal, solve_ms=elapsed, stats=stats)
