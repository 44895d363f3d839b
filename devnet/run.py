"""`idlemesh devnet run SCENARIO.toml`: replay a job trace on a fresh devnet of the
scenario's fleet, once per solver (ours and each baseline), with the same arrivals and
the same faults, and collect what happened from the buyers' and providers' ledgers.

Every job is submitted by a buyer at its arrival time, placed by the solver under test
among the offers it sees, run for real, verified and settled. Energy and device latency
come from the providers' simulated profiles and are labelled `simulated`. The whole run
is stretched by a time scale (choose_time_scale) when this machine could not otherwise
compute the outputs as fast as the simulated fleet would.
"""

from __future__ import annotations

import hashlib
import os
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
from .scenario import CENTRAL, Arrival, Fault, Scenario, input_bytes_per_item


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
    time_scale: float = 1.0
    peer_ids: list[str] = field(default_factory=list)  # the providers', by index in the scenario


# How a run's time scale is chosen: the host computes every job's real outputs beside the
# simulated devices, so the trace is slowed until that work fits in this share of the
# machine's cores (the rest runs the nodes, the buyers and the gossip) ...
HOST_COMPUTE_SHARE = 0.5
BUYER_START_CPU_S = 0.3   # ... counting what starting one buyer node costs (measured: 0.2-0.4 s)
CPU_S_PER_MB = 0.1        # ... and moving each job's request through py-libp2p (yamux, noise, signing),
                          # both sides: bench/overhead.py measured about 60 ms besides the model for a
                          # 0.6 MB squeezenet request. For image jobs this, not the model, dominates.
MAX_TIME_SCALE = 30.0     # beyond this a run takes too long; the report says the host could not keep up
BUYER_LEAD_S = 3.0  # wall seconds a scenario's buyer starts before its arrival


def choose_time_scale(scenario: Scenario, host_rates: dict[str, float]) -> tuple[float, str]:
    """How many times slower than the trace the run must go so this machine can compute
    its outputs, and why: every simulated duration (arrivals, compute, queue, links,
    faults, timeouts) is stretched by it, so who wins never depends on the host."""
    shas = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in scenario.models}
    row_mb = {path: sum(input_bytes_per_item(path)) / 1e6 for path in scenario.models}

    def jobs_work_s(a) -> float:  # computing an arrival's jobs and moving their requests
        return a.count * a.items * (1 / host_rates[shas[a.model]] + row_mb[a.model] * CPU_S_PER_MB)

    work_s = sum(jobs_work_s(a) + BUYER_START_CPU_S for a in scenario.arrivals)
    span_s = max(1.0, max(a.at_s for a in scenario.arrivals))
    capacity_s = span_s * (os.cpu_count() or 1) * HOST_COMPUTE_SHARE
    wanted = max(1.0, work_s / capacity_s)
    scale = min(MAX_TIME_SCALE, float(np.ceil(wanted * 10) / 10))
    why = (f"the trace needs {work_s:.1f} s of this machine's CPU over {span_s:.1f} s; "
           f"{HOST_COMPUTE_SHARE:.0%} of {os.cpu_count()} cores gives {capacity_s:.1f} s")
    if wanted > MAX_TIME_SCALE:
        why += f"; it would need x{wanted:.1f}, capped at x{MAX_TIME_SCALE:g}: expect late results"
    # The scale fits the trace's work on average. Arrivals of one instant (many buyers at
    # once) want their work done within their deadlines: when that needs a larger scale,
    # say so, since the host, not the placement, then makes those jobs late.
    bursts: dict[float, list] = {}
    for a in scenario.arrivals:
        bursts.setdefault(a.at_s, []).append(a)
    burst_wanted = max((sum(jobs_work_s(a) for a in group)
                        / (max(a.deadline_ms for a in group) / 1000 * (os.cpu_count() or 1) * HOST_COMPUTE_SHARE)
                        for group in bursts.values()
                        if len(group) > 1 and all(a.deadline_ms for a in group)), default=0.0)
    if burst_wanted > scale:
        why += (f"; its bursts would need x{burst_wanted:.0f} to compute within their deadlines: expect late "
                "results in them that the host, not the placement, causes")
    return scale, why


def job_timeout_s(deadline_ms: float | None) -> float:
    """How long a scenario's buyer waits for one attempt before placing the job again."""
    return max(5.0, 4 * (deadline_ms or 2000) / 1000)


def _inputs(model: Path, items: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    spec = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()[0]
    shape = [items] + [d if isinstance(d, int) else 1 for d in spec.shape[1:]]
    return {spec.name: rng.random(shape, dtype=np.float32)}


async def _fault(net, fault: Fault, t0: float, log: list[dict], say, scale: float = 1.0) -> None:
    await trio.sleep_until(t0 + fault.at_s * scale)
    child = net.providers[fault.provider]
    entry = {"at_s": fault.at_s, "provider": fault.provider, "action": fault.action, "peer_id": child.ready.get("peer_id")}
    if fault.action == "kill":
        child.process.kill()
    elif fault.action == "pause":
        child.process.send_signal(signal.SIGSTOP)
        await trio.sleep(fault.duration_s * scale)
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


async def run_solver(scenario: Scenario, fleet: Fleet, solver: str, root: Path, say,
                     host_resnet50: float | None = None, time_scale: float = 1.0, netns: bool = False) -> SolverRun:
    run = SolverRun(solver, time_scale=time_scale)
    rng = np.random.default_rng(scenario.seed)
    inputs = [_inputs(a.model, a.items, rng) for a in scenario.arrivals]
    async with open_devnet(scenario.providers, root=root / "net", models=scenario.models, fleet=fleet,
                           progress=lambda t: say("  " + t), host_resnet50=host_resnet50,
                           time_scale=time_scale, netns=netns) as net:
        run.peer_ids = [c.ready["peer_id"] for c in net.providers]
        # Named as in the report: the provider's index in the scenario, then its device.
        devices = {c.ready["peer_id"]: f"{i}: {m.device.name}"
                   for i, (c, m) in enumerate(zip(net.providers, fleet.pick(scenario.providers)))}
        carbon = {c.ready["peer_id"]: m.region.carbon_g_per_kwh
                  for c, m in zip(net.providers, fleet.pick(scenario.providers))}
        buyer_homes = []
        say(f"  replaying {len(scenario.arrivals)} arrivals ({scenario.job_count} jobs) with solver {solver}")
        # Each arrival's buyer starts BUYER_LEAD_S early and places at its arrival time, so
        # a node's start-up (a second or more on a busy machine) is not part of the trace.
        t0 = trio.current_time() + BUYER_LEAD_S
        started = time.perf_counter()

        async def arrive(index: int, arrival: Arrival) -> None:
            at = t0 + arrival.at_s * time_scale
            await trio.sleep_until(at - BUYER_LEAD_S)
            home = root / "buyers" / f"arrival-{index:04d}"  # one identity per arrival, as separate users
            buyer_homes.append(home)
            timeout_s = job_timeout_s(arrival.deadline_ms) * time_scale
            spec = SubmitSpec(model_path=arrival.model, inputs=inputs[index], count=arrival.count,
                              bootstrap=[net.bootstrap_addr], home=home, out_dir=root / "out" / f"{index:04d}",
                              solver=solver, weights=scenario.weights, deadline_ms=arrival.deadline_ms,
                              job_timeout_s=timeout_s, time_scale=time_scale)
            try:
                outcomes, _ = await Buyer(spec).run(start_at=at)
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
                nursery.start_soon(_fault, net, fault, t0, run.faults, say, time_scale)
            for index, arrival in enumerate(scenario.arrivals):
                nursery.start_soon(arrive, index, arrival)
        run.wall_s = time.perf_counter() - started
        provider_homes = [c.home for c in net.providers]
    run.receipts_applied_twice = _applied_twice(provider_homes, buyer_homes)
    return run


async def run_scenario(scenario: Scenario, out: Path, *, fleet: Fleet | None = None,
                       say: Callable[[str], None] = print, netns: bool = False) -> list[SolverRun]:
    fleet = fleet or load_fleet(scenario.fleet or DEFAULT_FLEET)
    # One measurement of this machine for every solver: each devnet measuring its own
    # would scale each solver's devices (and energy) by a different, noisy yardstick.
    say("measuring this machine once, to scale the fleet's published throughput for every solver")
    host_rates, host_resnet50 = await trio.to_thread.run_sync(host_profile, scenario.models)
    scale, why = choose_time_scale(scenario, host_rates)
    say(f"time scale x{scale:g}: {why}")
    runs = []
    for solver in scenario.solvers:
        if solver == CENTRAL:
            say(f"[{solver}] skipped: one matcher seeing every buyer's jobs and every true queue exists only in "
                "`devnet simulate`, the yardstick for the buyers' own")
            continue
        say(f"[{solver}] fresh devnet of {scenario.providers} providers from fleet '{fleet.name}'")
        run = await run_solver(scenario, fleet, solver, out / solver, say, host_resnet50=host_resnet50,
                               time_scale=scale, netns=netns)
        settled = sum(j.state == "settled" for j in run.jobs)
        say(f"[{solver}] {settled}/{len(run.jobs)} settled, {sum(j.energy_j for j in run.jobs):.3f} J "
            f"(simulated), {sum(j.missed for j in run.jobs)} deadline misses, {run.wall_s:.1f} s")
        runs.append(run)
    return runs
