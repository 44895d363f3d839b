"""CP-SAT model of placement with deadlines (pure; no I/O here).

Each job may take one optional interval on one slot of one allowed provider; intervals
on a slot do not overlap; a present interval ends by the job's deadline. Lexicographic
objective: first the number of jobs placed, then the weighted cost. Times are integer
microseconds; costs are scaled integers. Used on the whole problem when it is small
and on neighbourhoods (a few providers and their jobs) when it is large.
"""

from __future__ import annotations

import math

import numpy as np
from ortools.sat.python import cp_model

from .costs import Costs
from .result import Placement

LATENCY_UNIT = 1


def solve_subproblem(costs: Costs, providers: list[int], jobs: list[int], allowed: np.ndarray,
                     latency_weight: float, hint: Placement, *, time_limit_s: float | None, seed: int,
                     must_place: int, work_limit_s: float | None = None
                     ) -> tuple[Placement, int, bool, bool] | None:
    """Best placement of `jobs` on `providers`. Returns (placement, placed, whether the
    wall clock stopped the search, optimal). With `work_limit_s` the search stops on
    CP-SAT's deterministic time (a measure of work; on the bench machine it runs about
    three times as long on the clock) on one worker, so the same input gives the same placement unless
    `time_limit_s` (wall clock) cuts it first; with `time_limit_s=None` no clock is read
    at all. (Two interleaved workers are deterministic too, but their clock time grew
    five-fold from 0.2 to 0.4 units.)"""
    if time_limit_s is None and work_limit_s is None:
        raise ValueError("solve_subproblem: give a wall-clock limit, a work limit, or both")
    model = cp_model.CpModel()
    presence: dict[tuple[int, int, int], cp_model.IntVar] = {}
    ends: dict[tuple[int, int, int], cp_model.IntVar] = {}
    per_lane: dict[tuple[int, int], list] = {}
    per_job: dict[int, list] = {}
    static_terms, latency_terms, latency_bounds = [], [], []
    # One integer scale for the whole objective: a microsecond of latency costs
    # LATENCY_UNIT, so float cost x becomes round(x * scale).
    if latency_weight > 0:
        scale = LATENCY_UNIT * 1000.0 / latency_weight
    else:
        top = max((costs.compute_s[j, p] * costs.beta[p] for j in jobs for p in providers
                   if allowed[j, p]), default=1.0)
        scale = 1e6 / max(top, 1e-30)
    for p in providers:
        lane_cap = int(costs.slots[p])
        jobs_here = [j for j in jobs if allowed[j, p]]
        if not jobs_here:
            continue
        base_us = int(round(costs.rtt_backlog_ms[p] * 1000))
        total_us = sum(int(math.ceil(costs.compute_s[j, p] * 1e6)) for j in jobs_here)
        lanes = min(lane_cap, len(jobs_here))
        for s in range(lanes):
            for j in jobs_here:
                dur = int(math.ceil(costs.compute_s[j, p] * 1e6))
                deadline = costs.deadline_ms[j]
                hi = total_us if not np.isfinite(deadline) else min(total_us, int(deadline * 1000) - base_us)
                if hi < dur:
                    continue
                present = model.NewBoolVar("")
                start = model.NewIntVar(0, hi - dur, "")
                end = model.NewIntVar(dur, hi, "")
                interval = model.NewOptionalIntervalVar(start, dur, end, present, "")
                presence[(j, p, s)] = present
                per_job.setdefault(j, []).append(present)
                ends[(j, p, s)] = end
                per_lane.setdefault((p, s), []).append(interval)
                static = costs.compute_s[j, p] * costs.beta[p] + latency_weight * costs.rtt_backlog_ms[p]
                static_terms.append((int(round(static * scale)), present))
                # latency of a present job = base + end; an absent job's end is free, so
                # tie it to 0 through a product variable.
                contrib = model.NewIntVar(0, hi, "")
                model.Add(contrib == end).OnlyEnforceIf(present)
                model.Add(contrib == 0).OnlyEnforceIf(present.Not())
                latency_terms.append(contrib)
                latency_bounds.append(hi)
    for intervals in per_lane.values():
        model.AddNoOverlap(intervals)
    placed_vars = []
    for options in per_job.values():
        model.AddAtMostOne(options)
        placed_vars.extend(options)
    # Flat sums (LinearExpr.sum / weighted_sum): Python's sum() nests one node per term,
    # and OR-tools walks that nesting recursively, which overflowed the C stack
    # (a segfault) on neighbourhoods of a few thousand optional intervals.
    placed = cp_model.LinearExpr.sum(placed_vars)
    model.Add(placed >= must_place)
    lat_coef = LATENCY_UNIT if latency_weight > 0 else 0
    static_coefs = [c for c, _ in static_terms]
    # Lexicographic: one more placed job outweighs any possible cost.
    worst = sum(static_coefs) + lat_coef * sum(latency_bounds)
    model.Minimize(cp_model.LinearExpr.weighted_sum(
        placed_vars + [v for _, v in static_terms] + latency_terms,
        [-(worst + 1)] * len(placed_vars) + static_coefs + [lat_coef] * len(latency_terms)))

    # Hint: the current placement, with back-to-back start times.
    for p, lanes in hint.items():
        for s, lane in enumerate(lanes):
            t = 0
            for j in lane:
                dur = int(math.ceil(costs.compute_s[j, p] * 1e6))
                t += dur
                if (j, p, s) in presence:
                    model.AddHint(presence[(j, p, s)], 1)
                    model.AddHint(ends[(j, p, s)], t)
    solver = cp_model.CpSolver()
    wall_limit_s = max(0.05, time_limit_s) if time_limit_s is not None else None
    if wall_limit_s is not None:
        solver.parameters.max_time_in_seconds = wall_limit_s
    solver.parameters.num_workers = 2
    solver.parameters.random_seed = seed
    if work_limit_s is not None:
        solver.parameters.max_deterministic_time = work_limit_s
        solver.parameters.num_workers = 1
    status = solver.Solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    out: Placement = {}
    count = 0
    for (j, p, s), var in presence.items():
        if solver.Value(var):
            out.setdefault(p, {}).setdefault(s, []).append((solver.Value(ends[(j, p, s)]), j))
            count += 1
    placement = {p: [[j for _, j in sorted(lane)] for _, lane in sorted(lanes.items())]
                 for p, lanes in out.items()}
    # Within 1% of the wall limit: the clock, not the work limit, ended the search.
    clocked = wall_limit_s is not None and status != cp_model.OPTIMAL and solver.wall_time >= 0.99 * wall_limit_s
    return placement, count, clocked, status == cp_model.OPTIMAL
