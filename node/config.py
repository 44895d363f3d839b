"""Provider configuration: HOME/provider.toml for everything the flags set, so the daemon
can run under systemd; a flag given on the command line wins over the file.

Example (every key optional):

    listen = ["/ip4/0.0.0.0/tcp/4001"]
    bootstrap = ["/ip4/203.0.113.5/tcp/4000/p2p/12D3KooW..."]
    slots = 2
    models = ["/srv/models/resnet50.onnx"]     # default: reference models from `onnx`
    price_per_s = 0.0001
    idle_w = 12.0            # declared power, used only when no meter is readable
    busy_w = 65.0
    carbon_g_per_kwh = 300.0  # static grid intensity ...
    carbon_csv = "/etc/idlemesh/grid.csv"   # ... or an hourly schedule
    carbon_ceiling = 400.0   # withdraw capacity while the grid is dirtier
    idle_only = true         # sell only while the owner leaves the machine idle
    idle_threshold = 0.2     # owner's share of CPU above which we withdraw
    idle_hold_s = 60.0       # how long it must stay under before we sell again
    model_budget_mb = 2048   # disk for models buyers send; least recently used go first
    job_memory_mb = 4096     # a job estimated to need more is refused
    open_models = true       # also run models not listed, sent by hash on demand
    offer_ttl_s = 60.0       # offer lifetime in s (6-600); refreshed every third of it
    metrics = "127.0.0.1:9464"  # Prometheus endpoint (off when absent); keep it off public addresses
"""

from __future__ import annotations

import platform
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_NAME = "provider.toml"
MIN_OFFER_TTL_S = 6.0   # refreshed every 2 s at most: half the gossip rate a peer allows an origin
MAX_OFFER_TTL_S = 600.0  # receivers refuse offers that live longer (protocol.messages.open_offer)


def local_arch() -> str:
    machine = platform.machine().lower()
    return "arm64" if machine in ("arm64", "aarch64") else "x86_64"


@dataclass
class ProviderConfig:
    home: Path
    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/4001"])
    bootstrap: list[str] = field(default_factory=list)
    slots: int = 1
    device_name: str | None = None       # default: the CPU model name
    arch: str = field(default_factory=local_arch)
    memory_mb: int = 4096
    idle_w: float | None = None           # declared; None: measured or estimated
    busy_w: float | None = None
    marginal_w: float | None = None       # declared per busy slot; default busy - idle
    carbon_g_per_kwh: float = 300.0
    carbon_source: str = "declared"
    carbon_csv: Path | None = None
    carbon_ceiling: float | None = None
    price_per_s: float = 0.0001
    models: list[Path] = field(default_factory=list)
    speed_factor: float = 1.0             # simulated devices scale measured throughput
    idle_only: bool = False
    idle_threshold: float = 0.2
    idle_hold_s: float = 60.0
    model_budget_mb: float = 2048.0
    job_memory_mb: float = 4096.0
    open_models: bool = True
    fault_output_noise: float = 0.0       # devnet fault injection only: perturb outputs
    link_delay_ms: float = 0.0            # devnet: one-way delay of this provider's simulated link
    offer_ttl_s: float = 60.0             # offer lifetime; refreshed every third of it
    metrics: str | None = None            # HOST:PORT for a Prometheus endpoint; off when unset

    def check(self) -> None:
        problems = []
        if self.slots < 1:
            problems.append(f"slots must be >= 1, got {self.slots}")
        if not 0.0 < self.idle_threshold <= 1.0:
            problems.append(f"idle_threshold must be in (0, 1], got {self.idle_threshold}")
        if not MIN_OFFER_TTL_S <= self.offer_ttl_s <= MAX_OFFER_TTL_S:
            problems.append(f"offer_ttl_s must be in [{MIN_OFFER_TTL_S:g}, {MAX_OFFER_TTL_S:g}] s, got {self.offer_ttl_s}")
        if self.speed_factor <= 0:
            problems.append(f"speed_factor must be > 0, got {self.speed_factor}")
        for name in ("idle_w", "busy_w", "marginal_w", "carbon_ceiling"):
            value = getattr(self, name)
            if value is not None and value < 0:
                problems.append(f"{name} must be >= 0, got {value}")
        if self.idle_w is not None and self.busy_w is not None and self.busy_w < self.idle_w:
            problems.append(f"busy_w ({self.busy_w}) is below idle_w ({self.idle_w})")
        for path in self.models:
            if not Path(path).is_file():
                problems.append(f"model file not found: {path}")
        if self.carbon_csv is not None and not Path(self.carbon_csv).is_file():
            problems.append(f"carbon_csv not found: {self.carbon_csv}")
        if self.metrics is not None:
            from .metrics import parse_listen
            try:
                parse_listen(self.metrics)
            except ValueError as exc:
                problems.append(str(exc))
        from .p2p import check_peer_addr
        for addr in self.bootstrap:
            try:
                check_peer_addr(addr)
            except ValueError as exc:
                problems.append(f"bootstrap: {exc}")
        from protocol.messages import ARCHES
        if self.arch not in ARCHES:
            problems.append(f"arch must be one of {ARCHES}, got {self.arch!r}")
        if problems:
            raise ConfigError("; ".join(problems))


class ConfigError(ValueError):
    pass


_KINDS = {
    "listen": list, "bootstrap": list, "slots": int, "device_name": str, "arch": str, "memory_mb": int,
    "idle_w": float, "busy_w": float, "marginal_w": float, "carbon_g_per_kwh": float, "carbon_source": str, "carbon_csv": Path,
    "carbon_ceiling": float, "price_per_s": float, "models": list, "speed_factor": float, "idle_only": bool,
    "idle_threshold": float, "idle_hold_s": float, "model_budget_mb": float, "job_memory_mb": float,
    "open_models": bool, "fault_output_noise": float, "link_delay_ms": float, "offer_ttl_s": float,
    "metrics": str,
}
_PATH_KEYS = {"carbon_csv"}
_PATH_LIST_KEYS = {"models"}


def load_config(home: Path, overrides: dict[str, Any]) -> ProviderConfig:
    """HOME/provider.toml, then every override that is not None."""
    values: dict[str, Any] = {}
    path = home / CONFIG_NAME
    known = {f.name for f in fields(ProviderConfig)} - {"home"}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        values.update(data)
    values.update({k: v for k, v in overrides.items() if v is not None and k in known})
    if isinstance(values.get("listen"), str):
        values["listen"] = [values["listen"]]
    for key in _PATH_KEYS:
        if values.get(key) is not None:
            values[key] = Path(values[key]).expanduser()
    for key in _PATH_LIST_KEYS:
        if key in values:
            values[key] = [Path(p).expanduser() for p in values[key]]
    for key, value in values.items():
        kind = _KINDS.get(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif kind is not None and value is not None and not (isinstance(value, kind) and
                                                             not (kind is int and isinstance(value, bool))):
            raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    config = ProviderConfig(home=home, **values)
    config.check()
    return config
