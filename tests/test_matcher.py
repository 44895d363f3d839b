"""Matcher: the contract checker on every result, brute force on small random instances."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matcher import Job, Problem, ProblemError, Provider, Weights, problem_from_json, solve
from matcher.check import check_result

MODELS = ("resnet50", "squeezenet")


@st.composite
def problems(draw, *, max_jobs=4, max_providers=3, deadlines=False):
    providers = []
    for i in range(draw(st.integers(1, max_providers))):
        throughput = {m: draw(st.floats(5, 500)) for m in MODELS if draw(st.booleans()) or m == "resnet50"}
        providers.append(Provider(
            id=f"p{i}", arch=draw(st.sampled_from(["cuda", "arm64", "x86_64"])), slots=draw(st.integers(1, 2)),
            slot_memory_mb=draw(st.sampled_from([1000.0, 8000.0])), marginal_w=draw(st.floats(1, 300)),
            carbon_g_per_kwh=draw(st.floats(0, 800)), rtt_ms=draw(st.floats(0, 50)), backlog_ms=0.0,
            price_per_s=draw(st.floats(0, 0.01)), throughput=throughput))
    jobs = []
    for i in range(draw(st.integers(1, max_jobs))):
        items = draw(st.integers(1, 64))
        jobs.append(Job(
            id=f"j{i}", model=draw(st.sampled_from(MODELS)), items=items,
            memory_mb=draw(st.sampled_from([0.0, 500.0, 4000.0])),
            arch=draw(st.sampled_from([None, ("cuda",), ("arm64", "x86_64")])),
            deadline_ms=draw(st.floats(50, 1500)) if deadlines and draw(st.booleans()) else None,
            max_price=draw(st.sampled_from([None, 0.01, 0.001]))))
    weights = Weights(energy=draw(st.floats(0, 2)), latency=draw(st.floats(0.001, 0.1)),
                      carbon=draw(st.floats(0, 1)), price=draw(st.floats(0, 10)))
    return Problem(tuple(providers), tuple(jobs), weights)


def brute_force(problem: Problem) -> tuple[int, float]:
    """(most jobs placed, least objective among those) by trying every placement."""
    providers = {p.id: p for p in problem.providers}
    lanes = [(p.id, s) for p in problem.providers for s in range(p.slots)]
    best = (0, 0.0)
    w = problem.weights
    for choice in itertools.product([None, *range(len(lanes))], repeat=len(problem.jobs)):
        per_lane: dict[int, list] = {}
        for job, lane in zip(problem.jobs, choice):
            if lane is not None:
                per_lane.setdefault(lane, []).append(job)
        ok, placed, total = True, 0, 0.0
        for lane, jobs in per_lane.items():
            p = providers[lanes[lane][0]]
            lane_best = None
            for order in itertools.permutations(jobs):
                cost, t, good = 0.0, p.rtt_ms + p.backlog_ms, True
                for j in order:
                    if j.model not in p.throughput or (j.arch and p.arch not in j.arch) or j.memory_mb > p.slot_memory_mb:
                        good = False
                        break
                    c = j.items / p.throughput[j.model]
                    if j.max_price is not None and c * p.price_per_s > j.max_price * (1 + 1e-9) + 1e-9:
                        good = False
                        break
                    t += 1000 * c
                    if j.deadline_ms is not None and t > j.deadline_ms:
                        good = False
                        break
                    e = c * p.marginal_w
                    cost += w.energy * e + w.latency * t + w.carbon * e / 3.6e6 * p.carbon_g_per_kwh + w.price * c * p.price_per_s
                if good and (lane_best is None or cost < lane_best):
                    lane_best = cost
            if lane_best is None:
                ok = False
                break
            placed += len(jobs)
            total += lane_best
        if ok and (placed > best[0] or (placed == best[0] and total < best[1])):
            best = (placed, total)
    return best


@settings(max_examples=60, deadline=None)
@given(problems())
def test_optimal_without_deadlines_matches_brute_force(problem):
    result = solve(problem)
    assert check_result(problem, result) == []
    placed, objective = brute_force(problem)
    assert len(result.assignments) == placed
    assert result.optimal
    assert math.isclose(result.objective, objective, rel_tol=1e-6, abs_tol=1e-6)


@settings(max_examples=40, deadline=None)
@given(problems(deadlines=True, max_jobs=4, max_providers=2))
def test_deadlines_never_broken_and_small_cases_optimal(problem):
    result = solve(problem, time_limit_s=5.0)
    assert check_result(problem, result) == []
    placed, objective = brute_force(problem)
    assert len(result.assignments) == placed
    # CP-SAT rounds durations to microseconds; allow for that, nothing more.
    assert result.objective <= objective * (1 + 1e-4) + 1e-4
    # The bound is proven: no placement of as many jobs costs less.
    assert result.lower_bound <= objective * (1 + 1e-9) + 1e-9


@settings(max_examples=40, deadline=None)
@given(problems(deadlines=True, max_jobs=4, max_providers=2))
def test_flow_with_pairs_too_slow_for_a_deadline_still_bounds(problem):
    # The deadline path's flow also allows pairs where a job alone would be late: it must
    # still cost no more than the best placement of every job (brute force), unclamped.
    import numpy as np

    from matcher.costs import build_costs
    from matcher.exact import solve_exact

    costs = build_costs(problem)
    placeable = np.flatnonzero(costs.feasible.any(axis=1))
    placed, objective = brute_force(problem)
    if placed < len(placeable) or not len(placeable):
        return  # the flow's bound is for placements of every placeable job
    bound = solve_exact(costs, placeable, costs.before_deadline).lower_bound
    assert bound <= objective * (1 + 1e-9) + 1e-9


@settings(max_examples=40, deadline=None)
@given(problems(max_jobs=8, max_providers=4, deadlines=True), st.sampled_from(["greedy-price", "greedy-energy", "round-robin"]))
def test_baselines_obey_the_contract(problem, solver):
    result = solve(problem, solver=solver)
    assert check_result(problem, result) == []
    assert result.solver == solver


def test_deterministic():
    problem = problem_from_json(json.loads(EXAMPLE))
    assert solve(problem).to_json() == solve(problem).to_json()


def test_sparse_large_instance_is_certified_and_checked():
    # Big enough that the flow starts sparse and column generation must price arcs in.
    import numpy as np
    rng = np.random.default_rng(3)
    providers = tuple(Provider(f"p{i:03d}", "cuda", int(rng.integers(1, 4)), 1e9, float(rng.uniform(5, 300)),
                               300.0, float(rng.uniform(0, 40)), 0.0, 0.0, {"m": float(rng.uniform(10, 1000))})
                      for i in range(60))
    jobs = tuple(Job(f"j{i:04d}", "m", int(rng.integers(1, 200))) for i in range(600))
    problem = Problem(providers, jobs, Weights())
    result = solve(problem)
    assert result.optimal and result.stats["certified"]
    assert check_result(problem, result) == []
    assert len(result.assignments) == 600


def test_unassigned_reasons_and_explain():
    problem = problem_from_json({
        "providers": [{"id": "gpu", "arch": "cuda", "slots": 1, "slot_memory_mb": 1000, "marginal_w": 100,
                       "price_per_s": 1.0, "throughput": {"resnet50": 10.0}}],
        "jobs": [{"id": "a", "model": "bert", "items": 1}, {"id": "b", "model": "resnet50", "items": 1, "arch": ["arm64"]},
                 {"id": "c", "model": "resnet50", "items": 1, "memory_mb": 5000},
                 {"id": "d", "model": "resnet50", "items": 10, "max_price": 0.5},
                 {"id": "e", "model": "resnet50", "items": 10, "deadline_ms": 100}]})
    result = solve(problem)
    reasons = {u.job: u.reason for u in result.unassigned}
    assert reasons == {"a": "model", "b": "arch", "c": "memory", "d": "price", "e": "deadline"}
    explain = {u.job: u.explain for u in result.unassigned}
    assert "do not offer model bert" in explain["a"]
    assert "would cost more than 0.5" in explain["d"]


def test_problem_errors_name_the_field():
    with pytest.raises(ProblemError, match=r"problem.providers\[0\].slots: expected int >= 1"):
        problem_from_json({"providers": [{"id": "p", "arch": "cuda", "slots": 0, "marginal_w": 1, "throughput": {}}],
                           "jobs": []})


EXAMPLE = """{"weights": {"energy": 1.0, "latency": 0.01, "carbon": 0.0, "price": 0.0},
 "providers": [{"id": "p1", "arch": "cuda", "slots": 2, "slot_memory_mb": 24000,
                "marginal_w": 180.0, "carbon_g_per_kwh": 320.0, "rtt_ms": 25.0,
                "backlog_ms": 0.0, "price_per_s": 0.0005,
                "throughput": {"resnet50": 850.0, "squeezenet": 4000.0}}],
 "jobs": [{"id": "j1", "model": "resnet50", "items": 64, "memory_mb": 900,
           "arch": ["cuda", "arm64"], "deadline_ms": 1500, "max_price": 0.05}]}"""


def test_match_cli_prints_json(tmp_path):
    path = tmp_path / "problem.json"
    path.write_text(EXAMPLE)
    out = subprocess.run([sys.executable, "-m", "node.cli", "match", str(path), "--explain"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["assignments"][0]["provider"] == "p1" and result["optimal"] is True


def _full_graph_optimum(problem: Problem) -> float:
    """The no-deadline optimum from one min-cost flow over every (job, provider, k) arc."""
    import numpy as np
    from ortools.graph.python import min_cost_flow

    from matcher.costs import build_costs
    costs = build_costs(problem)
    n, n_prov = costs.feasible.shape
    depth = [-(-n // int(s)) for s in costs.slots]
    offsets = np.concatenate([[0], np.cumsum(depth)])
    flow = min_cost_flow.SimpleMinCostFlow()
    scale = 1e6
    sink = n + int(offsets[-1])
    for j, p in zip(*np.nonzero(costs.feasible)):
        for k in range(1, depth[p] + 1):
            cost = costs.compute_s[j, p] * (costs.beta[p] + costs.gamma * k) + costs.delta[p]
            flow.add_arc_with_capacity_and_unit_cost(int(j), n + int(offsets[p]) + k - 1, 1, int(round(cost * scale)))
    for p in range(n_prov):
        for k in range(depth[p]):
            flow.add_arc_with_capacity_and_unit_cost(n + int(offsets[p]) + k, sink, int(costs.slots[p]), 0)
    for j in range(n):
        flow.set_node_supply(j, 1)
    flow.set_node_supply(sink, -n)
    assert flow.solve() == flow.OPTIMAL
    return flow.optimal_cost() / scale


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 10_000))
def test_column_generation_matches_the_full_graph(seed):
    # Several models, memory and price limits: many pricing groups, some of one job.
    import numpy as np
    rng = np.random.default_rng(seed)
    models = ("a", "b", "c")
    providers = tuple(Provider(
        f"p{i:02d}", "cuda", int(rng.integers(1, 4)), float(rng.choice([1000, 8000])), float(rng.uniform(5, 300)),
        float(rng.uniform(0, 700)), float(rng.uniform(0, 40)), 0.0, float(rng.uniform(0, 0.002)),
        {m: float(rng.uniform(10, 1000)) for m in models if rng.random() < 0.8}) for i in range(10))
    jobs = tuple(Job(f"j{i:03d}", str(rng.choice(models)), int(rng.integers(1, 200)),
                     memory_mb=float(rng.choice([500, 4000])),
                     max_price=None if rng.random() < 0.7 else float(rng.uniform(0.001, 0.05)))
                 for i in range(120))
    problem = Problem(providers, jobs, Weights(energy=1.0, latency=0.01, carbon=0.1, price=5.0))
    result = solve(problem)
    assert check_result(problem, result) == []
    if result.unassigned:  # only jobs no provider can take; the rest must all be placed
        assert all(u.reason != "deadline" for u in result.unassigned)
    placed = Problem(providers, tuple(j for j in jobs if j.id not in {u.job for u in result.unassigned}),
                     problem.weights)
    assert result.optimal
    assert result.objective == pytest.approx(_full_graph_optimum(placed), rel=1e-6)


@settings(max_examples=4, deadline=None)
@given(st.integers(0, 10_000))
def test_identical_jobs_share_a_flow_node_and_stay_optimal(seed):
    # Few distinct item counts: classes of many jobs, spread over several positions each.
    import numpy as np
    rng = np.random.default_rng(seed)
    providers = tuple(Provider(f"p{i}", "cuda", int(rng.integers(1, 4)), 1e9, float(rng.uniform(5, 300)), 0.0,
                               float(rng.uniform(0, 40)), 0.0, 0.0,
                               {"a": float(rng.uniform(10, 1000)), "b": float(rng.uniform(10, 1000))})
                      for i in range(8))
    jobs = tuple(Job(f"j{i:03d}", str(rng.choice(["a", "b"])), int(rng.choice([4, 16, 64])))
                 for i in range(150))
    problem = Problem(providers, jobs, Weights())
    result = solve(problem)
    assert check_result(problem, result) == [] and len(result.assignments) == 150
    assert result.optimal
    assert result.objective == pytest.approx(_full_graph_optimum(problem), rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 60), st.floats(20, 900)), min_size=1, max_size=6))
def test_smith_order_is_the_best_feasible_order_of_a_slot(jobs):
    from matcher.costs import build_costs
    from matcher.heuristics import slot_ok, smith_order

    problem = Problem((Provider("p", "cuda", 1, 1e9, 50.0, 0.0, 5.0, 0.0, 0.0, {"m": 100.0}),),
                      tuple(Job(f"j{i}", "m", items, deadline_ms=d) for i, (items, d) in enumerate(jobs)), Weights())
    costs = build_costs(problem)
    lane = list(range(len(jobs)))
    order, dropped = smith_order(costs, 0, lane)

    def total_completion(seq):
        t, total = costs.rtt_backlog_ms[0], 0.0
        for j in seq:
            t += 1000.0 * costs.compute_s[j, 0]
            total += t
        return total

    feasible = [seq for seq in itertools.permutations(lane) if slot_ok(costs, 0, list(seq))]
    if feasible:  # a feasible order exists: Smith's rule finds the best one and drops nothing
        assert not dropped and slot_ok(costs, 0, order)
        assert total_completion(order) == pytest.approx(min(total_completion(s) for s in feasible))
    else:
        assert dropped


@settings(max_examples=3, deadline=None)
@given(st.integers(0, 10_000))
def test_hull_pricing_matches_the_full_graph(seed):
    # Instances large enough for convex-hull pricing are too large for a full-graph check,
    # so force the hull path on a small one: every group priced by hull queries, and the
    # one complete pricing pass done a class at a time.
    import numpy as np

    import matcher.exact as exact
    rng = np.random.default_rng(seed)
    providers = tuple(Provider(f"p{i:02d}", "cuda", int(rng.integers(1, 4)), 1e9, float(rng.uniform(5, 300)),
                               0.0, float(rng.uniform(0, 40)), 0.0, 0.0,
                               {m: float(rng.uniform(10, 1000)) for m in ("a", "b")}) for i in range(15))
    jobs = tuple(Job(f"j{i:03d}", str(rng.choice(["a", "b"])), int(rng.integers(1, 100))) for i in range(150))
    problem = Problem(providers, jobs, Weights())
    dense_cells = exact.DENSE_PRICING_CELLS
    exact.DENSE_PRICING_CELLS = 1
    try:
        result = solve(problem)
    finally:
        exact.DENSE_PRICING_CELLS = dense_cells
    assert check_result(problem, result) == [] and result.optimal
    optimum = _full_graph_optimum(problem)
    assert result.objective == pytest.approx(optimum, rel=1e-6)
    assert result.stats["flow_bound_gap"] <= 1e-9


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_tree_duals_are_optimal_for_the_restricted_flow(seed):
    # Random sparse transportation problems: the duals from the flow's forest must make
    # every arc carrying flow tight, no arc with room cheaper, positions with room free
    # (v = 0), and their value equal to the flow's cost.
    import numpy as np
    from ortools.graph.python import min_cost_flow

    from matcher.exact import _duals
    rng = np.random.default_rng(seed)
    n_cls, n_pos = int(rng.integers(2, 12)), int(rng.integers(2, 15))
    supply = rng.integers(1, 5, n_cls)
    capacity = rng.integers(1, 4, n_pos)
    capacity[0] = supply.sum()  # always room for everyone
    arcs = {(c, 0) for c in range(n_cls)} | {(int(rng.integers(n_cls)), int(rng.integers(n_pos)))
                                             for _ in range(3 * n_cls)}
    a_cls, a_pos = (np.array(x) for x in zip(*sorted(arcs)))
    cost = rng.integers(0, 50, len(a_cls)).astype(float)
    cost[a_pos == 0] += 100  # the catch-all position is dear
    flow = min_cost_flow.SimpleMinCostFlow()
    sink = n_cls + n_pos
    arc_ids = flow.add_arcs_with_capacity_and_unit_cost(a_cls, n_cls + a_pos, supply[a_cls], cost.astype(np.int64))
    flow.add_arcs_with_capacity_and_unit_cost(n_cls + np.arange(n_pos), np.full(n_pos, sink), capacity,
                                              np.zeros(n_pos, dtype=np.int64))
    flow.set_nodes_supplies(np.arange(sink + 1), np.r_[supply, np.zeros(n_pos, dtype=np.int64), -supply.sum()])
    assert flow.solve() == flow.OPTIMAL
    x = flow.flows(arc_ids)
    used, room = x > 0, x < supply[a_cls]
    v = _duals(a_cls[used], a_pos[used], cost[used], a_cls[room], a_pos[room], cost[room], n_cls, n_pos, 1e-9)[:n_pos]
    u = np.full(n_cls, np.inf)
    np.minimum.at(u, a_cls[used], cost[used] - v[a_pos[used]])
    reduced = cost - u[a_cls] - v[a_pos]
    assert np.all(v <= 1e-9)
    assert np.allclose(reduced[used], 0.0, atol=1e-9)
    assert np.all(reduced[room] >= -1e-9)
    fill = np.bincount(a_pos, weights=x, minlength=n_pos)
    assert np.allclose(v[fill < capacity], 0.0, atol=1e-9)
    assert supply @ u + capacity @ v == pytest.approx(flow.optimal_cost())


def _deadline_instance(seed: int, n_jobs: int = 30, n_prov: int = 5):
    """A small instance whose deadlines bind, with a greedy placement to start from."""
    import numpy as np

    from matcher.costs import build_costs
    from matcher.heuristics import greedy

    rng = np.random.default_rng(seed)
    providers = tuple(Provider(f"p{i}", "cuda", int(rng.integers(1, 4)), 1e9, float(rng.uniform(5, 100)), 300.0,
                               float(rng.uniform(0, 30)), 0.0, 0.0,
                               {"m": float(rng.uniform(20, 400)), "n": float(rng.uniform(20, 400))})
                      for i in range(n_prov))
    jobs = tuple(Job(f"j{i:03d}", str(rng.choice(["m", "n"])), int(rng.integers(1, 60)),
                     deadline_ms=float(rng.uniform(100, 900)) if rng.random() < 0.8 else None)
                 for i in range(n_jobs))
    problem = Problem(providers, jobs, Weights(energy=1.0, latency=float(rng.uniform(0.005, 0.05))))
    costs = build_costs(problem)
    allowed = costs.feasible
    with np.errstate(invalid="ignore"):
        score = costs.compute_s * np.array([p.marginal_w for p in providers])[None, :]
    order = [j for j in range(n_jobs) if allowed[j].any()]
    placement, left = greedy(costs, allowed, order, score)
    return problem, costs, allowed, placement, left


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_local_search_scores_match_a_brute_force_over_every_move(seed):
    # The vectorised (single-precision) scores against trying each move on the slots.
    import numpy as np

    from matcher.heuristics import slot_cost, slot_ok
    from matcher.local import _Search

    problem, costs, allowed, placement, left = _deadline_instance(seed)
    lw = problem.weights.latency
    search = _Search(costs, placement, left, allowed, lw)
    search._flatten()
    search._score_relocations()
    search._score_swaps()
    lanes = search.lanes

    def lane_cost(i, order):
        return slot_cost(costs, lanes[i].provider, order, lw)

    def close(a, b):
        return (a == b == np.inf) or abs(a - b) <= 1e-4 * max(1.0, abs(b))

    lane_of = {j: i for i, lane in enumerate(lanes) for j in lane.jobs}
    active = {int(i) for i in search.gap_lane}
    for j in list(lane_of) + left:
        own = lane_of.get(j, -1)
        best = np.inf
        for i in active - {own}:
            if not allowed[j, lanes[i].provider]:
                continue
            for at in range(len(lanes[i].jobs) + 1):
                trial = lanes[i].jobs[:at] + [j] + lanes[i].jobs[at:]
                if slot_ok(costs, lanes[i].provider, trial):
                    best = min(best, lane_cost(i, trial) - lane_cost(i, lanes[i].jobs))
        assert close(search.reloc[j][0], best), (j, search.reloc[j], best)
    for a, la in lane_of.items():
        best = -np.inf
        for b, lb in lane_of.items():
            if la == lb or not (allowed[a, lanes[lb].provider] and allowed[b, lanes[la].provider]):
                continue
            new_a = [b if y == a else y for y in lanes[la].jobs]
            new_b = [a if y == b else y for y in lanes[lb].jobs]
            if slot_ok(costs, lanes[la].provider, new_a) and slot_ok(costs, lanes[lb].provider, new_b):
                best = max(best, lane_cost(la, lanes[la].jobs) + lane_cost(lb, lanes[lb].jobs)
                           - lane_cost(la, new_a) - lane_cost(lb, new_b))
        assert close(-search.swap[a][0], -best), (a, search.swap[a], best)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.booleans())
def test_local_search_keeps_every_deadline_and_never_gets_worse(seed, insert_first):
    from matcher.heuristics import slot_ok
    from matcher.local import improve
    from matcher.result import placement_objective

    problem, costs, allowed, placement, left = _deadline_instance(seed, n_jobs=40, n_prov=6)
    before = placement_objective(costs, placement, problem.weights)
    placed_before = sum(len(lane) for lanes in placement.values() for lane in lanes)
    out, still, passes, _ = improve(costs, placement, left, allowed, problem.weights.latency, out_of_time=lambda: False,
                                 insertion_order=sorted(left, key=lambda j: costs.deadline_ms[j]) if insert_first else None)
    placed = [j for lanes in out.values() for lane in lanes for j in lane]
    assert len(placed) == len(set(placed)) and not set(placed) & set(still)
    assert set(placed) | set(still) == {j for lanes in placement.values() for lane in lanes for j in lane} | set(left)
    assert len(placed) >= placed_before
    for p, lanes in out.items():
        assert len(lanes) <= costs.slots[p]
        assert all(allowed[j, p] for lane in lanes for j in lane)
        assert all(slot_ok(costs, p, lane) for lane in lanes)
    if len(placed) == placed_before:
        assert placement_objective(costs, out, problem.weights) <= before + 1e-9 * max(1.0, before)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_sequential_insertion_takes_the_cheapest_gap_each_time(seed):
    # Every insertion, against trying the job in every gap of every slot at that moment.
    import numpy as np

    from matcher.heuristics import slot_cost, slot_ok
    from matcher.local import _Search

    problem, costs, allowed, placement, left = _deadline_instance(seed, n_jobs=40, n_prov=6)
    lw = problem.weights.latency
    rng = np.random.default_rng(seed)
    # Take a third of the placed jobs out too, so there is something to insert.
    out = {int(j) for j in rng.permutation([j for lanes in placement.values() for lane in lanes for j in lane])[::3]}
    kept = {p: [[j for j in lane if j not in out] for lane in lanes] for p, lanes in placement.items()}
    pending = sorted(set(left) | out, key=lambda j: (costs.deadline_ms[j], j))
    checked = []

    class Recording(_Search):
        def _set_order(self, i, order):
            lane = self.lanes[i]
            j = next(y for y in order if y not in lane.jobs)
            chosen = slot_cost(costs, lane.provider, order, lw) - slot_cost(costs, lane.provider, lane.jobs, lw)
            cheapest = np.inf
            for other in self.lanes:
                if not allowed[j, other.provider]:
                    continue
                for at in range(len(other.jobs) + 1):
                    trial = other.jobs[:at] + [j] + other.jobs[at:]
                    if slot_ok(costs, other.provider, trial):
                        cheapest = min(cheapest, slot_cost(costs, other.provider, trial, lw)
                                       - slot_cost(costs, other.provider, other.jobs, lw))
            assert chosen <= cheapest + 1e-4 * max(1.0, abs(cheapest)), (j, chosen, cheapest)
            checked.append(j)
            super()._set_order(i, order)

    search = Recording(costs, kept, pending, allowed, lw)
    search.insert_pending(pending)
    placed = search.placement()
    assert all(slot_ok(costs, p, lane) for p, lanes in placed.items() for lane in lanes)
    now = [j for lanes in placed.values() for lane in lanes for j in lane]
    assert len(now) == len(set(now)) and not set(now) & set(search.unplaced)
    assert set(now) | set(search.unplaced) == {j for lanes in kept.values() for lane in lanes for j in lane} | set(pending)
    assert checked


@pytest.mark.parametrize("seed", range(12))
def test_reassignment_without_deadlines_keeps_the_optimum(seed, monkeypatch):
    # With no deadline every job may take every position the relaxation used, so (given
    # arcs to all of them) re-assigning an optimal placement costs exactly the optimum.
    import numpy as np

    import matcher.reassign as reassign_module
    from matcher.costs import build_costs
    from matcher.exact import placement_from_positions, solve_exact
    from matcher.result import placement_objective

    monkeypatch.setattr(reassign_module, "REASSIGN_WINDOW", 1000)
    rng = np.random.default_rng(seed)
    providers = tuple(Provider(f"p{i}", "cuda", int(rng.integers(1, 4)), 1e9, float(rng.uniform(5, 100)), 300.0,
                               float(rng.uniform(0, 30)), 0.0, 0.0, {"m": float(rng.uniform(20, 400))})
                      for i in range(5))
    jobs = tuple(Job(f"j{i:03d}", "m", int(rng.integers(1, 60))) for i in range(40))
    problem = Problem(providers, jobs, Weights(energy=1.0, latency=float(rng.uniform(0.005, 0.05))))
    costs = build_costs(problem)
    every = np.arange(len(jobs))
    exact = solve_exact(costs, every)
    rank = np.arange(len(jobs))
    optimum = placement_from_positions(exact.job, exact.provider, exact.k, costs.slots, rank)
    again, left_out = reassign_module.reassign(costs, optimum, costs.feasible, every, rank)
    assert left_out == []
    assert sorted(j for lanes in again.values() for lane in lanes for j in lane) == list(range(len(jobs)))
    assert all(len(lanes) <= costs.slots[p] for p, lanes in again.items())
    assert math.isclose(placement_objective(costs, again, problem.weights), exact.objective, rel_tol=1e-7)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_reassignment_places_each_job_once_where_allowed(seed):
    import numpy as np

    from matcher.exact import placement_from_positions, solve_exact
    from matcher.reassign import reassign

    problem, costs, allowed, _, _ = _deadline_instance(seed, n_jobs=40, n_prov=6)
    jobs = np.flatnonzero(allowed.any(axis=1))
    exact = solve_exact(costs, jobs)
    rank = np.arange(len(problem.jobs))
    relaxed = placement_from_positions(exact.job, exact.provider, exact.k, costs.slots, rank)
    again, left_out = reassign(costs, relaxed, allowed, jobs, rank)
    placed = [j for lanes in again.values() for lane in lanes for j in lane]
    assert len(placed) == len(set(placed)) and not set(placed) & set(left_out)
    assert sorted(placed + left_out) == sorted(jobs.tolist())
    for p, lanes in again.items():
        assert len(lanes) <= costs.slots[p]
        assert all(allowed[j, p] for lane in lanes for j in lane)
        # No provider gets more jobs at any depth than the relaxation had slots there.
        assert max(len(lane) for lane in lanes) <= max(len(lane) for lane in relaxed.get(p, [[]]))


@pytest.mark.parametrize("n_jobs, n_prov, seed", [(20, 5, 7), (80, 12, 5)])
def test_deadline_search_gives_the_same_placement_every_run(n_jobs, n_prov, seed):
    # Its budgets are work (scored pairs, CP-SAT's deterministic time), not the clock:
    # the small case goes to CP-SAT whole, the larger one through the local search and a
    # neighbourhood. No clock here, so a loaded machine cannot cap a stage: the outputs
    # must still agree (with a clock, only a capped run may differ, and says so).
    problem, *_ = _deadline_instance(seed, n_jobs=n_jobs, n_prov=n_prov)
    runs = [solve(problem, time_limit_s=1.0, seed=3) for _ in range(3)]
    assert runs[0].stats["cpsat" if n_jobs == 20 else "lns_rounds"]
    assert not any(r.stats["time_capped"] for r in runs)
    outputs = [{k: v for k, v in r.to_json().items() if k != "solve_ms"} for r in runs]
    assert outputs[0] == outputs[1] == outputs[2]
    assert check_result(problem, runs[0]) == []


def test_a_problem_file_may_leave_out_every_optional_field():
    problem = problem_from_json({"providers": [{"id": "a", "arch": "x86_64", "slots": 1, "marginal_w": 5.0,
                                                "throughput": {"m": 10.0}}],
                                 "jobs": [{"id": "j", "model": "m", "items": 1}]})
    assert problem.providers[0].slot_memory_mb == float("inf")
    assert problem_from_json(problem.to_json()) == problem  # "no limit" round-trips as null
    assert solve(problem).assignments[0].provider == "a"


@settings(max_examples=60, deadline=None)
@given(problems(deadlines=True, max_jobs=1))
def test_one_job_is_placed_exactly_by_enumeration(problem):
    # A warm client solves one job per request: the enumeration that replaces the flow
    # there must give the brute-force optimum, deadlines and price ceilings included.
    result = solve(problem)
    assert check_result(problem, result) == []
    placed, objective = brute_force(problem)
    assert len(result.assignments) == placed
    if placed:
        assert result.optimal
        assert math.isclose(result.objective, objective, rel_tol=1e-6, abs_tol=1e-6)
        assert result.lower_bound <= result.objective * (1 + 1e-9) + 1e-9
