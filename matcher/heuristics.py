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


def repair(costs: Costs, placement: Placement, allowed: np.ndarray, latency_weight: float,
           job_key) -> tuple[Placement, list[int]]:
    """Make a placement meet deadlines: take out late jobs, re-insert them where they fit."""
    fixed: Placement = {}
    pending: list[int] = []
    for p, lanes in placement.items():
        fixed[p] = []
        for lane in lanes:
            kept, t = [], costs.rtt_backlog_ms[p]
            for j in lane:
                finish = t + 1000.0 * costs.compute_s[j, p]
                if finish <= costs.deadline_ms[j] + 1e-9:
                    kept.append(j)
                    t = finish
                else:
                    pending.append(j)
            fixed[p].append(kept)
    left_out: list[int] = []
    for j in sorted(pending, key=lambda j: (costs.deadline_ms[j], job_key(j))):
        spot = best_insertion(costs, fixed, j, allowed[j], latency_weight)
        if spot is None:
            left_out.append(j)
            continue
        _, p, s, index = spot
        lanes = fixed.setdefault(p, [])
        if s == len(lanes):
            lanes.append([])
        lanes[s].insert(index, j)
    return compact(fixed), left_out
