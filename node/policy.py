"""When a provider sells: only while the owner is not using the machine, and only while
the grid is clean enough. The decisions are pure functions of readings and time, so
tests drive them with fake sensors; the sensors below read /proc and NVML.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path


@dataclass
class IdleGate:
    """Open (selling) only after the owner's load has stayed under `threshold` for
    `hold_s`; closes at once when it goes over. Hysteresis keeps offers from flapping."""

    threshold: float = 0.2
    hold_s: float = 60.0
    quiet_since_s: float | None = None

    def update(self, owner_load: float, now_s: float) -> bool:
        if owner_load >= self.threshold:
            self.quiet_since_s = None
            return False
        if self.quiet_since_s is None:
            self.quiet_since_s = now_s
        return now_s - self.quiet_since_s >= self.hold_s


class CarbonSchedule:
    """Grid intensity now: a static figure, or an hourly CSV of `time,g_per_kwh` rows where
    time is an ISO hour (2026-11-22T14:00, UTC unless it says) or an hour of day 0-23
    (UTC) for a typical-day profile. The latest row at or before now applies."""

    def __init__(self, static_g_per_kwh: float, csv_path: Path | None = None, static_source: str = "declared"):
        self.static = static_g_per_kwh
        self.static_source = static_source
        self.source_path = csv_path
        self.by_time: list[tuple[datetime, float]] = []
        self.by_hour: dict[int, float] = {}
        if csv_path is not None:
            self._load(csv_path)

    def _load(self, path: Path) -> None:
        with open(path, newline="") as handle:
            for number, row in enumerate(csv.reader(handle), start=1):
                if not row or row[0].strip().startswith("#") or row[0].strip().lower() in ("time", "hour"):
                    continue
                if len(row) < 2:
                    raise ValueError(f"{path}:{number}: expected time,g_per_kwh")
                stamp, value = row[0].strip(), float(row[1])
                if value < 0:
                    raise ValueError(f"{path}:{number}: negative intensity {value}")
                if stamp.isdigit():
                    hour = int(stamp)
                    if not 0 <= hour <= 23:
                        raise ValueError(f"{path}:{number}: hour {hour} is not 0-23")
                    self.by_hour[hour] = value
                else:
                    when = datetime.fromisoformat(stamp)
                    if when.tzinfo is None:
                        when = when.replace(tzinfo=timezone.utc)
                    self.by_time.append((when, value))
        self.by_time.sort()
        if not self.by_time and not self.by_hour:
            raise ValueError(f"{path}: no rows")

    @property
    def source(self) -> str:
        return f"schedule:{self.source_path.name}" if self.source_path else self.static_source

    def at(self, now: datetime) -> float:
        if self.by_time:
            current = None
            for when, value in self.by_time:
                if when <= now:
                    current = value
                else:
                    break
            if current is not None:
                return current
        if self.by_hour:
            hours = sorted(self.by_hour)
            hour = now.astimezone(timezone.utc).hour
            earlier = [h for h in hours if h <= hour]
            return self.by_hour[earlier[-1] if earlier else hours[-1]]
        return self.static


@dataclass(frozen=True)
class Availability:
    selling: bool
    reason: str  # why not, or "selling"


def decide(*, idle_only: bool, idle_open: bool, owner_load: float, carbon_now: float,
           carbon_ceiling: float | None) -> Availability:
    if carbon_ceiling is not None and carbon_now > carbon_ceiling:
        return Availability(False, f"grid at {carbon_now:.0f} g/kWh, over the ceiling of {carbon_ceiling:.0f}")
    if idle_only and not idle_open:
        return Availability(False, f"owner busy (load {owner_load:.0%}) or not idle long enough")
    return Availability(True, "selling")


class OwnerLoad:
    """Share of all CPUs used by processes other than this one, from /proc, plus whether
    another process holds the GPU. The first reading covers the time since creation."""

    def __init__(self, proc: Path = Path("/proc"), gpu=None):
        self.proc = proc
        self.gpu = gpu  # an NvmlMeter, or None
        self.ticks = os.sysconf("SC_CLK_TCK")
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        fields = (self.proc / "stat").read_text().splitlines()[0].split()[1:]
        values = [float(x) for x in fields]
        idle = values[3] + (values[4] if len(values) > 4 else 0.0)
        total = sum(values[:8])
        own = (self.proc / "self" / "stat").read_text().rsplit(")", 1)[1].split()
        own_ticks = float(own[11]) + float(own[12])  # utime + stime
        return total, idle, own_ticks

    def read(self) -> float:
        total, idle, own = self._sample()
        last_total, last_idle, last_own = self._last
        self._last = (total, idle, own)
        elapsed = total - last_total
        if elapsed <= 0:
            return 0.0
        busy_others = (elapsed - (idle - last_idle)) - (own - last_own)
        load = max(0.0, busy_others / elapsed)
        if self.gpu is not None:
            try:
                if self.gpu.other_processes(os.getpid()):
                    load = max(load, 1.0)
            except Exception:  # noqa: BLE001 - a flaky NVML read must not stop the daemon
                pass
        return min(1.0, load)
