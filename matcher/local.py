"""Local search on placements with deadlines, vectorised over every candidate move (pure).

Two kinds of move, each keeping the order of the slots it touches:
- *relocate*: one job leaves its slot (or the jobs not yet placed) and enters another
  slot before some job there (a *gap*). Feasible when the job meets its own deadline
  there and every job after the gap has at least the job's compute time of slack.
- *swap*: two jobs in different slots take each other's places, when both meet their
  deadlines and the jobs after each place have slack for the change.
Every (job, gap) and (job, job) pair is scored with arrays. Each pass applies the best
moves that touch disjoint slots, re-orders each touched slot by Smith's rule (the least
total completion time that meets every deadline), and scores again; a pair whose slots
did not change keeps its score from the pass before, so late passes, which change few
slots, score few pairs. A job that fits no gap may take the place of one job that
moves to its own best gap (an ejection). Placing a job outranks any cost, so unplaced
jobs move first. It stops when no move gains, or when time is up.

Before the first pass, jobs not yet placed may be inserted one at a time (the repair
of a schedule that missed deadlines), each in the gap that is cheapest at that moment.

Scoring is memory-bound: arrays are cut into chunks whose temporaries stay in the L2
cache, and the chunks are scored on SCORING_THREADS threads (numpy releases the GIL in
its loops). On the 2,000-job bench that is about twice as fast as one pass over
1M-cell chunks on one thread.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Callable

import numpy as np

from .costs import Costs
from .heuristics import compact, slot_cost, slot_ok, smith_order
from .result import Placement

CHUNK_CELLS = 1 << 17     # pairs scored per array step: 512 KB per float32 temporary stays in L2 cache
# Work is counted in scored pairs, so a budget of it gives the same placement on every
# run (a wall clock would not). Calibrated on the 2-core bench machine by a least-squares
# fit of pass times over seeds 1, 4 and 6: 6.2 ns per pair, and 8.9 us per placed job per
# pass for the Python around the arrays (about 1,440 pairs' worth).
CELLS_PER_SECOND = 230e6
JOB_CELLS = 1_440         # per placed job and pass
INSERTION_CELLS = 50_000  # per job inserted one at a time (about 0.3 ms)
REFLATTEN_SLOTS = 32      # slots an insertion run changes before it scores every gap afresh
PENDING_ROWS = 64         # jobs waiting for insertion scored at once (rows go stale as slots change)
SCORING_THREADS = 2       # numpy releases the GIL in its array loops, so row chunks score in parallel
GAIN_TOLERANCE = 1e-9     # relative to the mean job cost: smaller gains are float noise, and would loop
TIME_TOLERANCE_MS = 1e-9


def _row_chunks(n_rows: int, n_cols: int) -> list[slice]:
    """Row ranges of at most CHUNK_CELLS cells, at least one per scoring thread."""
    count = max(SCORING_THREADS, -(-n_rows * n_cols // CHUNK_CELLS))
    size = max(1, -(-n_rows // count))
    return [slice(lo, lo + size) for lo in range(0, n_rows, size)]


def _map_chunks(pool: ThreadPoolExecutor | None, fn, chunks: list[slice]) -> list:
    """fn over the chunks, on the call's scoring threads; results in chunk order (so the
    outcome does not depend on which thread finished first)."""
    if pool is None or len(chunks) <= 1:
        return [fn(c) for c in chunks]
    return list(pool.map(fn, chunks))


def _entry_cost(q_ms, start_ms, slack_ms, weight, deadline_ms, latency_weight: float):
    """What a job of compute `q_ms` adds by entering a gap (start, slack of the jobs after
    it, `weight`: cost per ms there), or inf where it would miss its deadline or push a
    later job past its own. Broadcasts; keeps the operands' precision."""
    ok = (q_ms + start_ms <= deadline_ms + TIME_TOLERANCE_MS) & (q_ms <= slack_ms + TIME_TOLERANCE_MS)
    return np.where(ok, q_ms * weight + latency_weight * start_ms, np.inf)


class _Lane:
    """One slot in run order, with what scoring needs: for gap g = 0..n, its start time,
    the jobs after it and their least slack; for each job its finish and the least slack
    of the jobs after it."""

    def __init__(self, costs: Costs, provider: int, jobs: list[int]):
        self.provider = provider
        self.jobs = jobs
        self.refresh(costs)

    def refresh(self, costs: Costs) -> None:
        p, order = self.provider, self.jobs
        q = 1000.0 * costs.compute_s[order, p] if order else np.zeros(0)
        self.finish = costs.rtt_backlog_ms[p] + np.cumsum(q)
        self.gap_start = np.r_[costs.rtt_backlog_ms[p], self.finish]
        slack = costs.deadline_ms[order] - self.finish if order else np.zeros(0)
        suffix = np.minimum.accumulate(slack[::-1])[::-1] if order else slack
        self.gap_slack = np.r_[suffix, np.inf]
        self.slack_after = self.gap_slack[1:]
        self.gap_tail = np.arange(len(order), -1, -1)


class _Search:
    def __init__(self, costs: Costs, placement: Placement, unplaced: list[int], allowed: np.ndarray,
                 latency_weight: float, pool: ThreadPoolExecutor | None = None):
        self.costs, self.allowed, self.lw = costs, allowed, latency_weight
        self.pool = pool
        # Moves are scored in single precision (half the memory traffic); each is checked
        # again in double precision before it is applied.
        self.compute32 = np.where(allowed, costs.compute_s, np.inf).astype(np.float32)
        self.lanes = [_Lane(costs, p, list(order)) for p, orders in sorted(placement.items()) for order in orders
                      if order]
        self.unplaced = sorted(unplaced)
        self._add_empty_lanes()
        # Per job: the best relocation (delta, lane, gap index) and swap (gain, partner).
        self.reloc: dict[int, tuple[float, int, int]] = {}
        self.swap: dict[int, tuple[float, int]] = {}
        self.touched: set[int] | None = None  # slots changed by the last pass; None: all
        self.cells = 0  # (job, gap) and (job, job) pairs scored so far: the search's work

    # --- the flat view scored each pass -------------------------------------------------
    def _flatten(self) -> None:
        costs = self.costs
        first_empty: set[int] = set()
        active = []
        for i, lane in enumerate(self.lanes):
            if lane.jobs:
                active.append(i)
            elif lane.provider not in first_empty:  # empty slots of a provider are alike
                first_empty.add(lane.provider)
                active.append(i)
        self.gap_lane = np.concatenate([np.full(len(self.lanes[i].jobs) + 1, i) for i in active])
        self.gap_index = np.concatenate([np.arange(len(self.lanes[i].jobs) + 1) for i in active])
        self.gap_prov = np.concatenate([np.full(len(self.lanes[i].jobs) + 1, self.lanes[i].provider) for i in active])
        self.gap_start = np.concatenate([self.lanes[i].gap_start for i in active])
        self.gap_slack = np.concatenate([self.lanes[i].gap_slack for i in active])
        self.gap_tail = np.concatenate([self.lanes[i].gap_tail for i in active])
        self.gap_beta = costs.beta[self.gap_prov]
        busy_ids = [i for i in active if self.lanes[i].jobs]
        busy = [self.lanes[i] for i in busy_ids]
        # Each list starts with an empty array: with no job placed, concatenate has nothing else.
        self.job = np.array([j for lane in busy for j in lane.jobs], dtype=np.int64)
        self.job_lane = np.concatenate([np.zeros(0, dtype=np.int64)]
                                       + [np.full(len(lane.jobs), i) for i, lane in zip(busy_ids, busy)])
        self.job_prov = np.concatenate([np.zeros(0, dtype=np.int64)] + [np.full(len(lane.jobs), lane.provider)
                                                                      for lane in busy])
        self.job_finish = np.concatenate([np.zeros(0)] + [lane.finish for lane in busy])
        self.job_slack_after = np.concatenate([np.zeros(0)] + [lane.slack_after for lane in busy])
        self.job_after = np.concatenate([np.zeros(0, dtype=np.int64)] + [lane.gap_tail[1:] for lane in busy])
        self.job_compute = costs.compute_s[self.job, self.job_prov]
        self.job_start = self.job_finish - 1000.0 * self.job_compute
        self.row_of = {j: r for r, j in enumerate(self.job.tolist())}

    def _changed(self, lanes: np.ndarray) -> np.ndarray:
        if self.touched is None:
            return np.ones(len(lanes), dtype=bool)
        return np.isin(lanes, np.fromiter(self.touched, dtype=np.int64, count=len(self.touched)))

    # --- relocation ---------------------------------------------------------------------
    def _gap_deltas(self, jobs: np.ndarray, own_lane: np.ndarray, gaps: np.ndarray) -> np.ndarray:
        """(jobs, gaps), float32: what each job entering each gap adds to the cost; inf
        where it would miss its deadline, push a later job past its own, is not allowed
        there, or the gap is in the job's own slot."""
        costs, f32 = self.costs, np.float32
        prov, lane = self.gap_prov[gaps], self.gap_lane[gaps]
        start, slack = self.gap_start[gaps].astype(f32), self.gap_slack[gaps].astype(f32)
        # Cost of one ms of compute at a gap: energy, and the wait of the job and of those after it.
        weight = (self.gap_beta[gaps] / 1000.0 + self.lw * (1 + self.gap_tail[gaps])).astype(f32)
        q = 1000.0 * self.compute32[jobs][:, prov]
        with np.errstate(invalid="ignore"):
            delta = _entry_cost(q, start[None, :], slack[None, :], weight[None, :],
                                costs.deadline_ms[jobs].astype(f32)[:, None], f32(self.lw))
        delta[(q == np.inf) | (lane[None, :] == own_lane[:, None])] = np.inf
        return delta

    def _insertions(self, jobs: np.ndarray, own_lane: np.ndarray, gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cheapest feasible gap (among `gaps`) outside each job's own slot: (delta, gap)."""
        best_delta = np.full(len(jobs), np.inf)
        best_gap = np.full(len(jobs), -1, dtype=np.int64)
        self.cells += len(jobs) * len(gaps)
        if not len(gaps) or not len(jobs):
            return best_delta, best_gap

        def score(a: slice) -> None:
            delta = self._gap_deltas(jobs[a], own_lane[a], gaps)
            at = delta.argmin(axis=1)
            best_delta[a] = delta[np.arange(len(delta)), at]
            best_gap[a] = gaps[at]

        _map_chunks(self.pool, score, _row_chunks(len(jobs), len(gaps)))
        return best_delta, best_gap

    # --- placing the unplaced, one at a time -----------------------------------------------
    def insert_pending(self, order: list[int], out_of_time: Callable[[], bool] = lambda: False) -> None:
        """Place the unplaced jobs one at a time in `order`, each in the cheapest gap it
        fits now, as a repair does; jobs no gap takes try every slot with Smith's order,
        which finds a feasible order whenever one exists. Gaps are scored with arrays
        once; after that only the slots an insertion changed are scored again, one by one,
        until REFLATTEN_SLOTS of them have changed and all are scored afresh."""
        waiting = set(self.unplaced)
        pending = [j for j in order if j in waiting]
        changed: list[int] = []
        deltas = stale = row_of = None
        for n, j in enumerate(pending):
            if out_of_time():
                break
            if deltas is None or len(changed) >= REFLATTEN_SLOTS or j not in row_of:
                self._flatten()
                rest = np.array(pending[n:n + PENDING_ROWS], dtype=np.int64)
                deltas = np.empty((len(rest), len(self.gap_lane)), dtype=np.float32)
                self.cells += deltas.size

                def score(a: slice) -> None:
                    deltas[a] = self._gap_deltas(rest[a], np.full(len(rest[a]), -1), np.arange(len(self.gap_lane)))

                _map_chunks(self.pool, score, _row_chunks(len(rest), len(self.gap_lane)))
                row_of = {job: r for r, job in enumerate(rest.tolist())}
                stale = np.zeros(len(self.gap_lane), dtype=bool)
                changed = []
            row = np.where(stale, np.inf, deltas[row_of[j]])
            g = int(row.argmin())
            best = (float(row[g]), int(self.gap_lane[g]), int(self.gap_index[g])) if np.isfinite(row[g]) else None
            for i in changed:
                option = self._lane_insertion(j, i)
                if option is not None and (best is None or option < best):
                    best = option
            self.cells += INSERTION_CELLS
            if best is None:
                continue
            _, i, index = best
            lane = self.lanes[i]
            new_order = lane.jobs[:index] + [j] + lane.jobs[index:]
            if not slot_ok(self.costs, lane.provider, new_order):  # scored in single precision
                continue
            self._set_order(i, new_order)
            self.unplaced.remove(j)
            stale |= self.gap_lane == i
            # A slot that was empty may leave its provider none: a fresh empty one is scored one by one too.
            for lane_id in [i, *self._add_empty_lanes()]:
                if lane_id not in changed:
                    changed.append(lane_id)
        for j in list(self.unplaced):
            if out_of_time():
                break
            self._smith_insertion(j)
        self.touched = None

    def _lane_insertion(self, j: int, i: int) -> tuple[float, int, int] | None:
        """The cheapest gap of slot i for job j, scored in double precision: (delta, i, gap)."""
        costs, lane = self.costs, self.lanes[i]
        p = lane.provider
        if not self.allowed[j, p]:
            return None
        delta = _entry_cost(1000.0 * costs.compute_s[j, p], lane.gap_start, lane.gap_slack,
                            costs.beta[p] / 1000.0 + self.lw * (1 + lane.gap_tail), costs.deadline_ms[j], self.lw)
        g = int(delta.argmin())
        return (float(delta[g]), i, g) if np.isfinite(delta[g]) else None

    def _smith_insertion(self, j: int) -> None:
        """Job j into the slot where, with the slot re-ordered by Smith's rule, it adds least."""
        costs, best = self.costs, None
        for i, lane in enumerate(self.lanes):
            if not self.allowed[j, lane.provider]:
                continue
            # Whichever job runs last ends when all of them are done: no later than the latest deadline.
            end = lane.gap_start[-1] + 1000.0 * costs.compute_s[j, lane.provider]
            if end > costs.deadline_ms[lane.jobs + [j]].max() + TIME_TOLERANCE_MS:
                continue
            order, dropped = smith_order(self.costs, lane.provider, lane.jobs + [j])
            if dropped:
                continue
            delta = (slot_cost(self.costs, lane.provider, order, self.lw)
                     - slot_cost(self.costs, lane.provider, lane.jobs, self.lw))
            if best is None or (delta, i) < best[:2]:
                best = (delta, i, order)
        if best is not None:
            self.lanes[best[1]].jobs = best[2]
            self.lanes[best[1]].refresh(self.costs)
            self.unplaced.remove(j)
            self._add_empty_lanes()

    def _set_order(self, i: int, order: list[int]) -> None:
        """Slot i runs `order`, re-ordered by Smith's rule."""
        lane = self.lanes[i]
        if len(order) > 1:
            smith, dropped = smith_order(self.costs, lane.provider, order)
            if not dropped:
                order = smith
        lane.jobs = order
        lane.refresh(self.costs)

    def _score_relocations(self) -> None:
        jobs = np.concatenate([np.array(self.unplaced, dtype=np.int64), self.job])
        own = np.concatenate([np.full(len(self.unplaced), -1), self.job_lane])
        cached = np.array([self.reloc.get(j, (np.inf, -1, -2))[1] for j in jobs.tolist()], dtype=np.int64)
        # A job's cost at a gap depends on the gap's slot only, so a cached best stays
        # right unless its slot changed (or is now the job's own): only those jobs are
        # scored on every gap, the rest on the changed slots' gaps.
        full = (cached == -2) | self._changed(cached) | ((cached == own) & (own >= 0))
        all_gaps = np.arange(len(self.gap_lane))
        delta, gap = self._insertions(jobs[full], own[full], all_gaps)
        for j, d, g in zip(jobs[full].tolist(), delta.tolist(), gap.tolist()):
            self.reloc[j] = (d, int(self.gap_lane[g]) if g >= 0 else -1, int(self.gap_index[g]) if g >= 0 else -1)
        rest = ~full
        if rest.any():
            new_gaps = all_gaps[self._changed(self.gap_lane)]
            delta, gap = self._insertions(jobs[rest], own[rest], new_gaps)
            for j, d, g in zip(jobs[rest].tolist(), delta.tolist(), gap.tolist()):
                if d < self.reloc[j][0]:
                    self.reloc[j] = (d, int(self.gap_lane[g]), int(self.gap_index[g]))

    def _leave_gain(self, rows: np.ndarray) -> np.ndarray:
        """What a placed job's leaving saves: its own cost and the wait it puts on the jobs after it."""
        compute = self.job_compute[rows]
        return (compute * self.costs.beta[self.job_prov[rows]] + self.lw * self.job_finish[rows]
                + self.lw * 1000.0 * compute * self.job_after[rows])

    # --- swaps ----------------------------------------------------------------------------
    def _swaps(self, rows: np.ndarray, cols: np.ndarray, col_rows: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For each placed job in `rows`, the best partner among `cols`: (gain, partner);
        and, as a swap is the same move seen from either job, for each job in `cols` the
        best partner among the `rows` flagged in `col_rows`: (gain, partner)."""
        costs = self.costs
        best_gain = np.full(len(rows), -np.inf)
        best_col = np.full(len(rows), -1, dtype=np.int64)
        col_gain = np.full(len(cols), -np.inf)
        col_best = np.full(len(cols), -1, dtype=np.int64)
        self.cells += len(rows) * len(cols)
        if not len(rows) or not len(cols):
            return best_gain, best_col, col_gain, col_best
        f32 = np.float32
        prov_a, prov_b = self.job_prov[rows], self.job_prov[cols]
        # Times in ms: each job's own compute, start and deadline, and the least slack of
        # the jobs after it (how much later they may finish).
        own_a, own_b = (1000.0 * self.job_compute[rows]).astype(f32), (1000.0 * self.job_compute[cols]).astype(f32)
        start_a, start_b = self.job_start[rows].astype(f32), self.job_start[cols].astype(f32)
        dl_a, dl_b = costs.deadline_ms[self.job[rows]].astype(f32), costs.deadline_ms[self.job[cols]].astype(f32)
        slack_a, slack_b = self.job_slack_after[rows].astype(f32), self.job_slack_after[cols].astype(f32)
        lane_a, lane_b = self.job_lane[rows], self.job_lane[cols]
        # Cost of one more ms of compute in a place: energy, and the wait of the job and of those after it.
        weight_a = (costs.beta[prov_a] / 1000.0 + self.lw * (1 + self.job_after[rows])).astype(f32)
        weight_b = (costs.beta[prov_b] / 1000.0 + self.lw * (1 + self.job_after[cols])).astype(f32)
        tol = f32(TIME_TOLERANCE_MS)
        there_b = 1000.0 * self.compute32[self.job[cols]]  # (cols, P): each col job on every provider

        def score(a: slice) -> tuple[np.ndarray, np.ndarray] | None:
            a_there = 1000.0 * self.compute32[self.job[rows[a]]][:, prov_b]       # a in b's place
            b_there = there_b[:, prov_a[a]].T                                       # b in a's place
            grow_b = a_there - own_b[None, :]
            grow_a = b_there - own_a[a, None]
            with np.errstate(invalid="ignore"):
                ok = ((lane_a[a, None] != lane_b[None, :]) & (a_there < np.inf) & (b_there < np.inf)
                      & (a_there + start_b[None, :] <= dl_a[a, None] + tol)
                      & (b_there + start_a[a, None] <= dl_b[None, :] + tol)
                      & (grow_b <= slack_b[None, :] + tol) & (grow_a <= slack_a[a, None] + tol))
                change = grow_b * weight_b[None, :] + grow_a * weight_a[a, None]
            gain = np.where(ok, -change, f32(-np.inf))
            at = gain.argmax(axis=1)
            best_gain[a] = gain[np.arange(gain.shape[0]), at]
            best_col[a] = cols[at]
            flagged = np.flatnonzero(col_rows[a])
            if not len(flagged):
                return None
            sub = gain[flagged]
            at = sub.argmax(axis=0)
            return sub[at, np.arange(len(cols))], rows[a][flagged[at]]

        # Each chunk's best row for every column, merged in chunk order (first best wins).
        for part in _map_chunks(self.pool, score, _row_chunks(len(rows), len(cols))):
            if part is not None:
                better = part[0] > col_gain
                col_gain[better] = part[0][better]
                col_best[better] = part[1][better]
        return best_gain, best_col, col_gain, col_best

    def _score_swaps(self) -> None:
        rows = np.arange(len(self.job))
        partner_lane = np.array([self._lane_of_job(self.swap.get(j, (0.0, -2))[1]) for j in self.job.tolist()],
                                dtype=np.int64)
        moved = self._changed(self.job_lane)
        # A pair's score depends only on its two jobs' slots: jobs in changed slots, and
        # jobs whose cached partner's slot changed, are scored against every job; the
        # rest need only the pairs with a job in a changed slot, which that pass scores too.
        full = moved | self._changed(partner_lane) | np.array([j not in self.swap for j in self.job.tolist()],
                                                                dtype=bool)
        gain, col, col_gain, col_best = self._swaps(rows[full], rows, moved[full])
        for j, g, c in zip(self.job[full].tolist(), gain.tolist(), col.tolist()):
            self.swap[j] = (g, int(self.job[c]) if c >= 0 else -1)
        for r in np.flatnonzero(~full & (col_best >= 0)).tolist():
            j = int(self.job[r])
            if col_gain[r] > self.swap[j][0]:
                self.swap[j] = (float(col_gain[r]), int(self.job[col_best[r]]))

    def _lane_of_job(self, j: int) -> int:
        r = self.row_of.get(j)
        return -1 if r is None else int(self.job_lane[r])

    # --- one pass -------------------------------------------------------------------------
    def step(self) -> bool:
        """Score and apply one round of moves; False when none gains."""
        self._flatten()
        self.cells += JOB_CELLS * len(self.job)
        self._score_relocations()
        self._score_swaps()
        gains = self._leave_gain(np.arange(len(self.job)))
        noise = GAIN_TOLERANCE * max(1.0, float(gains.sum())) / max(1, len(self.job))
        moves = []  # (gain, job, kind, detail)
        for j in self.unplaced:
            d, lane, index = self.reloc[j]
            if np.isfinite(d):
                moves.append((np.inf, j, "reloc", (lane, index)))
        for r, j in enumerate(self.job.tolist()):
            d, lane, index = self.reloc[j]
            if gains[r] - d > noise:
                moves.append((gains[r] - d, j, "reloc", (lane, index)))
            g, partner = self.swap[j]
            if g > noise:
                moves.append((g, j, "swap", partner))
        moves.sort(key=lambda m: (-m[0], m[1]))
        touched: set[int] = set()
        for gain, j, kind, detail in moves:
            source = self._lane_of_job(j)
            if kind == "reloc":
                target, index = detail
                if target in touched or source in touched:
                    continue
                new_target = self.lanes[target].jobs[:index] + [j] + self.lanes[target].jobs[index:]
                changes = {target: new_target}
                if source >= 0:
                    changes[source] = [y for y in self.lanes[source].jobs if y != j]
            else:
                other = self._lane_of_job(detail)
                if source in touched or other in touched:
                    continue
                changes = {source: [detail if y == j else y for y in self.lanes[source].jobs],
                           other: [j if y == detail else y for y in self.lanes[other].jobs]}
            # Scores are single precision: apply a move only if it keeps every deadline
            # and gains in double precision.
            if not all(slot_ok(self.costs, self.lanes[i].provider, order) for i, order in changes.items()):
                continue
            change = sum(slot_cost(self.costs, self.lanes[i].provider, order, self.lw)
                         - slot_cost(self.costs, self.lanes[i].provider, self.lanes[i].jobs, self.lw)
                         for i, order in changes.items())
            if source >= 0 and change >= -noise:
                continue
            for i, order in changes.items():
                self.lanes[i].jobs = order
            if source < 0:
                self.unplaced.remove(j)
            touched.update(changes)
        for j in [j for j in self.unplaced if not np.isfinite(self.reloc[j][0])]:
            ejection = self._ejection(j, touched)
            if ejection is None:
                continue
            lane, order, x, (x_lane, x_index) = ejection
            x_order = self.lanes[x_lane].jobs[:x_index] + [x] + self.lanes[x_lane].jobs[x_index:]
            # x's gap was scored in single precision, like every other move: check it again.
            if not slot_ok(self.costs, self.lanes[x_lane].provider, x_order):
                continue
            self.lanes[lane].jobs = order
            self.lanes[x_lane].jobs = x_order
            self.unplaced.remove(j)
            touched.update((lane, x_lane))
        for i in touched:
            self._set_order(i, self.lanes[i].jobs)
        # A provider whose empty slot filled gets another while it has one to spare.
        touched.update(self._add_empty_lanes())
        self.touched = touched
        return bool(touched)

    def _add_empty_lanes(self) -> list[int]:
        """One empty slot for each provider with a slot to spare and none empty yet;
        returns the new lanes' ids."""
        busy = np.bincount(np.array([lane.provider for lane in self.lanes if lane.jobs], dtype=np.int64),
                           minlength=len(self.costs.slots))
        has_empty = {lane.provider for lane in self.lanes if not lane.jobs}
        added = []
        for p in np.flatnonzero(busy < self.costs.slots).tolist():
            if p not in has_empty:
                self.lanes.append(_Lane(self.costs, p, []))
                added.append(len(self.lanes) - 1)
        return added

    def _ejection(self, j: int, touched: set[int]) -> tuple[int, list[int], int, tuple[int, int]] | None:
        """The cheapest (slot, its new order with j in and some x out, x, x's best gap
        elsewhere) that keeps every deadline, or None."""
        costs, best = self.costs, None
        for i, lane in enumerate(self.lanes):
            p = lane.provider
            if (not lane.jobs or i in touched or not self.allowed[j, p]
                    or costs.rtt_backlog_ms[p] + 1000.0 * costs.compute_s[j, p] > costs.deadline_ms[j] + TIME_TOLERANCE_MS):
                continue
            base = None
            for x in lane.jobs:
                d, x_lane, x_index = self.reloc.get(x, (np.inf, -1, -1))
                if not np.isfinite(d) or x_lane in touched:
                    continue
                trial, dropped = smith_order(costs, p, [y for y in lane.jobs if y != x] + [j])
                if dropped:
                    continue
                if base is None:
                    base = slot_cost(costs, p, lane.jobs, self.lw)
                change = slot_cost(costs, p, trial, self.lw) - base + d
                if best is None or (change, i, x) < best[0]:
                    best = ((change, i, x), i, trial, x, (x_lane, x_index))
        return None if best is None else best[1:]

    def placement(self) -> Placement:
        out: Placement = {}
        for lane in self.lanes:
            if lane.jobs:
                out.setdefault(lane.provider, []).append(list(lane.jobs))
        return compact(out)


def improve(costs: Costs, placement: Placement, unplaced: list[int], allowed: np.ndarray,
            latency_weight: float, *, out_of_time: Callable[[], bool], max_passes: int = 500,
            work_budget: float = np.inf, insertion_order: list[int] | None = None
            ) -> tuple[Placement, list[int], int, str]:
    """Better placement by relocations, swaps and ejections (see the module doc); with
    `insertion_order`, the unplaced jobs are first inserted one at a time in that order.
    It stops when no move gains, after `work_budget` scored pairs (see CELLS_PER_SECOND),
    after `max_passes`, or when `out_of_time()`. Returns (placement, jobs still unplaced,
    passes, why it stopped: "converged", "work", "passes" or "time")."""
    # The scoring threads live for this call only: no state outlives a solve.
    with ThreadPoolExecutor(SCORING_THREADS, thread_name_prefix="matcher-scoring") if SCORING_THREADS > 1 \
            else nullcontext() as pool:
        search = _Search(costs, placement, unplaced, allowed, latency_weight, pool)
        if insertion_order is not None:
            search.insert_pending(insertion_order, out_of_time)
        passes = 0
        while True:
            if passes >= max_passes:
                stopped = "passes"
            elif search.cells >= work_budget:
                stopped = "work"
            elif out_of_time():
                stopped = "time"
            else:
                passes += 1
                if search.step():
                    continue
                stopped = "converged"
            break
    return search.placement(), list(search.unplaced), passes, stopped
