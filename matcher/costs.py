"""Cost model over all (job, provider) pairs, vectorised (pure; no I/O here).

For job j on provider p (DESIGN.md):
  compute_s = items / throughput[model];  energy_j = compute_s * marginal_w
  carbon_g = energy_j / 3.6e6 * carbon_g_per_kwh;  price = compute_s * price_per_s
  latency_ms = rtt_ms + backlog_ms + wait_ms + 1000 * compute_s
Every term but the wait is proportional to compute_s, so the weighted cost of j at the
k-th position from the end of a slot (k = 1 is last) is
  compute_s * (beta_p + gamma * k) + delta_p
with beta_p = w.e*marginal_w + w.c*marginal_w*ci/3.6e6 + w.p*price_per_s,
gamma = 1000 * w.latency (a job delays the k-1 jobs after it) and
delta_p = w.latency * (rtt_ms + backlog_ms).

compute_s is items_j * seconds_per_item[model_j, p], which the exact solver exploits:
within one model a job's cost at a position is linear in its item count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protocol import pricing

from .problem import ARCHES, Problem

# Compatibility checks, in the order they are applied; a pair's stage is the first
# check it fails, or STAGE_OK.
STAGES = ("model", "arch", "memory", "price", "deadline")
STAGE_OK = len(STAGES)


@dataclass(frozen=True)
class Costs:
    compute_s: np.ndarray         # (J, P), inf where the model is not offered
    feasible: np.ndarray          # (J, P) bool: every check passes
    before_deadline: np.ndarray   # (J, P) bool: every check but the deadline (feasible itself without deadlines)
    beta: np.ndarray              # (P,)
    delta: np.ndarray             # (P,)
    gamma: float
    slots: np.ndarray             # (P,) int
    rtt_backlog_ms: np.ndarray    # (P,)
    deadline_ms: np.ndarray       # (J,) inf where none
    items: np.ndarray             # (J,) float
    job_model: np.ndarray         # (J,) index into seconds_per_item
    seconds_per_item: np.ndarray  # (M, P), inf where not offered
    # For stage_row only: the per-check inputs.
    _arch_ok: np.ndarray          # (J, A) bool, then indexed by provider arch
    _prov_arch: np.ndarray        # (P,)
    _memory_mb: np.ndarray        # (J,)
    _slot_memory_mb: np.ndarray   # (P,)
    _price_per_s: np.ndarray      # (P,)
    _max_price: np.ndarray        # (J,) inf where none

    def cost_at(self, jobs: np.ndarray, providers: np.ndarray, k: np.ndarray | int) -> np.ndarray:
        c = self.compute_s[jobs, providers]
        return c * (self.beta[providers] + self.gamma * k) + self.delta[providers]

    def stage_row(self, j: int) -> np.ndarray:
        """For job j, the first check each provider fails (STAGE_OK where none does)."""
        c = self.compute_s[j]
        with np.errstate(invalid="ignore"):
            checks = (
                np.isfinite(c),
                self._arch_ok[j][self._prov_arch],
                self._memory_mb[j] <= self._slot_memory_mb,
                ~pricing.over_ceiling(pricing.price(c, self._price_per_s), self._max_price[j]),
                ~(self.rtt_backlog_ms + 1000.0 * c > self.deadline_ms[j]),
            )
        stage = np.full(len(c), STAGE_OK, dtype=np.int8)
        for index, ok in reversed(list(enumerate(checks))):  # the earliest failing check wins
            stage[~ok] = index
        return stage


def build_costs(problem: Problem) -> Costs:
    providers, jobs, w = problem.providers, problem.jobs, problem.weights
    n_jobs, n_prov = len(jobs), len(providers)
    models = sorted({j.model for j in jobs})
    model_index = {m: i for i, m in enumerate(models)}
    seconds_per_item = np.full((max(len(models), 1), n_prov), np.inf)
    for p, prov in enumerate(providers):
        for m, rate in prov.throughput.items():
            if m in model_index:
                seconds_per_item[model_index[m], p] = 1.0 / rate
    job_model = np.array([model_index[j.model] for j in jobs], dtype=np.int64)
    items = np.array([j.items for j in jobs], dtype=float)
    compute_s = seconds_per_item[job_model] * items[:, None] if n_prov else np.zeros((n_jobs, 0))

    arch_index = {a: i for i, a in enumerate(ARCHES)}
    prov_arch = np.array([arch_index[p.arch] for p in providers], dtype=np.int64)
    arch_ok = np.ones((n_jobs, len(ARCHES)), dtype=bool)
    for j, job in enumerate(jobs):
        if job.arch is not None:
            arch_ok[j] = False
            arch_ok[j, [arch_index[a] for a in job.arch]] = True
    memory = np.array([j.memory_mb for j in jobs], dtype=float)
    slot_memory = np.array([p.slot_memory_mb for p in providers], dtype=float)
    price_per_s = np.array([p.price_per_s for p in providers], dtype=float)
    max_price = np.array([np.inf if j.max_price is None else j.max_price for j in jobs], dtype=float)
    rtt_backlog = np.array([p.rtt_ms + p.backlog_ms for p in providers], dtype=float)
    deadline = np.array([np.inf if j.deadline_ms is None else j.deadline_ms for j in jobs], dtype=float)

    # Model, arch and memory depend only on (model, arch list, memory): check them once
    # per distinct combination and gather, instead of three passes over J x P.
    combos: dict[tuple, int] = {}
    combo_of = np.array([combos.setdefault((j.model, j.arch, j.memory_mb), len(combos)) for j in jobs],
                        dtype=np.int64)
    first = {c: j for j, c in reversed(list(enumerate(combo_of.tolist())))}
    reps = np.array([first[c] for c in range(len(combos))], dtype=np.int64)
    combo_ok = (np.isfinite(seconds_per_item[job_model[reps]])
                & arch_ok[reps][:, prov_arch]
                & (memory[reps][:, None] <= slot_memory[None, :])) if len(reps) else np.zeros((0, n_prov), bool)
    feasible = combo_ok[combo_of] if n_jobs else np.zeros((0, n_prov), dtype=bool)
    # Price and deadline depend on the item count; check only the jobs that set them.
    with np.errstate(invalid="ignore"):
        rows = np.flatnonzero(np.isfinite(max_price))
        if len(rows):
            price = pricing.price(compute_s[rows], price_per_s[None, :])
            feasible[rows] &= ~pricing.over_ceiling(price, max_price[rows, None])
        rows = np.flatnonzero(np.isfinite(deadline))
        before_deadline = feasible
        if len(rows):
            before_deadline = feasible.copy()
            feasible[rows] &= ~(rtt_backlog[None, :] + 1000.0 * compute_s[rows] > deadline[rows, None])

    marginal = np.array([p.marginal_w for p in providers], dtype=float)
    carbon = np.array([p.carbon_g_per_kwh for p in providers], dtype=float)
    beta = w.energy * marginal + w.carbon * marginal * carbon / 3.6e6 + w.price * price_per_s
    return Costs(
        compute_s=compute_s, feasible=feasible, before_deadline=before_deadline, beta=beta, delta=w.latency * rtt_backlog,
        gamma=1000.0 * w.latency, slots=np.array([p.slots for p in providers], dtype=np.int64),
        rtt_backlog_ms=rtt_backlog, deadline_ms=deadline, items=items, job_model=job_model,
        seconds_per_item=seconds_per_item, _arch_ok=arch_ok, _prov_arch=prov_arch, _memory_mb=memory,
        _slot_memory_mb=slot_memory, _price_per_s=price_per_s, _max_price=max_price,
    )
