"""Fleet files (TOML): simulated devices, grid regions and who is in the network.

Format (see devnet/fleets/default.toml, which cites its sources):

    [[regions]]   name, carbon_g_per_kwh, source
    [[devices]]   name, arch (cuda/arm64/x86_64), slots, idle_w, busy_w, resnet50_img_s,
                  memory_mb, price_per_s, source, resnet50_peak_img_s (optional: per slot, what
                  large batches approach; a job of n rows then takes a fixed part plus n
                  per-item parts, protocol.pricing.batch_job_s)
    [[providers]] device, region, link_ms (one-way delay added on the wire), count (default 1),
                  and for a namespace devnet (devnet/netns.py): nat ("none", "cone",
                  "symmetric" or "forwarded"), jitter_ms, loss (0-1), rate_mbit (0: unlimited)
    [[models]]    name, speed_vs_resnet50 (items/s relative to resnet50's), source  (optional;
                  the reference models have built-in figures, MODEL_SPEED_VS_RESNET50)

Any file in this format works; errors name the table, the entry and the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from protocol.messages import ARCHES, ModelCapability

NAT_KINDS = ("none", "cone", "symmetric", "forwarded")  # devnet/netns.py builds each
DEFAULT_FLEET = Path(__file__).parent / "fleets" / "default.toml"
# A device's rate for a model is its published resnet50 rate times the model's speed
# relative to resnet50. These ratios were measured once on the 2-core bench machine
# (onnxruntime CPU, one thread, batch 1, the seeded reference models) and are fixed
# here, so no run depends on how fast or busy the machine running it is. They are
# CPU ratios: a GPU's may differ, and a fleet file can override them ([[models]]).
MODEL_SPEED_VS_RESNET50 = {
    "resnet50": 1.0, "squeezenet": 9.9, "shufflenet": 17.0, "densenet121": 1.2, "inception_v1": 1.7,
    "inception_v2": 2.2, "bvlc_alexnet": 2.1, "zfnet512": 1.0, "vgg19": 0.21,
}
MODEL_SPEED_SOURCE = "measured on the 2-core bench machine, onnxruntime CPU, batch 1 (devnet/fleet.py)"


class FleetError(ValueError):
    pass


@dataclass(frozen=True)
class Device:
    name: str
    arch: str
    slots: int
    idle_w: float
    busy_w: float
    resnet50_img_s: float
    memory_mb: int
    price_per_s: float
    source: str
    resnet50_peak_img_s: float | None = None

    @property
    def marginal_w_per_slot(self) -> float:
        """What one more busy slot adds over idle: the idle draw is spent anyway."""
        return (self.busy_w - self.idle_w) / self.slots


@dataclass(frozen=True)
class Region:
    name: str
    carbon_g_per_kwh: float
    source: str


@dataclass(frozen=True)
class Member:
    device: Device
    region: Region
    link_ms: float
    nat: str = "none"  # only a namespace devnet has routers; on loopback every node is reachable
    jitter_ms: float = 0.0
    loss: float = 0.0
    rate_mbit: float = 0.0


@dataclass(frozen=True)
class Fleet:
    name: str
    path: Path
    members: tuple[Member, ...]
    model_speeds: tuple[tuple[str, float], ...] = ()  # the file's [[models]], over the built-in ratios

    def pick(self, n: int) -> list[Member]:
        """n providers: the fleet's members in order, repeated as needed."""
        if not self.members:
            raise FleetError(f"{self.path}: no [[providers]]")
        return [self.members[i % len(self.members)] for i in range(n)]


def model_speed(fleet: Fleet, name: str) -> float:
    """The model's items/s relative to resnet50 on this fleet's devices."""
    speed = dict(fleet.model_speeds).get(name, MODEL_SPEED_VS_RESNET50.get(name))
    if speed is None:
        raise FleetError(f"{fleet.path}: model {name!r} has no built-in speed; add [[models]] name = {name!r}, "
                         "speed_vs_resnet50 = <its items/s over resnet50's> to the fleet file")
    return speed


def capability(fleet: Fleet, device: Device, name: str, sha256: str = "") -> ModelCapability:
    """What a simulated device advertises for a model: its resnet50 rates (one at a time,
    and the batch peak where the fleet gives one) times the model's speed ratio. (The
    hash is only needed where it goes into an offer.)"""
    speed = model_speed(fleet, name)
    peak = device.resnet50_peak_img_s * speed if device.resnet50_peak_img_s else None
    return ModelCapability(name, sha256, device.resnet50_img_s * speed, "simulated", peak)


def _optional(table: dict, key: str, kind, where: str, *, minimum: float | None = None):
    return None if table.get(key) is None else _get(table, key, kind, where, minimum=minimum)


def _get(table: dict, key: str, kind, where: str, *, minimum: float | None = None, default=None):
    value = table.get(key, default)
    if value is None:
        raise FleetError(f"{where}: missing {key!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise FleetError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
    if minimum is not None and value < minimum:
        raise FleetError(f"{where}.{key}: must be >= {minimum}, got {value}")
    return value


def load_fleet(path: Path) -> Fleet:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise FleetError(f"{path}: {exc}") from None
    regions, devices = {}, {}
    for i, r in enumerate(data.get("regions", [])):
        where = f"{path}: regions[{i}]"
        name = _get(r, "name", str, where)
        regions[name] = Region(name, _get(r, "carbon_g_per_kwh", float, where, minimum=0.0),
                               _get(r, "source", str, where, default="unstated"))
    for i, d in enumerate(data.get("devices", [])):
        where = f"{path}: devices[{i}]"
        name = _get(d, "name", str, where)
        arch = _get(d, "arch", str, where)
        if arch not in ARCHES:
            raise FleetError(f"{where}.arch: expected one of {ARCHES}, got {arch!r}")
        device = Device(name, arch, _get(d, "slots", int, where, minimum=1), _get(d, "idle_w", float, where, minimum=0.0),
                        _get(d, "busy_w", float, where, minimum=0.0),
                        _get(d, "resnet50_img_s", float, where, minimum=1e-6),
                        _get(d, "memory_mb", int, where, minimum=1), _get(d, "price_per_s", float, where, minimum=0.0),
                        _get(d, "source", str, where, default="unstated"),
                        _optional(d, "resnet50_peak_img_s", float, where, minimum=1e-6))
        if device.busy_w < device.idle_w:
            raise FleetError(f"{where}: busy_w ({device.busy_w}) is below idle_w ({device.idle_w})")
        devices[name] = device
    members = []
    for i, p in enumerate(data.get("providers", [])):
        where = f"{path}: providers[{i}]"
        device_name = _get(p, "device", str, where)
        region_name = _get(p, "region", str, where)
        if device_name not in devices:
            raise FleetError(f"{where}.device: {device_name!r} is not among [[devices]] ({sorted(devices)})")
        if region_name not in regions:
            raise FleetError(f"{where}.region: {region_name!r} is not among [[regions]] ({sorted(regions)})")
        nat = _get(p, "nat", str, where, default="none")
        if nat not in NAT_KINDS:
            raise FleetError(f"{where}.nat: expected one of {NAT_KINDS}, got {nat!r}")
        loss = _get(p, "loss", float, where, minimum=0.0, default=0.0)
        if loss >= 1:
            raise FleetError(f"{where}.loss: a fraction below 1, got {loss}")
        member = Member(devices[device_name], regions[region_name],
                        _get(p, "link_ms", float, where, minimum=0.0, default=0.0), nat,
                        _get(p, "jitter_ms", float, where, minimum=0.0, default=0.0), loss,
                        _get(p, "rate_mbit", float, where, minimum=0.0, default=0.0))
        members.extend([member] * _get(p, "count", int, where, minimum=1, default=1))
    speeds = []
    for i, m in enumerate(data.get("models", [])):
        where = f"{path}: models[{i}]"
        speeds.append((_get(m, "name", str, where), _get(m, "speed_vs_resnet50", float, where, minimum=1e-9)))
    name = data.get("meta", {}).get("name", Path(path).stem)
    return Fleet(str(name), Path(path), tuple(members), tuple(speeds))
