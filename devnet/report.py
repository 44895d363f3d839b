"""The report of a scenario run: report.json, PNG plots and an index.html that shows them.

Figures are what the ledgers and receipts say. Energy, carbon and device latency come
from simulated device profiles and say so on every plot and in the JSON.
"""

from __future__ import annotations

import html
from dataclasses import asdict
import json
from pathlib import Path

import numpy as np

from .run import SolverRun
from .scenario import Scenario

OURS = "optimal"
SIMULATED = "simulated (published device profiles; outputs computed for real on this machine)"


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarise(run: SolverRun) -> dict:
    settled = [j for j in run.jobs if j.state == "settled"]
    latencies = [j.device_latency_ms for j in settled]
    load: dict[str, dict] = {}
    for j in settled:
        row = load.setdefault(j.device, {"jobs": 0, "energy_j": 0.0})
        row["jobs"] += 1
        row["energy_j"] += j.energy_j
    return {
        "jobs": len(run.jobs), "settled": len(settled), "jobs_lost": len(run.jobs) - len(settled),
        "deadline_misses": sum(j.missed for j in run.jobs),
        "energy_j": sum(j.energy_j for j in settled),
        "energy_j_per_job": sum(j.energy_j for j in settled) / max(1, len(settled)),
        "carbon_g": sum(j.carbon_g for j in settled),
        "latency_ms_p50": _percentile(latencies, 50), "latency_ms_p95": _percentile(latencies, 95),
        "latency_ms_mean": float(np.mean(latencies)) if latencies else None,
        "replaced_jobs": sum(j.attempts > 1 for j in settled),
        "receipts_applied_twice": run.receipts_applied_twice,
        "energy_sources": sorted({j.energy_source for j in settled}),
        "load": load, "faults": run.faults, "wall_s": round(run.wall_s, 2),
    }


def compare(summaries: dict[str, dict]) -> dict:
    ours = summaries.get(OURS)
    if ours is None:
        return {}
    out = {}
    for name, base in summaries.items():
        if name == OURS:
            continue
        out[name] = {
            "energy_saving": 1 - ours["energy_j_per_job"] / base["energy_j_per_job"] if base["energy_j_per_job"] else None,
            "carbon_saving": 1 - ours["carbon_g"] / base["carbon_g"] if base["carbon_g"] else None,
            "deadline_misses_ours": ours["deadline_misses"], "deadline_misses_theirs": base["deadline_misses"],
            "latency_p50_ms_ours": ours["latency_ms_p50"], "latency_p50_ms_theirs": base["latency_ms_p50"],
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

    bar("energy_j_per_job", "Energy per job (lower is better)", "J per job (simulated)", "energy_per_job.png")
    bar("carbon_g", "Carbon, all jobs", "g CO2e (simulated)", "carbon.png")
    bar("deadline_misses", "Deadline misses (incl. unsettled jobs)", "jobs", "deadline_misses.png")

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for run, colour in zip(runs, colours):
        lat = sorted(j.device_latency_ms for j in run.jobs if j.state == "settled")
        if lat:
            ax.step(lat, np.arange(1, len(lat) + 1) / len(lat), where="post", label=run.solver, color=colour)
    ax.set_xscale("log")
    ax.set_xlabel("device latency, ms (simulated; log scale)")
    ax.set_ylabel("share of jobs")
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


def write_report(scenario: Scenario, fleet_name: str, runs: list[SolverRun], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summaries = {r.solver: summarise(r) for r in runs}
    report = {
        "scenario": scenario.name, "scenario_file": str(scenario.path), "fleet": fleet_name,
        "providers": scenario.providers, "arrivals": len(scenario.arrivals), "jobs": scenario.job_count,
        "faults": [asdict(f) for f in scenario.faults], "weights": asdict(scenario.weights),
        "how_obtained": {"energy_j": SIMULATED, "carbon_g": "simulated energy x the fleet region's grid intensity",
                         "latency_ms": "simulated device latency: the link round trip (really added on the wire) "
                                       "+ queue and compute at the device's published speed"},
        "solvers": summaries, "ours_vs": compare(summaries),
        "jobs_lost": {n: s["jobs_lost"] for n, s in summaries.items()},
        "receipts_applied_twice": {n: s["receipts_applied_twice"] for n, s in summaries.items()},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plots = _plots(runs, summaries, out)
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{s['settled']}/{s['jobs']}</td><td>{s['energy_j_per_job']:.4g}</td>"
        f"<td>{s['carbon_g']:.3g}</td><td>{s['latency_ms_p50'] or 0:.1f}</td><td>{s['latency_ms_p95'] or 0:.1f}</td>"
        f"<td>{s['deadline_misses']}</td><td>{s['jobs_lost']}</td><td>{s['receipts_applied_twice']}</td></tr>"
        for n, s in summaries.items())
    savings = "".join(
        f"<li>vs <b>{html.escape(n)}</b>: {100 * (c['energy_saving'] or 0):.0f}% less energy per job, "
        f"{100 * (c['carbon_saving'] or 0):.0f}% less carbon; deadline misses {c['deadline_misses_ours']} "
        f"(ours) vs {c['deadline_misses_theirs']}</li>" for n, c in report["ours_vs"].items())
    images = "".join(f'<figure><img src="{f}" alt="{html.escape(t)}"><figcaption>{html.escape(t)}</figcaption></figure>'
                     for f, t in plots)
    (out / "index.html").write_text(f"""<!doctype html><html><head><meta charset="utf-8">
<title>idlemesh devnet: {html.escape(scenario.name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
figure{{display:inline-block;margin:8px}}img{{max-width:520px}}.note{{color:#666;font-size:90%}}</style></head>
<body><h1>Scenario {html.escape(scenario.name)} on fleet {html.escape(fleet_name)}</h1>
<p>{scenario.providers} providers, {len(scenario.arrivals)} arrivals, {scenario.job_count} jobs per solver,
{len(scenario.faults)} faults. Each solver ran on a fresh devnet with the same trace and faults.</p>
<ul>{savings}</ul>
<table><tr><th>solver</th><th>settled</th><th>J per job</th><th>g CO2e</th><th>p50 ms</th><th>p95 ms</th>
<th>deadline misses</th><th>jobs lost</th><th>receipts applied twice</th></tr>{rows}</table>
<p class="note">Energy, carbon and latency are <b>simulated</b>: providers run the real models on this machine
for real outputs, but report time and energy from published device profiles (fleet file). Link delays are
really added on the wire. Nothing here is a measurement of the listed devices.</p>
{images}</body></html>""")
    return report
