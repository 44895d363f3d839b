"""Provider power and policy: fake sensors for the pure logic; real onnxruntime for the
executor and calibration."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from node.calibrate import LIGHT_MODELS, reference_model_path
from node.calibrate import calibrate, load_profile, save_profile, with_dynamic_batch
from node.config import ConfigError, load_config
from node.executor import Executor, JobFailed, ModelStore
from node.policy import CarbonSchedule, IdleGate, decide
from node.power import RaplMeter, estimate_power
from protocol.tensors import Tensor

from .hostile_models import write_corpus

SQUEEZENET = reference_model_path("squeezenet")


# --- meters ---------------------------------------------------------------------------

def _fake_rapl(root: Path, values: dict[str, int], max_range: int = 1000) -> None:
    for name, value in values.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "energy_uj").write_text(str(value))
        (d / "max_energy_range_uj").write_text(str(max_range))


def test_rapl_sums_packages_skips_subdomains_and_unwraps(tmp_path):
    _fake_rapl(tmp_path, {"intel-rapl:0": 900, "intel-rapl:1": 100, "intel-rapl:0:0": 5})
    meter = RaplMeter(tmp_path)
    assert meter.read_j() == 0.0
    # package 0 wraps past its 1000 uJ range (900 -> 1000 -> 50: +150), package 1 gains 30;
    # the subdomain's change is ignored: it is inside package 0.
    _fake_rapl(tmp_path, {"intel-rapl:0": 50, "intel-rapl:1": 130, "intel-rapl:0:0": 999})
    assert meter.read_j() == pytest.approx(180e-6)
    assert meter.source == "measured-rapl"


def test_rapl_absent_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="no readable RAPL"):
        RaplMeter(tmp_path)


def test_estimates_cite_published_figures():
    idle, busy, cite = estimate_power("NVIDIA L4", cores_used=1)
    assert (idle, busy) == (16.0, 72.0) and "MLPerf" in cite
    idle, busy, cite = estimate_power("Some Unknown CPU", cores_used=2)
    assert busy > idle > 0 and "estimate" in cite


class FakeMeter:
    """A counter that advances by `watts` per read: a constant-power device."""
    source = "measured-rapl"

    def __init__(self, watts_per_read: float):
        self.total = 0.0
        self.step = watts_per_read

    def read_j(self) -> float:
        self.total += self.step
        return self.total


def test_calibration_labels_every_figure_with_its_source(tmp_path):
    profile = calibrate([SQUEEZENET], batches=(1, 4), meter=FakeMeter(1.0), seconds_per_point=0.05,
                        idle_seconds=0.01)
    model = profile.models[0]
    assert model.throughput_source == "measured" and model.items_per_s > 0
    assert {b.batch for b in model.batches} == {1, 4}  # the rewrite freed the batch axis
    assert profile.power.idle_source == profile.power.busy_source == "measured-rapl"
    assert all(b.energy_j_per_item is not None for b in model.batches)
    save_profile(tmp_path, profile)
    assert load_profile(tmp_path) == profile

    declared = calibrate([SQUEEZENET], batches=(), declared_idle_w=5, declared_busy_w=25, seconds_per_point=0.05)
    assert declared.power.marginal_source == "declared" and declared.power.marginal_w_per_slot == 20
    estimated = calibrate([SQUEEZENET], batches=(), device_name="NVIDIA T4", seconds_per_point=0.05)
    assert estimated.power.busy_source == "estimated" and estimated.power.busy_w == 70.0
    simulated = calibrate([SQUEEZENET], batches=(), speed_factor=10.0, declared_idle_w=10, declared_busy_w=70,
                          seconds_per_point=0.05)
    assert simulated.models[0].throughput_source == "simulated" and simulated.power.busy_source == "simulated"


def test_dynamic_batch_rewrite_runs_at_other_batch_sizes():
    import onnxruntime as ort
    data = with_dynamic_batch((LIGHT_MODELS / "light_resnet50.onnx").read_bytes())  # shapes only
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    out = session.run(None, {"gpu_0/data_0": np.zeros((3, 3, 224, 224), np.float32)})
    assert out[0].shape[0] == 3


# --- when to sell -----------------------------------------------------------------------

def test_idle_gate_opens_after_hold_and_closes_at_once():
    gate = IdleGate(threshold=0.2, hold_s=10.0)
    assert not gate.update(0.05, now_s=0.0)
    assert not gate.update(0.05, now_s=9.9)
    assert gate.update(0.05, now_s=10.0)
    assert not gate.update(0.5, now_s=11.0)      # the owner is back: withdraw now
    assert not gate.update(0.05, now_s=12.0)     # and wait the whole hold again
    assert gate.update(0.05, now_s=22.0)


def test_carbon_schedule_from_csv(tmp_path):
    csv = tmp_path / "grid.csv"
    csv.write_text("time,g_per_kwh\n2026-11-22T10:00,120\n2026-11-22T11:00+00:00,480\n")
    s = CarbonSchedule(300.0, csv)
    assert s.at(datetime(2026, 11, 22, 10, 30, tzinfo=timezone.utc)) == 120
    assert s.at(datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)) == 480
    assert s.at(datetime(2026, 11, 22, 9, 0, tzinfo=timezone.utc)) == 300  # before the schedule: static
    assert s.source == "schedule:grid.csv"
    daily = tmp_path / "daily.csv"
    daily.write_text("hour,g_per_kwh\n0,90\n18,520\n")
    d = CarbonSchedule(300.0, daily)
    assert d.at(datetime(2026, 1, 1, 19, tzinfo=timezone.utc)) == 520
    assert d.at(datetime(2026, 1, 1, 3, tzinfo=timezone.utc)) == 90
    bad = tmp_path / "bad.csv"
    bad.write_text("25,100\n")
    with pytest.raises(ValueError, match="hour 25"):
        CarbonSchedule(300.0, bad)


def test_decide_withdraws_for_carbon_and_owner():
    assert decide(idle_only=False, idle_open=False, owner_load=0.9, carbon_now=100, carbon_ceiling=None).selling
    dirty = decide(idle_only=False, idle_open=True, owner_load=0.0, carbon_now=500, carbon_ceiling=400)
    assert not dirty.selling and "ceiling" in dirty.reason
    busy = decide(idle_only=True, idle_open=False, owner_load=0.6, carbon_now=100, carbon_ceiling=400)
    assert not busy.selling and "owner" in busy.reason


# --- config -----------------------------------------------------------------------------

def test_config_file_then_flags(tmp_path):
    (tmp_path / "provider.toml").write_text('slots = 3\nidle_only = true\nprice_per_s = 1\n'
                                            f'models = ["{SQUEEZENET}"]\n')
    config = load_config(tmp_path, {"slots": 5, "carbon_ceiling": None})
    assert config.slots == 5 and config.idle_only and config.price_per_s == 1.0
    assert config.models == [SQUEEZENET]
    (tmp_path / "provider.toml").write_text('slots = "two"\n')
    with pytest.raises(ConfigError, match="slots: expected int"):
        load_config(tmp_path, {})
    (tmp_path / "provider.toml").write_text('slotz = 2\n')
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config(tmp_path, {})
    (tmp_path / "provider.toml").write_text('idle_w = 50\nbusy_w = 20\n')
    with pytest.raises(ConfigError, match="below idle_w"):
        load_config(tmp_path, {})


# --- executor (real onnxruntime) ----------------------------------------------------------

def _put(store: ModelStore, path: Path) -> str:
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    store.put(sha, data)
    return sha


async def test_executor_refuses_the_hostile_corpus_and_keeps_serving(tmp_path):
    store = ModelStore(tmp_path / "models")
    executor = Executor(store, slots=2, job_memory_mb=1024)
    x = (Tensor.from_array("X", np.zeros((1, 4), np.float32)),)
    for name, (path, codes) in write_corpus(tmp_path / "corpus").items():
        sha = _put(store, path)
        with pytest.raises(JobFailed) as failed:
            await executor.run(sha, x, timeout_s=30)
        assert failed.value.code in codes, (name, failed.value.code, str(failed.value))
    good = _put(store, SQUEEZENET)
    out = await executor.run(good, (Tensor.from_array("data_0", np.zeros((2, 3, 224, 224), np.float32)),))
    assert out.outputs[0].shape[0] == 2 and out.energy_j is None


async def test_executor_timeout_stops_the_run_and_frees_the_slot(tmp_path):
    store = ModelStore(tmp_path / "models")
    executor = Executor(store, slots=1, check_models=False)
    # Only the run time matters here: the shipped vgg19 (9 KB, weights computed at load)
    # costs the same compute as the seeded one (575 MB).
    sha = _put(store, LIGHT_MODELS / "light_vgg19.onnx")
    many = (Tensor.from_array("data_0", np.zeros((64, 3, 224, 224), np.float32)),)
    with pytest.raises(JobFailed) as failed:
        await executor.run(sha, many, timeout_s=0.2)
    assert failed.value.code == "timeout"
    one = (Tensor.from_array("data_0", np.zeros((1, 3, 224, 224), np.float32)),)
    assert (await executor.run(sha, one, timeout_s=30)).outputs[0].shape == (1, 1000)


async def test_executor_memory_ceiling_and_metered_energy(tmp_path):
    store = ModelStore(tmp_path / "models")
    executor = Executor(store, slots=1, job_memory_mb=1, meter=FakeMeter(2.0), idle_w=0.0)
    sha = _put(store, SQUEEZENET)
    x = (Tensor.from_array("data_0", np.zeros((1, 3, 224, 224), np.float32)),)
    with pytest.raises(JobFailed) as failed:
        await executor.run(sha, x)
    assert failed.value.code == "too-large"
    executor.job_memory_bytes = 4 << 30
    out = await executor.run(sha, x)
    assert out.energy_j == pytest.approx(2.0) and out.energy_source == "measured-rapl"


def test_model_store_evicts_least_recently_used_never_pinned(tmp_path):
    store = ModelStore(tmp_path, budget_bytes=2500)
    blobs = {name: bytes([i]) * 1000 for i, name in enumerate("abc")}
    shas = {}
    for name, data in blobs.items():
        shas[name] = hashlib.sha256(data).hexdigest()
    store.put(shas["a"], blobs["a"])
    store.put(shas["b"], blobs["b"])
    store.pinned[shas["a"]] = 1         # in use: must survive
    store.put(shas["c"], blobs["c"])    # over budget: b goes
    assert store.has(shas["a"]) and store.has(shas["c"]) and not store.has(shas["b"])
    with pytest.raises(JobFailed) as failed:
        store.put(hashlib.sha256(b"x" * 3000).hexdigest(), b"x" * 3000)
    assert failed.value.code == "too-large"


def test_the_config_reference_is_generated_from_the_config_definition():
    from dataclasses import fields

    from node import config

    # docs/config.md is `python -m node.config`: regenerate it when a key changes.
    assert (Path(config.__file__).parents[1] / "docs" / "config.md").read_text() == config.reference()
    keys = {f.name for f in fields(config.ProviderConfig)} - {"home"}
    assert set(config._KINDS) == keys  # the loader knows the type of every key
    assert all(f.metadata.get("help") for f in fields(config.ProviderConfig) if f.name != "home")


def test_run_reuses_a_fuller_profile_and_never_shrinks_it(tmp_path):
    from node.calibrate import merge_profiles, reference_model_path
    from node.provider import Provider

    home = tmp_path / "provider"
    home.mkdir()
    both = [reference_model_path("squeezenet"), reference_model_path("shufflenet")]
    save_profile(home, calibrate(both, batches=(), declared_idle_w=5, declared_busy_w=25, seconds_per_point=0.05))
    before = load_profile(home)
    config = load_config(home, {"models": [both[0]], "idle_w": 5.0, "busy_w": 25.0})
    provider = Provider(config)
    provider.prepare()  # offers one of the two: nothing is measured again, nothing is dropped
    assert [m.name for m in provider.models] == ["squeezenet"]
    after = load_profile(home)
    assert after.calibrated_at_ms == before.calibrated_at_ms and len(after.models) == 2
    # A new model is measured and added; the others stay.
    config = load_config(home, {"models": [both[0], reference_model_path("resnet50")], "idle_w": 5.0, "busy_w": 25.0})
    Provider(config).prepare()
    assert sorted(m.name for m in load_profile(home).models) == ["resnet50", "shufflenet", "squeezenet"]
    assert merge_profiles(None, before) is before
