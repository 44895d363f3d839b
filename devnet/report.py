"""The report of a scenario run: report.json, PNG plots and an index.html that shows them.

Figures are what the ledgers and receipts say. Energy, carbon and device latency come
from simulated device profiles and say so on every plot and in the JSON.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from matcher import Weights
from node.placement import DEADLINE_LATENCY_WEIGHT

from .fleet import MODEL_SPEED_SOURCE, Fleet, capability
from .run import JobRecord, SolverRun
from .scenario import Scenario

OURS = "optimal"
SIMULATED = "simulated (published device profiles; outputs computed for real on this machine)"
SIMULATED_ONLY = "simulated (published device profiles, discrete-event run in virtual time; nothing computed)"
LOST_CHARGE = ("a lost job is charged the energy of running it on the fleet member that would spend the most "
               "on it (the least efficient one offering its model): someone still has to run it")


def lost_job_charge(fleet: Fleet) -> Callable[[JobRecord], float]:
    """Energy a lost job is charged, in J (see LOST_CHARGE)."""
    def charge(job: JobRecord) -> float:
        # The job's time on each member by the devices' one time model (batch rates included).
        return max(capability(fleet, m.device, job.model).job_s(job.items) * m.device.marginal_w_per_slot
                   for m in fleet.members)
    return charge


def _percentile(values: list[float], q: float) -> float | str | None:
    """Over every submitted job, a lost one counting as never finishing: "lost" when the
    percentile falls on one."""
    if not values:
        return None
    value = float(np.percentile(values, q, method="higher"))
    return "lost" if value == float("inf") else value


def summarise(run: SolverRun, charge_j: Callable[[JobRecord], float]) -> dict:
    settled = [j for j in run.jobs if j.state == "settled"]
    lost = [j for j in run.jobs if j.state != "settled"]
    latencies = [j.device_latency_ms if j.state == "settled" else float("inf") for j in run.jobs]
    load: dict[str, dict] = {}
    for j in settled:
        row = load.setdefault(j.device, {"jobs": 0, "energy_j": 0.0})
        row["jobs"] += 1
        row["energy_j"] += j.energy_j
    settled_j = sum(j.energy_j for j in settled)
    wasted_j = sum(j.wasted_energy_j for j in run.jobs)
    charged_j = sum(charge_j(j) for j in lost)
    late = sum(j.missed for j in settled)
    return {
        # Misses and losses first: a saving that loses jobs is no saving.
        "jobs": len(run.jobs), "jobs_lost": len(lost), "deadline_misses": late,
        "misses_and_losses": late + len(lost), "settled": len(settled),
        "energy_j_per_submitted_job": (settled_j + wasted_j + charged_j) / max(1, len(run.jobs)),
        "energy_j_settled": settled_j, "energy_j_wasted": wasted_j, "energy_j_charged_for_lost": charged_j,
        "energy_j_per_settled_job": settled_j / max(1, len(settled)),
        "carbon_g": sum(j.carbon_g for j in settled),
        "latency_ms_p50": _percentile(latencies, 50), "latency_ms_p95": _percentile(latencies, 95),
        "latency_ms_p99": _percentile(latencies, 99),
        "replaced_jobs": sum(j.attempts > 1 for j in settled),
        "receipts_applied_twice": run.receipts_applied_twice,
        "energy_sources": sorted({j.energy_source for j in settled}),
        "lost": [{"arrival": j.arrival, "job_id": j.job_id, "attempts": j.attempts, "error": j.error[:300]}
                 for j in lost],
        "load": dict(sorted(load.items(), key=lambda kv: int(kv[0].split(":")[0]) if kv[0][:1].isdigit() else 0)),
        "faults": run.faults, "wall_s": round(run.wall_s, 2),
    }


def more_or_less(ours: float, theirs: float, what: str) -> str:
    """"62% less energy" or "17% more energy": never a negative percentage."""
    if not theirs:
        return f"no {what} to compare" if not ours else f"more {what} (theirs is 0)"
    change = ours / theirs - 1
    if abs(change) < 0.005:
        return f"the same {what}"
    return f"{100 * abs(change):.0f}% {'less' if change < 0 else 'more'} {what}"


def compare(summaries: dict[str, dict]) -> dict:
    ours = summaries.get(OURS)
    if ours is None:
        return {}
    out = {}
    for name, base in summaries.items():
        if name == OURS:
            continue
        e_ours, e_theirs = ours["energy_j_per_submitted_job"], base["energy_j_per_submitted_job"]
        out[name] = {
            "energy_saving": 1 - e_ours / e_theirs if e_theirs else None,
            "energy": more_or_less(e_ours, e_theirs, "energy per submitted job"),
            "carbon": more_or_less(ours["carbon_g"], base["carbon_g"], "carbon"),
            "misses_and_losses_ours": ours["misses_and_losses"], "misses_and_losses_theirs": base["misses_and_losses"],
            "latency_p50_ms_ours": ours["latency_ms_p50"], "latency_p50_ms_theirs": base["latency_ms_p50"],
        }
    return out


# `devnet run` against `devnet simulate` of the same trace (same provider ids): how close
# the real processes came to the model. Energy per submitted job within this share, and
# at least this share of jobs on the same provider.
RUN_VS_SIMULATE_ENERGY = 0.25
RUN_VS_SIMULATE_PLACEMENT = 0.75


def run_vs_simulate(runs: list[SolverRun], simulated: list[SolverRun], summaries: dict[str, dict],
                    charge: Callable[[JobRecord], float]) -> dict:
    """Each run (already summarised in `summaries`) next to its simulation."""
    out = {}
    for run, sim in zip(runs, simulated):
        r, m = summaries[run.solver], summarise(sim, charge)
        by_provider = {}
        for j in run.jobs:
            if j.state == "settled":
                by_provider.setdefault(j.device, [0, 0])[0] += 1
        for j in sim.jobs:
            if j.state == "settled":
                by_provider.setdefault(j.device, [0, 0])[1] += 1
        same = sum(min(a, b) for a, b in by_provider.values()) / max(1, len(run.jobs))
        e_run, e_sim = r["energy_j_per_submitted_job"], m["energy_j_per_submitted_job"]
        diff = abs(e_run - e_sim) / e_sim if e_sim else (0.0 if not e_run else None)
        out[run.solver] = {
            "energy_j_per_submitted_job": {"run": e_run, "simulate": e_sim, "difference": diff},
            "misses_and_losses": {"run": r["misses_and_losses"], "simulate": m["misses_and_losses"]},
            "same_provider_share": same,
            "jobs_per_provider": {d: {"run": a, "simulate": b} for d, (a, b) in sorted(by_provider.items())},
            "within_tolerance": diff is not None and diff <= RUN_VS_SIMULATE_ENERGY and same >= RUN_VS_SIMULATE_PLACEMENT,
        }
    return out


def _plots(runs: list[SolverRun], summaries: dict[str, dict], out: Path) -> list[tuple[str, str]]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.solver for r in runs]
    colours = ["#1b9e77" if n == OURS else "#7570b3" if "energy" in n else "#d95f02" if "price" in n else "#999999"
               for n in names]
    made = []

    def save(fig, file: str, title: str) -> None:
        fig.text(0.01, 0.01, "simulated device profiles", fontsize=7, color="#666")
        fig.tight_layout()
        fig.savefig(out / file)
        plt.close(fig)
        made.append((file, title))

    def bar(key: str, title: str, ylabel: str, file: str) -> None:
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        values = [summaries[n][key] for n in names]
        ax.bar(names, values, color=colours)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", labelsize=8)
        save(fig, file, title)

    bar("energy_j_per_submitted_job", "Energy per submitted job, lost jobs charged (lower is better)",
        "J per job (simulated)", "energy_per_job.png")
    bar("carbon_g", "Carbon, settled jobs", "g CO2e (simulated)", "carbon.png")
    bar("misses_and_losses", "Deadline misses + lost jobs", "jobs", "deadline_misses.png")

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for run, colour in zip(runs, colours):
        # Over every submitted job: lost ones never arrive, so the curve stops short of 1.
        lat = sorted(j.device_latency_ms for j in run.jobs if j.state == "settled")
        if lat:
            lost = len(run.jobs) - len(lat)
            ax.step(lat, np.arange(1, len(lat) + 1) / len(run.jobs), where="post", color=colour,
                    label=run.solver + (f" ({lost} lost)" if lost else ""))
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (simulated; log scale)")
    ax.set_ylabel("share of submitted jobs")
    ax.set_title("Latency CDF (left and high is better)", fontsize=10)
    ax.legend(fontsize=8)
    save(fig, "latency_cdf.png", "Latency CDF")

    devices = sorted({d for s in summaries.values() for d in s["load"]})
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(devices) + 2), 3.8), dpi=110)
    width = 0.8 / max(1, len(names))
    for i, (name, colour) in enumerate(zip(names, colours)):
        jobs = [summaries[name]["load"].get(d, {}).get("jobs", 0) for d in devices]
        ax.bar(np.arange(len(devices)) + i * width, jobs, width, label=name, color=colour)
    ax.set_xticks(np.arange(len(devices)) + 0.4 - width / 2)
    ax.set_xticklabels(devices, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("jobs")
    ax.set_title("Load per provider", fontsize=10)
    ax.legend(fontsize=7)
    save(fig, "load_per_provider.png", "Load per provider")
    return made


def write_report(scenario: Scenario, fleet: Fleet, runs: list[SolverRun], out: Path, *,
                 mode: str = "run", simulated: list[SolverRun] | None = None) -> dict:
    """report.json, plots and index.html for one `devnet run` (mode "run") or
    `devnet simulate` (mode "simulate") of a scenario; a run's report puts `simulated`
    (the same trace simulated with the run's provider ids) beside it."""
    out.mkdir(parents=True, exist_ok=True)
    charge = lost_job_charge(fleet)
    summaries = {r.solver: summarise(r, charge) for r in runs}
    energy_how = SIMULATED_ONLY if mode == "simulate" else SIMULATED
    latency_how = ("virtual time from the job's arrival to its result at the buyer: queue, compute at the "
                   "device's rate and the link both ways" if mode == "simulate" else
                   "simulated device latency: the link round trip (really added on the wire) + queue and compute "
                   "at the device's published speed")
    report = {
        "mode": mode, "scenario": scenario.name, "scenario_file": str(scenario.path),
        "fleet": fleet.name, "fleet_file": str(fleet.path),
        "fleet_members": [f"{i}: {m.device.name} ({m.region.name}, link {m.link_ms:g} ms)"
                          for i, m in enumerate(fleet.pick(scenario.providers))],
        "providers": scenario.providers, "arrivals": len(scenario.arrivals), "jobs": scenario.job_count,
        "faults": [asdict(f) for f in scenario.faults],
        "weights": asdict(scenario.weights) if scenario.weights else
        f"buyers' default: latency {DEADLINE_LATENCY_WEIGHT} J/ms with a deadline, {Weights().latency} J/ms without",
        "how_obtained": {"energy_j": energy_how, "carbon_g": "simulated energy x the fleet region's grid intensity",
                         "latency_ms": latency_how, "lost_jobs": LOST_CHARGE,
                         "model_speeds": MODEL_SPEED_SOURCE},
        "solvers": summaries, "ours_vs": compare(summaries),
        "jobs_lost": {n: s["jobs_lost"] for n, s in summaries.items()},
        "receipts_applied_twice": {n: s["receipts_applied_twice"] for n, s in summaries.items()},
    }
    if mode == "run":
        report["time_scale"] = runs[0].time_scale if runs else 1.0
        report["how_obtained"]["time_scale"] = ("every simulated duration (arrivals, queue, compute, links, faults, "
                                                "timeouts) lasted this many times longer on the wall clock, so this "
                                                "machine could compute every output beside the simulated devices")
    if simulated is not None:
        report["run_vs_simulate"] = run_vs_simulate(runs, simulated, summaries, charge)
        report["run_vs_simulate_tolerance"] = {"energy": RUN_VS_SIMULATE_ENERGY,
                                               "same_provider_share": RUN_VS_SIMULATE_PLACEMENT}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plots = _plots(runs, summaries, out)

    def ms(value) -> str:
        return "-" if value is None else value if isinstance(value, str) else f"{value:.1f}"

    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td><b>{s['jobs_lost']}</b></td><td><b>{s['deadline_misses']}</b></td>"
        f"<td>{s['settled']}/{s['jobs']}</td><td>{s['energy_j_per_submitted_job']:.4g}</td>"
        f"<td>{s['energy_j_wasted']:.3g}</td><td>{s['energy_j_charged_for_lost']:.3g}</td>"
        f"<td>{s['carbon_g']:.3g}</td><td>{ms(s['latency_ms_p50'])}</td><td>{ms(s['latency_ms_p95'])}</td>"
        f"<td>{ms(s['latency_ms_p99'])}</td><td>{s['receipts_applied_twice']}</td></tr>"
        for n, s in summaries.items())
    savings = "".join(
        f"<li>vs <b>{html.escape(n)}</b>: {html.escape(c['energy'])}, {html.escape(c['carbon'])}; misses + losses "
        f"{c['misses_and_losses_ours']} (ours) vs {c['misses_and_losses_theirs']}</li>"
        for n, c in report["ours_vs"].items())
    lost_rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{j['arrival']}</td><td>{j['attempts']}</td>"
        f"<td style='text-align:left'>{html.escape(j['error'])}</td></tr>"
        for n, s in summaries.items() for j in s["lost"])
    fault_rows = "".join(
        f"<tr><td>{f['at_s']:g}</td><td>{html.escape(f['action'])}</td><td>{f['provider']}: "
        f"{html.escape(fleet.pick(scenario.providers)[f['provider']].device.name)}</td>"
        f"<td>{f.get('duration_s', 0):g}</td></tr>" for f in report["faults"])
    images = "".join(f'<figure><img src="{f}" alt="{html.escape(t)}"><figcaption>{html.escape(t)}</figcaption></figure>'
                     for f, t in plots)
    w = scenario.weights
    weights_text = (f"energy {w.energy:g} J/J, latency {w.latency:g} J per ms of waiting, carbon {w.carbon:g}, "
                    f"price {w.price:g}" if w else report["weights"])
    (out / "index.html").write_text(f"""<!doctype html><html><head><meta charset="utf-8">
<title>idlemesh devnet: {html.escape(scenario.name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
figure{{display:inline-block;margin:8px}}img{{max-width:520px}}.note{{color:#666;font-size:90%}}</style></head>
<body><h1>Scenario {html.escape(scenario.name)} on fleet {html.escape(fleet.name)} ({html.escape(mode)})</h1>
<p>{scenario.providers} providers, {len(scenario.arrivals)} arrivals, {scenario.job_count} jobs per solver,
{len(scenario.faults)} faults. Weights: {html.escape(weights_text)}. Each solver ran the same trace and faults
{'in its own simulation' if mode == 'simulate' else 'on a fresh devnet'}.</p>
<ul>{savings}</ul>
<table><tr><th>solver</th><th>jobs lost</th><th>deadline misses</th><th>settled</th><th>J per submitted job</th>
<th>J wasted</th><th>J charged for lost</th><th>g CO2e</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th>
<th>receipts applied twice</th></tr>{rows}</table>
{f"<h2>Lost jobs</h2><table><tr><th>solver</th><th>arrival</th><th>attempts</th><th>why</th></tr>{lost_rows}</table>"
 if lost_rows else "<p>No job was lost.</p>"}
{f"<h2>Faults</h2><table><tr><th>at s</th><th>action</th><th>provider</th><th>for s</th></tr>{fault_rows}</table>"
 if fault_rows else ""}
<p class="note">Energy, carbon and latency are <b>simulated</b>: {html.escape(energy_how)}. {html.escape(LOST_CHARGE)}.
Energy per submitted job = (settled + wasted on unpaid attempts + charged for lost) / jobs submitted.
Nothing here is a measurement of the listed devices.</p>
<p class="note">Fleet: {html.escape("; ".join(report["fleet_members"]))}</p>
{_run_vs_simulate_html(report)}
{images}</body></html>""")
    return report


def _run_vs_simulate_html(report: dict) -> str:
    rows = []
    for name, c in report.get("run_vs_simulate", {}).items():
        energy = c["energy_j_per_submitted_job"]
        diff = "-" if energy["difference"] is None else f"{100 * energy['difference']:.0f}%"
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{energy['run']:.4g}</td><td>{energy['simulate']:.4g}</td>"
                    f"<td>{diff}</td><td>{100 * c['same_provider_share']:.0f}%</td>"
                    f"<td>{c['misses_and_losses']['run']} / {c['misses_and_losses']['simulate']}</td>"
                    f"<td>{'yes' if c['within_tolerance'] else '<b>no</b>'}</td></tr>")
    if not rows:
        return ""
    t = report["run_vs_simulate_tolerance"]
    return (f"<h2>This run next to <code>devnet simulate</code> of the same trace</h2><p>Time scale "
            f"x{report.get('time_scale', 1):g}. Tolerance: energy per submitted job within {100 * t['energy']:.0f}%, "
            f"at least {100 * t['same_provider_share']:.0f}% of jobs on the same provider.</p>"
            "<table><tr><th>solver</th><th>J/job run</th><th>J/job simulate</th><th>difference</th>"
            f"<th>same provider</th><th>misses+losses run / simulate</th><th>within</th></tr>{''.join(rows)}</table>")
