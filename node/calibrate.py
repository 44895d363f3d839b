"""`idlemesh provider calibrate`: measure what this machine does per model and per watt.

Runs real architectures that ship with the `onnx` package at a few batch sizes on one
slot (one intra-op thread, as the executor runs them) and records items/s. Power comes
from the best meter present (NVML, then RAPL): idle is sampled before any load, busy
during each measurement. Without a meter, power is what the operator declared, else an
estimate from published figures. Every figure carries its source label, and the
profile is saved as HOME/profile.json for the daemon and its offers.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from .executor import best_execution_providers
from .modelio import ORT_TYPES
from .models import ARCHITECTURES, LIGHT_MODELS, seeded_model_path
from .power import EnergyMeter, cpu_model_name, estimate_power

REFERENCE_MODELS = ("squeezenet", "shufflenet", "resnet50", "densenet121", "inception_v1", "inception_v2",
                    "bvlc_alexnet", "zfnet512", "vgg19")
# What a provider offers, and calibrates, unless told otherwise (--model): one profile.
DEFAULT_MODELS = ("squeezenet", "shufflenet", "resnet50")
DEFAULT_BATCHES = (1, 4, 8)
PROFILE_NAME = "profile.json"
PROFILE_VERSION = 1


def reference_model_path(name: str) -> Path:
    """The architecture with seeded random weights (node/models.py), made once and cached,
    so outputs depend on inputs; the shipped light model where no seeded one exists."""
    return seeded_model_path(name) if name in ARCHITECTURES else LIGHT_MODELS / f"light_{name}.onnx"


def model_name(path: Path) -> str:
    return path.stem.removeprefix("light_")


@dataclass
class BatchFigures:
    batch: int
    items_per_s: float
    busy_w: float | None = None          # whole-device power while running, from the meter
    energy_j_per_item: float | None = None  # (busy - idle) / items_per_s, from the meter


@dataclass
class ModelFigures:
    name: str
    sha256: str
    native_batch: int
    items_per_s: float          # at the model's own batch size: what a job will see
    throughput_source: str      # measured / simulated
    batches: list[BatchFigures] = field(default_factory=list)
    # What large batches approach (items/s), advertised so buyers can micro-batch; set
    # only where a job's rows really run together (a simulated device's profile). The
    # executor runs a fixed-batch model's rows one native batch at a time, and on the
    # bench CPU larger batches were slower, so calibration leaves it unset.
    peak_items_per_s: float | None = None


@dataclass
class PowerFigures:
    idle_w: float
    idle_source: str
    busy_w: float
    busy_source: str
    marginal_w_per_slot: float
    marginal_source: str
    note: str = ""


@dataclass
class Profile:
    device_name: str
    execution_provider: str
    power: PowerFigures
    models: list[ModelFigures]
    calibrated_at_ms: int
    speed_factor: float = 1.0
    version: int = PROFILE_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Profile":
        models = [ModelFigures(**{**m, "batches": [BatchFigures(**b) for b in m["batches"]]})
                  for m in data["models"]]
        return cls(data["device_name"], data["execution_provider"], PowerFigures(**data["power"]), models,
                   data["calibrated_at_ms"], data.get("speed_factor", 1.0), data.get("version", PROFILE_VERSION))

    def model(self, sha256: str) -> ModelFigures | None:
        return next((m for m in self.models if m.sha256 == sha256), None)


def merge_profiles(old: Profile | None, new: Profile) -> Profile:
    """`new`, plus every model `old` measured that `new` did not, when both describe the
    same device at the same speed; otherwise `new` alone (old figures would be wrong)."""
    if old is None or old.speed_factor != new.speed_factor or old.device_name != new.device_name:
        return new
    measured = {m.sha256 for m in new.models}
    return Profile(new.device_name, new.execution_provider, new.power,
                   [*new.models, *(m for m in old.models if m.sha256 not in measured)], new.calibrated_at_ms,
                   new.speed_factor)


def save_profile(home: Path, profile: Profile) -> Path:
    path = home / PROFILE_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile.to_json(), indent=2))
    os.replace(tmp, path)
    return path


def load_profile(home: Path) -> Profile | None:
    try:
        data = json.loads((home / PROFILE_NAME).read_text())
        if data.get("version") != PROFILE_VERSION:
            return None
        return Profile.from_json(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def with_dynamic_batch(data: bytes) -> bytes:
    """The model with a free batch dimension: graph inputs and outputs get dim 'N', and a
    Reshape to a constant shape starting with 1 (the batch) starts with -1 instead."""
    model = onnx.load_from_string(data)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    for value in list(graph.input) + list(graph.output):
        if value.name in initializers or not value.type.tensor_type.shape.dim:
            continue
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    for node in graph.node:
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in initializers:
            shape = onnx.numpy_helper.to_array(initializers[node.input[1]]).copy()
            if shape.ndim == 1 and len(shape) and shape[0] == 1 and -1 not in shape:
                shape[0] = -1
                initializers[node.input[1]].CopyFrom(onnx.numpy_helper.from_array(shape, node.input[1]))
    return model.SerializeToString()


def _session(data: bytes, providers: list[str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one slot, as the executor runs it
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(data, options, providers=providers)


def _feeds(session: ort.InferenceSession, batch: int | None) -> dict[str, np.ndarray]:
    feeds = {}
    for spec in session.get_inputs():
        dims = [d if isinstance(d, int) else 1 for d in spec.shape]
        if batch is not None and dims:
            dims[0] = batch
        feeds[spec.name] = np.zeros(dims, dtype=ORT_TYPES[spec.type])
    return feeds


def _measure(session, feeds, seconds: float, meter: EnergyMeter | None) -> tuple[float, float | None]:
    """(items/s, average power W or None) over at least `seconds` and 3 runs."""
    batch = next(iter(feeds.values())).shape[0] if feeds else 1
    session.run(None, feeds)  # warm-up: first-run allocations are not throughput
    runs = 0
    energy_start = meter.read_j() if meter else 0.0
    started = time.perf_counter()
    while runs < 3 or time.perf_counter() - started < seconds:
        session.run(None, feeds)
        runs += 1
    elapsed = time.perf_counter() - started
    power = (meter.read_j() - energy_start) / elapsed if meter else None
    return runs * batch / elapsed, power


def measure_idle_w(meter: EnergyMeter, seconds: float) -> float:
    start_j, started = meter.read_j(), time.perf_counter()
    time.sleep(seconds)  # nothing of ours runs: this is the machine's own idle
    return (meter.read_j() - start_j) / (time.perf_counter() - started)


def calibrate(models: list[Path], *, batches: tuple[int, ...] = DEFAULT_BATCHES, meter: EnergyMeter | None = None,
              declared_idle_w: float | None = None, declared_busy_w: float | None = None,
              device_name: str | None = None, speed_factor: float = 1.0, seconds_per_point: float = 0.5,
              idle_seconds: float = 1.0, now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
              progress: Callable[[str], None] = lambda line: None) -> Profile:
    providers = best_execution_providers()
    device_name = device_name or cpu_model_name()
    simulated = speed_factor != 1.0
    idle_w = None
    if meter is not None and not simulated:
        progress(f"measuring idle power for {idle_seconds:g} s ({meter.source})")
        idle_w = measure_idle_w(meter, idle_seconds)
    figures: list[ModelFigures] = []
    busy_samples: list[float] = []
    for path in models:
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        name = model_name(path)
        native = _session(data, providers)
        spec = native.get_inputs()[0] if native.get_inputs() else None
        native_batch = spec.shape[0] if spec is not None and spec.shape and isinstance(spec.shape[0], int) else 1
        try:
            dynamic = _session(with_dynamic_batch(data), providers)
        except Exception:  # noqa: BLE001 - a model we cannot rewrite is measured at its own batch only
            dynamic = None
        rows: list[BatchFigures] = []
        for batch in sorted(set(batches) | {native_batch}):
            session, feeds = (native, _feeds(native, None)) if batch == native_batch else (dynamic, None)
            if session is None:
                continue
            try:
                feeds = feeds or _feeds(session, batch)
                rate, power = _measure(session, feeds, seconds_per_point, None if simulated else meter)
            except Exception as exc:  # noqa: BLE001 - e.g. a reshape our rewrite missed
                progress(f"  {name} batch {batch}: skipped ({str(exc)[:80]})")
                continue
            rate *= speed_factor
            row = BatchFigures(batch, rate)
            if power is not None and idle_w is not None:
                row.busy_w = power
                row.energy_j_per_item = max(0.0, power - idle_w) / rate
                busy_samples.append(power)
            rows.append(row)
            progress(f"  {name} batch {batch}: {rate:.1f} items/s" +
                     (f", {power:.1f} W ({meter.source})" if row.busy_w is not None else ""))
        native_rate = next(r.items_per_s for r in rows if r.batch == native_batch)
        figures.append(ModelFigures(name, sha, native_batch, native_rate,
                                    "simulated" if simulated else "measured", rows))
    power = power_figures(idle_w, busy_samples, meter, declared_idle_w, declared_busy_w, device_name, simulated)
    progress(f"power: idle {power.idle_w:.1f} W ({power.idle_source}), busy {power.busy_w:.1f} W "
             f"({power.busy_source}), marginal {power.marginal_w_per_slot:.1f} W/slot ({power.marginal_source})")
    return Profile(device_name, providers[0], power, figures, now_ms(), speed_factor)


def power_figures(idle_w, busy_samples, meter, declared_idle_w, declared_busy_w, device_name,
                   simulated) -> PowerFigures:
    if simulated:
        # A simulated device's power is its fleet profile, passed in as declared figures.
        idle, busy = declared_idle_w or 0.0, declared_busy_w or 0.0
        return PowerFigures(idle, "simulated", busy, "simulated", max(0.0, busy - idle), "simulated",
                            "simulated device: published profile, not this machine")
    if meter is not None and busy_samples:
        busy = float(np.median(busy_samples))
        return PowerFigures(idle_w, meter.source, busy, meter.source, max(0.0, busy - idle_w), meter.source,
                            "median whole-device power over the calibration runs, one slot busy")
    if declared_busy_w is not None:
        idle = declared_idle_w or 0.0
        return PowerFigures(idle, "declared", declared_busy_w, "declared", max(0.0, declared_busy_w - idle),
                            "declared", "from the provider config")
    idle, busy, cite = estimate_power(device_name, cores_used=1)
    return PowerFigures(idle, "estimated", busy, "estimated", max(0.0, busy - idle), "estimated", cite)
