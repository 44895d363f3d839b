"""`idlemesh devnet run SCENARIO.toml`: replay a job trace on a fresh devnet of the
scenario's fleet, once per solver (ours and each baseline), with the same arrivals and
the same faults, and collect what happened from the buyers' and providers' ledgers.

Every job is submitted by a buyer at its arrival time, placed by the solver under test
among the offers it sees, run for real, verified and settled. Energy and device latency
come from the providers' simulated profiles and are labelled `simulated`.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import trio

from node.buyer import Buyer, SubmitError, SubmitSpec
from node.calibrate import model_name

from .fleet import DEFAULT_FLEET, Fleet, load_fleet
from .launcher import host_profile, open_devnet
from .scenario import Arrival, Fault, Scenario


@dataclass
class JobRecord:
    arrival: int
    job_id: str
    state: str
    provider: str
    device: str
    energy_j: float
    energy_source: str
    carbon_g: float
    device_latency_ms: float
    wall_latency_ms: float
    deadline_ms: float | None
    attempts: int
    error: str = ""
    wasted_energy_j: float = 0.0  # spent on attempts nobody paid for (simulate knows; run does not)
    model: str = ""
    items: int = 0

    @property
    def missed(self) -> bool:
        return self.state != "settled" or (self.deadline_ms is not None and self.device_latency_ms > self.deadline_ms)


@dataclass
class SolverRun:
    solver: str
    jobs: list[JobRecord] = field(default_factory=list)
    faults: list[dict] = field(default_factory=list)
    receipts_applied_twice: int = 0
    wall_s: float = 0.0


def job_timeout_s(deadline_ms: float | None) -> float:
    """How long a scenario's buyer waits for one attempt before placing the job again."""
    return max(5.0, 4 * (deadline_ms or 2000) / 1000)


def _inputs(model: Path, items: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    spec = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()[0]
    shape = [items] + [d if isinstance(d, int) else 1 for d in spec.shape[1:]]
    return {spec.name: rng.random(shape, dtype=np.float32)}


async def _fault(net, fault: Fault, t0: float, log: list[dict], say) -> None:
    await trio.sleep_until(t0 + fault.at_s)
    child = net.providers[fault.provider]
    entry = {"at_s": fault.at_s, "provider": fault.provider, "action": fault.action, "peer_id": child.ready.get("peer_id")}
    if fault.action == "kill":
        child.process.kill()
    elif fault.action == "pause":
        child.process.send_signal(signal.SIGSTOP)
        await trio.sleep(fault.duration_s)
        child.process.send_signal(signal.SIGCONT)
    elif fault.action == "restart":
        fresh = await net.restart(child)
        entry["peer_id"] = fresh.ready.get("peer_id")
    say(f"  t={fault.at_s:.1f}s {fault.action} provider {fault.provider}"
        + (f" (for {fault.duration_s:g} s)" if fault.action == "pause" else ""))
    log.append(entry)


def _applied_twice(provider_homes: list[Path], buyer_homes: list[Path]) -> int:
    """Job ids settled (accepted) more than once across every ledger of a role."""
    def accepted(homes):
        ids = []
        for home in homes:
            path = home / "ledger.sqlite"
            if path.exists():
                db = sqlite3.connect(path)
                ids += [r[0] for r in db.execute("SELECT receipt_id FROM receipts WHERE status = 'accepted'")]
                db.close()
        return ids
    twice = 0
    for ids in (accepted(provider_homes), accepted(buyer_homes)):
        twice += len(ids) - len(set(ids))
    return twice


async def run_solver(scenario: Scenario, fleet: Fleet, solver: str, root: Path, say, host=None) -> SolverRun:
    run = SolverRun(solver)
    rng = np.random.default_rng(scenario.seed)
    inputs = [_inputs(a.model, a.items, rng) for a in scenario.arrivals]
    async with open_devnet(scenario.providers, root=root / "net", models=scenario.models, fleet=fleet,
                           progress=lambda t: say("  " + t), host=host) as net:
        # Named as in the report: the provider's index in the scenario, then its device.
        devices = {c.ready["peer_id"]: f"{i}: {m.device.name}"
                   for i, (c, m) in enumerate(zip(net.providers, fleet.pick(scenario.providers)))}
        carbon = {c.ready["peer_id"]: m.region.carbon_g_per_kwh
                  for c, m in zip(net.providers, fleet.pick(scenario.providers))}
        buyer_homes = []
        say(f"  replaying {len(scenario.arrivals)} arrivals ({scenario.job_count} jobs) with solver {solver}")
        t0 = trio.current_time()
        started = time.perf_counter()

        async def arrive(index: int, arrival: Arrival) -> None:
            await trio.sleep_until(t0 + arrival.at_s)
            home = root / "buyers" / f"arrival-{index:04d}"  # one identity per arrival, as separate users
            buyer_homes.append(home)
            timeout_s = job_timeout_s(arrival.deadline_ms)
            spec = SubmitSpec(model_path=arrival.model, inputs=inputs[index], count=arrival.count,
                              bootstrap=[net.bootstrap_addr], home=home, out_dir=root / "out" / f"{index:04d}",
                              solver=solver, weights=scenario.weights, deadline_ms=arrival.deadline_ms,
                              job_timeout_s=timeout_s)
            try:
                outcomes, _ = await Buyer(spec).run()
            except SubmitError as exc:
                for _ in range(arrival.count):
                    run.jobs.append(JobRecord(index, "", "failed", "", "", 0.0, "", 0.0, 0.0, 0.0,
                                              arrival.deadline_ms, 0, str(exc), model=model_name(arrival.model),
                                              items=arrival.items))
                return
            for o in outcomes:
                run.jobs.append(JobRecord(
                    index, o.job_id, o.state, o.provider, devices.get(o.provider, "?"), o.energy_j, o.energy_source,
                    o.energy_j / 3.6e6 * carbon.get(o.provider, 0.0), o.device_latency_ms, o.latency_ms,
                    arrival.deadline_ms, len(o.attempts), o.error, model=model_name(arrival.model), items=arrival.items))

        async with trio.open_nursery() as nursery:
            for fault in scenario.faults:
                nursery.start_soon(_fault, net, fault, t0, run.faults, say)
            for index, arrival in enumerate(scenario.arrivals):
                nursery.start_soon(arrive, index, arrival)
        run.wall_s = time.perf_counter() - started
        provider_homes = [c.home for c in net.providers]
    run.receipts_applied_twice = _applied_twice(provider_homes, buyer_homes)
    return run


async def run_scenario(scenario: Scenario, out: Path, *, fleet: Fleet | None = None,
                       say: Callable[[str], None] = print) -> list[SolverRun]:
    fleet = fleet or load_fleet(scenario.fleet or DEFAULT_FLEET)
    # One measurement of this machine for every solver: each devnet measuring its own
    # would scale each solver's devices (and energy) by a different, noisy yardstick.
    say("measuring this machine once, to scale the fleet's published throughput for every solver")
    host = await trio.to_thread.run_sync(host_profile, scenario.models)
    runs = []
    for solver in scenario.solvers:
        say(f"[{solver}] fresh devnet of {scenario.providers} providers from fleet '{fleet.name}'")
        run = await run_solver(scenario, fleet, solver, out / solver, say, host=host)
        settled = sum(j.state == "settled" for j in run.jobs)
        say(f"[{solver}] {settled}/{len(run.jobs)} settled, {sum(j.energy_j for j in run.jobs):.3f} J "
            f"(simulated), {sum(j.missed for j in run.jobs)} deadline misses, {run.wall_s:.1f} s")
        runs.append(run)
    return runs
