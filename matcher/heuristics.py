"""Greedy placements: the baselines and the deadline repair (pure; no I/O here).

Slots are kept as ordered job lists; a job appended to a slot waits for everything
before it. Every move checks the deadlines of all jobs it delays.
"""

from __future__ import annotations

import numpy as np

from .costs import Costs
from .result import Placement


def slot_ok(costs: Costs, p: int, order: list[int]) -> bool:
    t = costs.rtt_backlog_ms[p]
    for j in order:
        t += 1000.0 * costs.compute_s[j, p]
        if t > costs.deadline_ms[j] + 1e-9:
            return False
    return True


def slot_cost(costs: Costs, p: int, order: list[int], latency_weight: float) -> float:
    total, t = 0.0, costs.rtt_backlog_ms[p]
    for j in order:
        c = costs.compute_s[j, p]
        t += 1000.0 * c
        total += c * costs.beta[p] + latency_weight * t
    return total


def _empty(costs: Costs) -> Placement:
    return {p: [[] for _ in range(int(s))] for p, s in enumerate(costs.slots)}


def compact(placement: Placement) -> Placement:
    return {p: [lane for lane in lanes if lane] for p, lanes in placement.items() if any(lanes)}


def greedy(costs: Costs, allowed: np.ndarray, job_order: list[int], score: np.ndarray | None,
           *, round_robin: bool = False) -> tuple[Placement, list[int]]:
    """Each job in turn to the compatible provider with the lowest `score` (ties: provider order),
    on its earliest-free slot, where its deadline still holds; round-robin takes the next
    compatible provider in rotation instead."""
    placement = _empty(costs)
    busy_ms = [np.zeros(int(s)) for s in costs.slots]
    n_prov = len(costs.slots)
    cursor = 0
    left_out: list[int] = []
    for j in job_order:
        providers = np.flatnonzero(allowed[j])
        if round_robin:
            providers = sorted(providers, key=lambda p: (p - cursor) % n_prov)
        else:
            providers = sorted(providers, key=lambda p: (score[j, p], p))
        for p in providers:
            s = int(np.argmin(busy_ms[p]))
            finish = costs.rtt_backlog_ms[p] + busy_ms[p][s] + 1000.0 * costs.compute_s[j, p]
            if finish <= costs.deadline_ms[j] + 1e-9:
                placement[p][s].append(j)
                busy_ms[p][s] += 1000.0 * costs.compute_s[j, p]
                cursor = (p + 1) % n_prov
                break
        else:
            left_out.append(j)
    return compact(placement), left_out


def best_insertion(costs: Costs, placement: Placement, j: int, allowed_row: np.ndarray,
                   latency_weight: float) -> tuple[float, int, int, int] | None:
    """Cheapest (delta, provider, slot, index) that keeps every deadline, or None."""
    best = None
    for p in np.flatnonzero(allowed_row):
        lanes = placement.get(int(p), [])
        options = [(s, lane) for s, lane in enumerate(lanes)]
        if len(lanes) < costs.slots[p]:
            options.append((len(lanes), []))
        for s, lane in options:
            base = slot_cost(costs, p, lane, latency_weight)
            c = costs.compute_s[j, p]
            # Shortest-first order is optimal without deadlines; try that spot and the end.
            spot = sum(1 for i in lane if costs.compute_s[i, p] <= c)
            for index in sorted({spot, len(lane)}):
                trial = lane[:index] + [j] + lane[index:]
                if not slot_ok(costs, p, trial):
                    continue
                delta = slot_cost(costs, p, trial, latency_weight) - base
                key = (delta, int(p), s, index)
                if best is None or key < best:
                    best = key
            if not lane:
                break  # every empty slot of a provider is the same
    return best


def smith_order(costs: Costs, p: int, lane: list[int]) -> tuple[list[int], list[int]]:
    """The slot's jobs in the order with least total completion time that meets every
    deadline, by Smith's backward rule (exact for one machine): the last place goes to
    the longest job whose deadline allows finishing at the current end. Jobs that fit
    nowhere come back second (longest first), to be placed elsewhere."""
    end = costs.rtt_backlog_ms[p] + sum(1000.0 * costs.compute_s[j, p] for j in lane)
    remaining = set(lane)
    backwards, dropped = [], []
    while remaining:
        fits = [j for j in remaining if costs.deadline_ms[j] + 1e-9 >= end]
        pool = fits or list(remaining)
        j = max(pool, key=lambda i: (costs.compute_s[i, p], -i))
        (backwards if fits else dropped).append(j)
        remaining.discard(j)
        end -= 1000.0 * costs.compute_s[j, p]
    return backwards[::-1], dropped


def repair(costs: Costs, placement: Placement, allowed: np.ndarray, latency_weight: float,
           job_key) -> tuple[Placement, list[int]]:
    """Make a placement meet deadlines: reorder each slot by Smith's rule, take out what
    still cannot make it, and re-insert those where they fit."""
    fixed: Placement = {}
    pending: list[int] = []
    for p, lanes in placement.items():
        fixed[p] = []
        for lane in lanes:
            order, dropped = smith_order(costs, p, lane)
            # The order is feasible only if dropping was enough; check, and drop late ones.
            kept, t = [], costs.rtt_backlog_ms[p]
            for j in order:
                finish = t + 1000.0 * costs.compute_s[j, p]
                if finish <= costs.deadline_ms[j] + 1e-9:
                    kept.append(j)
                    t = finish
                else:
                    dropped.append(j)
            fixed[p].append(kept)
            pending.extend(dropped)
    left_out: list[int] = []
    for j in sorted(pending, key=lambda j: (costs.deadline_ms[j], job_key(j))):
        spot = best_insertion(costs, fixed, j, allowed[j], latency_weight)
        if spot is not None:
            _, p, s, index = spot
            lane = _lane(fixed, p, s)
            _set_lane(fixed, p, s, lane[:index] + [j] + lane[index:])
        else:
            left_out.append(j)
    # What two trial spots per slot could not place: try every slot with the job
    # re-ordered in by Smith's rule, which finds a feasible order whenever one exists.
    still_out = []
    for j in left_out:
        best = None
        for p in np.flatnonzero(allowed[j]):
            p = int(p)
            lanes = fixed.get(p, [])
            for s in range(min(len(lanes) + 1, int(costs.slots[p]))):
                lane = _lane(fixed, p, s)
                order, dropped = smith_order(costs, p, lane + [j])
                if dropped:
                    continue
                delta = slot_cost(costs, p, order, latency_weight) - slot_cost(costs, p, lane, latency_weight)
                if best is None or (delta, p, s) < best[:3]:
                    best = (delta, p, s, order)
        if best is None:
            still_out.append(j)
        else:
            _set_lane(fixed, best[1], best[2], best[3])
    return compact(fixed), still_out


def _lane(placement: Placement, p: int, s: int) -> list[int]:
    """Slot s of provider p; a slot one past the used ones is a fresh, empty one."""
    lanes = placement.get(p, [])
    return lanes[s] if s < len(lanes) else []


def _set_lane(placement: Placement, p: int, s: int, order: list[int]) -> None:
    lanes = placement.setdefault(p, [])
    if s == len(lanes):
        lanes.append(order)
    else:
        lanes[s] = order
