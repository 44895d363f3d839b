"""Checks a Result against the contract in DESIGN.md, recomputing everything (pure)."""

from __future__ import annotations

import math

from protocol import pricing

from .problem import Problem
from .result import Result

REL = 1e-6


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-9)


def check_result(problem: Problem, result: Result) -> list[str]:
    """Every way `result` breaks the contract; an empty list means it holds."""
    errors: list[str] = []
    providers = {p.id: p for p in problem.providers}
    jobs = {j.id: j for j in problem.jobs}
    seen: set[str] = set()
    lanes: dict[tuple[str, int], list] = {}
    for a in result.assignments:
        if a.job in seen:
            errors.append(f"{a.job}: assigned twice")
        seen.add(a.job)
        if a.job not in jobs or a.provider not in providers:
            errors.append(f"{a.job}: unknown job or provider {a.provider}")
            continue
        lanes.setdefault((a.provider, a.slot), []).append(a)
    for u in result.unassigned:
        if u.job in seen:
            errors.append(f"{u.job}: both assigned and unassigned")
        seen.add(u.job)
        if u.reason not in ("model", "arch", "memory", "price", "deadline"):
            errors.append(f"{u.job}: unknown reason {u.reason!r}")
    if seen != set(jobs):
        errors.append(f"jobs missing from the result: {sorted(set(jobs) - seen)[:5]}")
    w = problem.weights
    objective = 0.0
    totals = {"energy_j": 0.0, "latency_ms": 0.0, "carbon_g": 0.0, "price": 0.0}
    for (pid, slot), items in lanes.items():
        p = providers[pid]
        if not 0 <= slot < p.slots:
            errors.append(f"{pid}: slot {slot} outside 0..{p.slots - 1}")
        items.sort(key=lambda a: a.position)
        if [a.position for a in items] != list(range(len(items))):
            errors.append(f"{pid}/{slot}: positions {[a.position for a in items]} are not 0..n-1")
        wait_ms = 0.0
        for a in items:
            j = jobs[a.job]
            if j.model not in p.throughput:
                errors.append(f"{a.job}: {pid} does not run {j.model}")
                continue
            if j.arch is not None and p.arch not in j.arch:
                errors.append(f"{a.job}: arch {p.arch} not in {j.arch}")
            if j.memory_mb > p.slot_memory_mb:
                errors.append(f"{a.job}: needs {j.memory_mb} MB, slot has {p.slot_memory_mb}")
            compute_s = pricing.compute_s(j.items, p.throughput[j.model])
            energy = compute_s * p.marginal_w
            carbon = energy / 3.6e6 * p.carbon_g_per_kwh
            price = pricing.price(compute_s, p.price_per_s)
            latency = p.rtt_ms + p.backlog_ms + wait_ms + 1000 * compute_s
            wait_ms += 1000 * compute_s
            if j.max_price is not None and pricing.over_ceiling(price, j.max_price):
                errors.append(f"{a.job}: price {price} over ceiling {j.max_price}")
            if j.deadline_ms is not None and latency > j.deadline_ms + 1e-6:
                errors.append(f"{a.job}: latency {latency:.3f} ms misses deadline {j.deadline_ms}")
            for name, mine, theirs in (("latency_ms", latency, a.latency_ms), ("energy_j", energy, a.energy_j),
                                       ("carbon_g", carbon, a.carbon_g), ("price", price, a.price),
                                       ("start_ms", latency - 1000 * compute_s, a.start_ms)):
                if not _close(mine, theirs):
                    errors.append(f"{a.job}: {name} is {theirs}, recomputed {mine}")
            objective += w.energy * energy + w.latency * latency + w.carbon * carbon + w.price * price
            for key, value in (("energy_j", energy), ("latency_ms", latency), ("carbon_g", carbon), ("price", price)):
                totals[key] += value
    if not _close(objective, result.objective):
        errors.append(f"objective {result.objective}, recomputed {objective}")
    for key, value in totals.items():
        if not _close(value, result.totals[key]):
            errors.append(f"totals.{key} {result.totals[key]}, recomputed {value}")
    if result.lower_bound > result.objective * (1 + REL) + 1e-9:
        errors.append(f"lower bound {result.lower_bound} above objective {result.objective}")
    return errors
