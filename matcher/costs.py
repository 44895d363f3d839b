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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .problem import ARCHES, Problem

# Stages of the compatibility check, in the order they are applied. A pair's stage is
# the first check it fails; STAGE_OK means it passes all.
STAGES = ("model", "arch", "memory", "price", "deadline")
STAGE_OK = len(STAGES)
PRICE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Costs:
    compute_s: np.ndarray  # (J, P), inf where the model is not offered
    stage: np.ndarray      # (J, P) int8: first failed check, or STAGE_OK
    beta: np.ndarray       # (P,)
    delta: np.ndarray      # (P,)
    gamma: float
    slots: np.ndarray      # (P,) int
    rtt_backlog_ms: np.ndarray  # (P,)
    deadline_ms: np.ndarray     # (J,) inf where none

    @property
    def feasible(self) -> np.ndarray:
        return self.stage == STAGE_OK

    def cost_at(self, jobs: np.ndarray, providers: np.ndarray, k: np.ndarray | int) -> np.ndarray:
        c = self.compute_s[jobs, providers]
        return c * (self.beta[providers] + self.gamma * k) + self.delta[providers]


def build_costs(problem: Problem) -> Costs:
    providers, jobs, w = problem.providers, problem.jobs, problem.weights
    n_jobs, n_prov = len(jobs), len(providers)
    models = sorted({j.model for j in jobs})
    model_index = {m: i for i, m in enumerate(models)}
    throughput = np.zeros((n_prov, max(len(models), 1)))
    for p, prov in enumerate(providers):
        for m, rate in prov.throughput.items():
            if m in model_index:
                throughput[p, model_index[m]] = rate
    job_model = np.array([model_index[j.model] for j in jobs], dtype=np.int64)
    items = np.array([j.items for j in jobs], dtype=float)

    with np.errstate(divide="ignore"):
        compute_s = items[:, None] / throughput[:, job_model].T if n_jobs and n_prov else np.zeros((n_jobs, n_prov))
    model_ok = np.isfinite(compute_s)

    arch_index = {a: i for i, a in enumerate(ARCHES)}
    prov_arch = np.array([arch_index[p.arch] for p in providers], dtype=np.int64)
    job_arch_mask = np.ones((n_jobs, len(ARCHES)), dtype=bool)
    for j, job in enumerate(jobs):
        if job.arch is not None:
            job_arch_mask[j] = False
            job_arch_mask[j, [arch_index[a] for a in job.arch]] = True
    arch_ok = job_arch_mask[:, prov_arch] if n_prov else np.zeros((n_jobs, 0), dtype=bool)

    memory = np.array([j.memory_mb for j in jobs], dtype=float)
    slot_memory = np.array([p.slot_memory_mb for p in providers], dtype=float)
    memory_ok = memory[:, None] <= slot_memory[None, :]

    price_per_s = np.array([p.price_per_s for p in providers], dtype=float)
    max_price = np.array([np.inf if j.max_price is None else j.max_price for j in jobs], dtype=float)
    with np.errstate(invalid="ignore"):
        price = compute_s * price_per_s[None, :]
        price_ok = ~(price > max_price[:, None] * (1 + PRICE_TOLERANCE) + PRICE_TOLERANCE)

    rtt_backlog = np.array([p.rtt_ms + p.backlog_ms for p in providers], dtype=float)
    deadline = np.array([np.inf if j.deadline_ms is None else j.deadline_ms for j in jobs], dtype=float)
    with np.errstate(invalid="ignore"):
        alone_latency = rtt_backlog[None, :] + 1000.0 * compute_s
        deadline_ok = ~(alone_latency > deadline[:, None])

    stage = np.full((n_jobs, n_prov), STAGE_OK, dtype=np.int8)
    # Apply in reverse so the earliest failing check wins.
    for index, ok in reversed(list(enumerate((model_ok, arch_ok, memory_ok, price_ok, deadline_ok)))):
        stage[~ok] = index

    marginal = np.array([p.marginal_w for p in providers], dtype=float)
    carbon = np.array([p.carbon_g_per_kwh for p in providers], dtype=float)
    beta = w.energy * marginal + w.carbon * marginal * carbon / 3.6e6 + w.price * price_per_s
    return Costs(
        compute_s=compute_s, stage=stage, beta=beta, delta=w.latency * rtt_backlog,
        gamma=1000.0 * w.latency, slots=np.array([p.slots for p in providers], dtype=np.int64),
        rtt_backlog_ms=rtt_backlog, deadline_ms=deadline,
    )
