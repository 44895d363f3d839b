"""Fleets, scenarios and `devnet run` end to end on small custom files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devnet.fleet import DEFAULT_FLEET, FleetError, load_fleet
from devnet.scenario import ScenarioError, load_scenario
from node.cli import main

SCENARIOS = Path(__file__).resolve().parents[1] / "devnet" / "scenarios"

FLEET = """
[[regions]]
name = "clean"
carbon_g_per_kwh = 20
[[regions]]
name = "dirty"
carbon_g_per_kwh = 700
[[devices]]
name = "frugal-gpu"
arch = "cuda"
slots = 2
idle_w = 10.0
busy_w = 60.0
resnet50_img_s = 2000.0
memory_mb = 16000
price_per_s = 0.0003
[[devices]]
name = "cheap-cpu"
arch = "x86_64"
slots = 1
idle_w = 30.0
busy_w = 120.0
resnet50_img_s = 40.0
memory_mb = 16000
price_per_s = 0.000001
[[providers]]
device = "frugal-gpu"
region = "clean"
link_ms = 5.0
[[providers]]
device = "cheap-cpu"
region = "dirty"
link_ms = 5.0
count = 2
"""


def test_default_fleet_and_scenarios_load():
    fleet = load_fleet(DEFAULT_FLEET)
    assert len(fleet.members) >= 10 and all(m.device.source != "unstated" for m in fleet.members)
    for path in SCENARIOS.glob("*.toml"):
        scenario = load_scenario(path)
        # The default fleet, or (many-buyers-run) the edge fleet of bench/scenarios.
        assert scenario.job_count > 0 and len(load_fleet(scenario.fleet).members) >= scenario.providers
    # The trace is a function of the seed: the same file gives the same arrivals.
    assert load_scenario(SCENARIOS / "default.toml").arrivals == load_scenario(SCENARIOS / "default.toml").arrivals


@pytest.mark.parametrize("change, error", [
    (("frugal-gpu\"\nregion = \"clean\"", "nosuch\"\nregion = \"clean\""), "not among \\[\\[devices\\]\\]"),
    (("arch = \"cuda\"", "arch = \"tpu\""), "arch: expected one of"),
    (("busy_w = 60.0", "busy_w = 5.0"), "below idle_w"),
    (("slots = 2", "slots = \"two\""), "slots: expected int"),
])
def test_bad_fleets_say_what_is_wrong(tmp_path, change, error):
    path = tmp_path / "fleet.toml"
    path.write_text(FLEET.replace(*change, 1))
    with pytest.raises(FleetError, match=error):
        load_fleet(path)


def test_bad_scenarios_say_what_is_wrong(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[[jobs]]\nat_s = 0\nmodel = "nosuchmodel"\n')
    with pytest.raises(ScenarioError, match="neither a reference model nor a file"):
        load_scenario(path)
    path.write_text('[[jobs]]\nat_s = 0\nmodel = "squeezenet"\n[[faults]]\nprovider = 0\naction = "explode"\n')
    with pytest.raises(ScenarioError, match="action: expected one of"):
        load_scenario(path)
    path.write_text('[scenario]\nsolvers = ["magic"]\n[[jobs]]\nat_s = 0\nmodel = "squeezenet"\n')
    with pytest.raises(ScenarioError, match="unknown \\['magic'\\]"):
        load_scenario(path)


def test_devnet_run_any_fleet_and_scenario_with_a_kill(tmp_path):
    (tmp_path / "fleet.toml").write_text(FLEET)
    (tmp_path / "scenario.toml").write_text("""
[scenario]
name = "tiny"
fleet = "fleet.toml"
providers = 3
solvers = ["optimal", "round-robin"]
weights = { energy = 1.0, latency = 0.0005 }
[[jobs]]
at_s = 0.0
model = "squeezenet"
count = 4
items = 8
deadline_ms = 3000
[[jobs]]
at_s = 1.5
model = "squeezenet"
count = 4
items = 8
[[faults]]
at_s = 1.0
provider = 1
action = "kill"
""")
    out = tmp_path / "report"
    assert main(["devnet", "run", str(tmp_path / "scenario.toml"), "--out", str(out), "--json", "--loopback"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["fleet"] == "fleet" and report["jobs"] == 8
    for name in ("optimal", "round-robin"):
        s = report["solvers"][name]
        assert s["settled"] == 8 and s["jobs_lost"] == 0 and s["receipts_applied_twice"] == 0
        assert s["energy_sources"] == ["simulated"]
    # Ours keeps to the frugal GPU; round-robin also pays for the power-hungry CPUs.
    assert report["ours_vs"]["round-robin"]["energy_saving"] > 0.35
    assert set(report["solvers"]["optimal"]["load"]) == {"0: frugal-gpu"}  # by index in the scenario, then device
    # The run is put next to `devnet simulate` of the same trace with the run's provider
    # ids: ours never goes near the killed provider, so the two agree on every job.
    assert report["time_scale"] >= 1.0 and set(report["run_vs_simulate"]) == {"optimal", "round-robin"}
    ours = report["run_vs_simulate"]["optimal"]
    assert ours["within_tolerance"] and ours["same_provider_share"] == 1.0
    for png in ("energy_per_job.png", "latency_cdf.png", "deadline_misses.png", "carbon.png", "load_per_provider.png"):
        assert (out / png).stat().st_size > 1000
    assert "simulated" in (out / "index.html").read_text()
