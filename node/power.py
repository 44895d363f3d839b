"""Energy meters and published power figures.

A meter reads a monotonic energy counter in joules:
- NVML (nvidia-ml-py): the GPU's total-energy counter, in mJ, Volta and newer;
- RAPL (/sys/class/powercap/intel-rapl:N/energy_uj): CPU package energy, which wraps at
  max_energy_range_uj and is usually readable by root only.
Every figure derived from a meter is labelled measured-nvml / measured-rapl. Without a
meter, power is what the operator declared, else an estimate from ESTIMATES (published
device figures, shared/notes/device-figures.md), labelled `estimated`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger("idlemesh.power")

POWERCAP_ROOT = Path("/sys/class/powercap")


class EnergyMeter(Protocol):
    source: str  # measured-nvml / measured-rapl

    def read_j(self) -> float: ...


class RaplMeter:
    """Sum of the package domains (intel-rapl:N, not their :N:M subdomains), unwrapped."""

    source = "measured-rapl"

    def __init__(self, root: Path = POWERCAP_ROOT):
        self._domains: list[tuple[Path, int]] = []
        for domain in sorted(root.glob("intel-rapl:*")):
            if domain.name.count(":") != 1:
                continue  # a subdomain (core, uncore, dram) is already inside its package
            energy = domain / "energy_uj"
            try:
                max_range = int((domain / "max_energy_range_uj").read_text())
                int(energy.read_text())
            except (OSError, ValueError):
                continue
            self._domains.append((energy, max_range))
        if not self._domains:
            raise OSError(f"no readable RAPL package domain under {root}")
        self._lock = threading.Lock()
        self._last = [int(path.read_text()) for path, _ in self._domains]
        self._total_uj = 0

    def read_j(self) -> float:
        with self._lock:
            for i, (path, max_range) in enumerate(self._domains):
                now = int(path.read_text())
                delta = now - self._last[i]
                if delta < 0:  # the counter wrapped
                    delta += max_range
                self._total_uj += delta
                self._last[i] = now
            return self._total_uj / 1e6


class NvmlMeter:
    source = "measured-nvml"

    def __init__(self, index: int = 0):
        import pynvml  # nvidia-ml-py; fails cleanly where no driver is installed

        pynvml.nvmlInit()
        self._nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.name = pynvml.nvmlDeviceGetName(self.handle)
        if isinstance(self.name, bytes):
            self.name = self.name.decode()
        self.memory_mb = pynvml.nvmlDeviceGetMemoryInfo(self.handle).total // (1 << 20)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)  # raises on pre-Volta GPUs

    def read_j(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0

    def gpu_busy_fraction(self) -> float:
        return self._nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu / 100.0

    def other_processes(self, own_pid: int) -> int:
        """Processes other than ours holding a compute context on this GPU."""
        procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        return sum(1 for p in procs if p.pid != own_pid)


def probe_meter(*, want_gpu: bool, powercap_root: Path = POWERCAP_ROOT) -> EnergyMeter | None:
    """The best meter this machine allows: NVML when jobs run on an NVIDIA GPU, else RAPL."""
    if want_gpu:
        try:
            return NvmlMeter()
        except Exception as exc:  # ImportError, NVMLError_*: no usable NVML here
            log.info("NVML energy counter not available: %s", exc)
    try:
        return RaplMeter(powercap_root)
    except OSError as exc:
        log.info("RAPL not readable: %s", exc)
    return None


@dataclass(frozen=True)
class PublishedFigure:
    match: str        # lower-case substring of the device name
    idle_w: float
    busy_w: float
    cite: str


# Published figures (shared/notes/device-figures.md). Idle figures marked *est.* there
# stay estimates here; every use is labelled `estimated`.
ESTIMATES = (
    PublishedFigure("h100", 50.0, 350.0, "H100 PCIe: TDP 350 W, idle est. (MLPerf R30 NVIDIA)"),
    PublishedFigure("a100", 40.0, 300.0, "A100 PCIe 80GB: TDP 300 W, idle est. (MLPerf R30)"),
    PublishedFigure("l4", 16.0, 72.0, "L4: TDP 72 W, idle est. (MLPerf R30 NVIDIA L4x1)"),
    PublishedFigure("t4", 10.0, 70.0, "T4: TDP 70 W, idle est. (MLPerf R30 Dell XE2420)"),
    PublishedFigure("4090", 22.0, 450.0, "RTX 4090 card: 450 W, idle est. (MLPerf R30 cTuning)"),
    PublishedFigure("3060", 12.0, 170.0, "RTX 3060: 170 W, idle est."),
    PublishedFigure("orin", 6.3, 22.7, "Jetson AGX Orin MaxQ at the wall (MLPerf Power R30)"),
    PublishedFigure("raspberry pi 5", 3.0, 6.5, "Raspberry Pi 5 (secondary power figures)"),
    PublishedFigure("apple m2", 7.0, 50.0, "Mac mini M2: Apple max power, idle est."),
    PublishedFigure("apple m1", 6.8, 39.0, "Mac mini M1 (Apple power figures)"),
    PublishedFigure("graviton", 0.5, 1.6, "Graviton3 per vCPU, est. from c7g pricing and RPi 5"),
    PublishedFigure("7700x", 40.0, 150.0, "Ryzen 7 7700X: 150 W, idle est."),
)
# A CPU we have no row for: a generic desktop/server core, ~4 W idle share and ~12 W
# busy per core (order of a 105-170 W TDP part with 8-16 cores), clearly an estimate.
GENERIC_CPU = ("generic x86/arm CPU: ~4 W idle and ~12 W busy per core used (estimate)", 4.0, 12.0)


def estimate_power(device_name: str, cores_used: int) -> tuple[float, float, str]:
    """(idle W, busy W, citation) for a device from published figures."""
    name = device_name.lower()
    for figure in ESTIMATES:
        if figure.match in name:
            return figure.idle_w, figure.busy_w, figure.cite
    cite, idle_per_core, busy_per_core = GENERIC_CPU
    return idle_per_core * cores_used, busy_per_core * cores_used, cite


def cpu_model_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()
