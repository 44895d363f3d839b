"""The energy claim on fleets and scenarios written independently of the shipped ones
(bench/scenarios/), judged in `devnet simulate`: for each, energy per submitted job,
deadline misses and lost jobs per solver, and whether ours met the whole claim (25% less
energy than greedy-price, 35% less than round-robin, no more misses + losses than any
baseline). Also how fast the simulator runs (large.toml: about 6,000 jobs). Prints JSON.
Every energy figure is simulated (published device profiles, virtual time)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

# The repository first: bench/matcher.py would otherwise shadow the matcher package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if sys.path[1:2] == [str(Path(__file__).resolve().parent)]:
    del sys.path[1]

from devnet.fleet import load_fleet  # noqa: E402
from devnet.report import compare, lost_job_charge, summarise  # noqa: E402
from devnet.scenario import load_scenario  # noqa: E402
from devnet.simulate import simulate  # noqa: E402

SCENARIOS = Path(__file__).parent / "scenarios"
CLAIM = {"vs_greedy_price": 0.25, "vs_round_robin": 0.35}


def judge(path: Path) -> dict:
    scenario = load_scenario(path)
    scenario.check_sizes()
    fleet = load_fleet(scenario.fleet)
    started = time.perf_counter()
    runs = simulate(scenario, fleet)
    seconds = time.perf_counter() - started
    charge = lost_job_charge(fleet)
    summaries = {r.solver: summarise(r, charge) for r in runs}
    ours = compare(summaries)
    met = (ours["greedy-price"]["energy_saving"] >= CLAIM["vs_greedy_price"]
           and ours["round-robin"]["energy_saving"] >= CLAIM["vs_round_robin"]
           and all(summaries["optimal"]["misses_and_losses"] <= s["misses_and_losses"] for s in summaries.values()))
    return {
        "scenario": scenario.name, "fleet": fleet.name, "jobs": scenario.job_count, "solvers": len(runs),
        "simulate_s": round(seconds, 2), "jobs_per_s": round(scenario.job_count * len(runs) / seconds),
        "energy_j_per_submitted_job": {n: round(s["energy_j_per_submitted_job"], 5) for n, s in summaries.items()},
        "deadline_misses": {n: s["deadline_misses"] for n, s in summaries.items()},
        "jobs_lost": {n: s["jobs_lost"] for n, s in summaries.items()},
        "ours_vs": {n: c["energy"] for n, c in ours.items()},
        "claim_met": met,
    }


def main() -> None:
    rows = [judge(path) for path in sorted(SCENARIOS.glob("*.toml")) if "[scenario]" in path.read_text()]
    judged = [r for r in rows if r["scenario"] != "large"]
    print(json.dumps({
        "how_obtained": "simulated: devnet simulate (published device profiles, discrete-event, virtual time)",
        "claim": CLAIM, "claim_met": f"{sum(r['claim_met'] for r in judged)} of {len(judged)}",
        "scenarios": rows,
    }, indent=2))


if __name__ == "__main__":
    main()
