"""Results: a placement (job -> provider, slot, order) and everything derived from it (pure)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from protocol import pricing

from .costs import STAGES, Costs
from .problem import Problem


@dataclass(frozen=True, slots=True)
class Assignment:
    job: str
    provider: str
    slot: int
    position: int  # on the slot, from 0 (runs first)
    start_ms: float
    latency_ms: float
    compute_ms: float
    energy_j: float
    carbon_g: float
    price: float


@dataclass(frozen=True, slots=True)
class Unassigned:
    job: str
    reason: str  # model / arch / memory / price / deadline
    explain: str = ""
    excluded_by: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    assignments: tuple[Assignment, ...]
    unassigned: tuple[Unassigned, ...]
    objective: float
    lower_bound: float
    optimal: bool
    totals: dict[str, float]
    solver: str
    solve_ms: float
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def gap(self) -> float:
        if self.objective <= 0:
            return 0.0
        return max(0.0, (self.objective - self.lower_bound) / self.objective)

    def to_json(self) -> dict[str, Any]:
        out = {
            "assignments": [asdict(a) for a in self.assignments],
            "unassigned": [asdict(u) for u in self.unassigned],
            "objective": self.objective, "lower_bound": self.lower_bound, "gap": self.gap,
            "optimal": self.optimal, "totals": self.totals, "solver": self.solver,
            "solve_ms": self.solve_ms,
        }
        if self.stats:
            out["stats"] = self.stats
        return out


# A placement: for each provider index, a list of slots, each an ordered list of job indices.
Placement = dict[int, list[list[int]]]


def _placed(costs: Costs, placement: Placement) -> tuple[np.ndarray, ...]:
    """Every placed job as arrays, slot by slot in provider order: job, provider, slot,
    position on the slot, compute_ms and latency_ms (the link and backlog, then everything
    before it on its slot, then itself)."""
    lanes = [(p, slot, order) for p in sorted(placement) for slot, order in enumerate(placement[p]) if order]
    lengths = np.array([len(order) for _, _, order in lanes], dtype=np.int64)
    job = np.array([j for _, _, order in lanes for j in order], dtype=np.int64)
    prov = np.repeat(np.array([p for p, _, _ in lanes], dtype=np.int64), lengths)
    slot = np.repeat(np.array([s for _, s, _ in lanes], dtype=np.int64), lengths)
    lane_start = np.cumsum(lengths) - lengths
    position = np.arange(len(job)) - np.repeat(lane_start, lengths)
    compute_ms = 1000.0 * costs.compute_s[job, prov]
    done_ms = np.cumsum(compute_ms)
    latency = costs.rtt_backlog_ms[prov] + done_ms - np.repeat(done_ms[lane_start] - compute_ms[lane_start], lengths)
    return job, prov, slot, position, compute_ms, latency


def placement_objective(costs: Costs, placement: Placement, weights) -> float:
    _, prov, _, _, compute_ms, latency = _placed(costs, placement)
    return float(np.sum(compute_ms / 1000.0 * costs.beta[prov])) + weights.latency * float(np.sum(latency))


def build_result(problem: Problem, costs: Costs, placement: Placement, unassigned: list[Unassigned], *,
                 solver: str, lower_bound: float, optimal: bool, solve_ms: float,
                 stats: dict[str, Any] | None = None) -> Result:
    w = problem.weights
    job, prov, slot, position, compute_ms, latency = _placed(costs, placement)
    marginal_w = np.array([p.marginal_w for p in problem.providers], dtype=float)
    carbon_g_per_kwh = np.array([p.carbon_g_per_kwh for p in problem.providers], dtype=float)
    price_per_s = np.array([p.price_per_s for p in problem.providers], dtype=float)
    energy = compute_ms / 1000.0 * marginal_w[prov]
    carbon = energy / 3.6e6 * carbon_g_per_kwh[prov]
    price = pricing.price(compute_ms / 1000.0, price_per_s[prov])
    objective = float(np.sum(w.energy * energy + w.latency * latency + w.carbon * carbon + w.price * price))
    totals = {"energy_j": float(np.sum(energy)), "latency_ms": float(np.sum(latency)),
              "carbon_g": float(np.sum(carbon)), "price": float(np.sum(price))}
    job_ids = [j.id for j in problem.jobs]
    prov_ids = [p.id for p in problem.providers]
    rows = zip(job.tolist(), prov.tolist(), slot.tolist(), position.tolist(), (latency - compute_ms).tolist(),
               latency.tolist(), compute_ms.tolist(), energy.tolist(), carbon.tolist(), price.tolist())
    assignments = sorted((Assignment(job_ids[j], prov_ids[p], *rest) for j, p, *rest in rows), key=lambda a: a.job)
    if optimal:
        lower_bound = objective
    return Result(tuple(assignments), tuple(sorted(unassigned, key=lambda u: u.job)), objective,
                  float(min(lower_bound, objective)), optimal, totals, solver, solve_ms, stats or {})


def explain_unassigned(problem: Problem, costs: Costs, job_index: int, reason: str | None = None) -> Unassigned:
    """Why job `job_index` was left out: which check excluded how many providers."""
    job = problem.jobs[job_index]
    stages = costs.stage_row(job_index)
    counts = {name: int(np.sum(stages == i)) for i, name in enumerate(STAGES)}
    counts = {k: v for k, v in counts.items() if v}
    if reason is None:
        reason = STAGES[int(stages.max())] if len(stages) else "model"
        if not len(stages):
            counts = {}
    parts = []
    labels = {
        "model": f"do not offer model {job.model}",
        "arch": f"have an arch outside {list(job.arch) if job.arch else 'any'}",
        "memory": f"have slots under {job.memory_mb:g} MB",
        "price": f"would cost more than {job.max_price}",
        "deadline": f"cannot finish within {job.deadline_ms} ms even when idle",
    }
    for name in STAGES:
        if counts.get(name):
            parts.append(f"{counts[name]} {labels[name]}")
    if not problem.providers:
        text = f"{job.id}: no providers at all"
    elif reason == "deadline" and not counts.get("deadline") and not any(
            counts.get(s) == len(problem.providers) for s in STAGES):
        text = f"{job.id}: compatible providers exist, but none had room to meet {job.deadline_ms} ms"
    else:
        text = f"{job.id}: unplaced ({reason}); of {len(problem.providers)} providers, " + "; ".join(parts)
    return Unassigned(job.id, reason, text, counts)
