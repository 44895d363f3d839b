"""Greedy placements (the baselines) and slot orders under deadlines (pure; no I/O here).

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


def split_late(costs: Costs, placement: Placement) -> tuple[Placement, list[int]]:
    """Each slot in Smith's order (least total completion time that meets every
    deadline), without the jobs that still finish late: (placement, those jobs)."""
    fixed: Placement = {}
    late: list[int] = []
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
            late.extend(dropped)
    return compact(fixed), late
