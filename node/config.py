"""Provider configuration: HOME/provider.toml for everything the flags set, so the daemon
can run under systemd; a flag given on the command line wins over the file.

Every key, its default, unit and meaning: docs/config.md, generated from the fields of
ProviderConfig below (`python -m node.config > docs/config.md`), so it cannot drift.
"""

from __future__ import annotations

import platform
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

from protocol.messages import ARCHES, MAX_OFFER_TTL_MS, MAX_REQUEST_BYTES

CONFIG_NAME = "provider.toml"
MIN_OFFER_TTL_S = 6.0   # refreshed every 2 s at most: half the gossip rate a peer allows an origin
MAX_OFFER_TTL_S = MAX_OFFER_TTL_MS / 1000  # receivers refuse offers that live longer (protocol.messages.open_offer)


def local_arch() -> str:
    machine = platform.machine().lower()
    return "arm64" if machine in ("arm64", "aarch64") else "x86_64"


def _key(default=None, *, help: str, unit: str = "", factory=None, flag: str | None = "", measure: bool = False,
         hidden: bool = False, choices: tuple[str, ...] | None = None):
    """A provider.toml key and its command-line flag: default, unit, meaning, flag name
    (default --the-key-name; None: the file only) live here, once. The flags of `provider
    run` and `provider calibrate` (`measure`: calibrate has it too), the file's types and
    docs/config.md (`python -m node.config`) are all generated from these fields."""
    metadata = {"help": help, "unit": unit, "flag": flag, "measure": measure, "hidden": hidden, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ProviderConfig:
    home: Path
    listen: list[str] = _key(factory=lambda: ["/ip4/0.0.0.0/tcp/4001"], help="multiaddrs to listen on")
    bootstrap: list[str] = _key(factory=list, help="bootstrap multiaddrs, each ending in /p2p/<peer id>; "
                                "give several: losing one loses nothing")
    announce: list[str] = _key(factory=list, help="addresses buyers reach this provider at, e.g. "
                               "/ip4/<public ip>/tcp/4001 behind a port forward; by default learnt by a dial-back "
                               "from a bootstrap, and behind NAT jobs come through a bootstrap's relay")
    slots: int = _key(1, help="jobs run at once")
    device_name: str | None = _key(help="advertised device name (default: the CPU or GPU model name)", measure=True)
    arch: str = _key(factory=local_arch, help=f"advertised arch: {', '.join(ARCHES)} (default: this machine's)",
                     choices=ARCHES)
    memory_mb: int = _key(4096, unit="MiB", help="advertised device memory, shared by the slots")
    idle_w: float | None = _key(unit="W", help="declared idle power, used only when no meter is readable", measure=True)
    busy_w: float | None = _key(unit="W", help="declared busy power, used only when no meter is readable", measure=True)
    marginal_w: float | None = _key(unit="W", help="declared marginal power per busy slot (default busy - idle)")
    carbon_g_per_kwh: float = _key(300.0, unit="g CO2/kWh", help="static grid carbon intensity", flag="--carbon")
    carbon_source: str = _key("declared", help="where the static carbon figure comes from")
    carbon_csv: Path | None = _key(help="hourly grid intensity instead: a CSV of time,g_per_kwh rows")
    carbon_ceiling: float | None = _key(unit="g CO2/kWh", help="withdraw capacity while the grid is dirtier")
    price_per_s: float = _key(0.0001, unit="price units per busy second", help="price of compute time")
    models: list[Path] = _key(factory=list, help="ONNX models to offer (default: seeded squeezenet, shufflenet "
                              "and resnet50); throughput is measured", flag="--model", measure=True)
    speed_factor: float = _key(1.0, help="devnet: simulate a device this many times faster than this machine",
                                measure=True)
    idle_only: bool = _key(False, help="sell only while the owner leaves the machine idle")
    idle_threshold: float = _key(0.2, unit="share of CPU", help="owner load above which capacity is withdrawn")
    idle_hold_s: float = _key(60.0, unit="s", help="how long the owner load must stay under before selling again")
    model_budget_mb: float = _key(2048.0, unit="MiB", help="disk for models buyers send; least recently used go first",
                                   flag=None)
    job_memory_mb: float = _key(4096.0, unit="MiB", help="a job estimated to need more memory is refused", flag=None)
    open_models: bool = _key(True, help="also run models this provider does not list, sent by hash on demand. "
                             "RISK: strangers' models run here; each is checked in a throwaway subprocess first "
                             "and runs under a timeout and a memory ceiling, but set false to run only your own", flag=None)
    fault_output_noise: float = _key(0.0, help="devnet fault injection only: perturb outputs", hidden=True)
    link_delay_ms: float = _key(0.0, unit="ms", help="devnet: one-way delay of this provider's simulated link")
    link_on_wire: bool = _key(False, help="devnet: the network adds the link's delay (a namespace devnet's wire): "
                              "the offer declares it, the transport does not sleep it")
    time_scale: float = _key(1.0, help="devnet: a simulated device's durations (queue, compute, link) last this many "
                             "times longer on the wall clock, so a slow host can play a fast fleet")
    offer_ttl_s: float = _key(60.0, unit="s", help="offer lifetime (6-120); refreshed every third of it")
    credit_s: float = _key(120.0, unit="s", help="compute seconds a buyer may hold unacked (or have rejected in the "
                           "last day) before it gets settle-first instead of service")
    request_budget_mb: float = _key(192.0, unit="MiB", help="bytes of job requests held at once; a request that "
                                    "does not fit is answered busy")
    ack_timeout_s: float = _key(30.0, unit="s", help="how long a finished job waits for the buyer's ack on its "
                                "stream; a later ack still settles it (settle protocol)")
    metrics: str | None = _key(help="HOST:PORT of a Prometheus endpoint (off when unset); keep it private")

    def check(self) -> None:
        problems = []
        if self.slots < 1:
            problems.append(f"slots must be >= 1, got {self.slots}")
        if not 0.0 < self.idle_threshold <= 1.0:
            problems.append(f"idle_threshold must be in (0, 1], got {self.idle_threshold}")
        if not MIN_OFFER_TTL_S <= self.offer_ttl_s <= MAX_OFFER_TTL_S:
            problems.append(f"offer_ttl_s must be in [{MIN_OFFER_TTL_S:g}, {MAX_OFFER_TTL_S:g}] s, got {self.offer_ttl_s}")
        if self.credit_s < 0:
            problems.append(f"credit_s must be >= 0, got {self.credit_s}")
        if self.request_budget_mb * 1024 * 1024 < MAX_REQUEST_BYTES:
            problems.append(f"request_budget_mb must hold one maximal request ({MAX_REQUEST_BYTES >> 20} MiB), "
                            f"got {self.request_budget_mb:g}")
        if not 0 < self.ack_timeout_s <= 3600:
            problems.append(f"ack_timeout_s must be in (0, 3600] s, got {self.ack_timeout_s}")
        if self.speed_factor <= 0:
            problems.append(f"speed_factor must be > 0, got {self.speed_factor}")
        if self.time_scale < 1:
            problems.append(f"time_scale must be >= 1, got {self.time_scale}")
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
        if self.arch not in ARCHES:
            problems.append(f"arch must be one of {ARCHES}, got {self.arch!r}")
        if problems:
            raise ConfigError("; ".join(problems))


class ConfigError(ValueError):
    pass


def _kind(hint) -> tuple[type, type | None]:
    """(the TOML value's type, a list's item type) from a field's annotation."""
    args = [a for a in get_args(hint) if a is not type(None)]
    if getattr(hint, "__origin__", None) is list:
        return list, args[0]
    if args:  # X | None
        return _kind(args[0]) if len(args) == 1 else (args[0], None)
    return hint, None


def keys() -> list:
    """Every provider.toml key (dataclass fields of ProviderConfig), in order."""
    return [f for f in fields(ProviderConfig) if f.name != "home"]


_HINTS = get_type_hints(ProviderConfig)
_KINDS = {f.name: _kind(_HINTS[f.name])[0] for f in keys()}
_PATH_KEYS = {f.name for f in keys() if _kind(_HINTS[f.name]) == (Path, None)}
_PATH_LIST_KEYS = {f.name for f in keys() if _kind(_HINTS[f.name]) == (list, Path)}


def flag_name(f) -> str | None:
    flag = f.metadata["flag"]
    return None if flag is None else flag or "--" + f.name.replace("_", "-")


def add_flags(parser, *, measure_only: bool = False) -> None:
    """The command-line flags for these keys. Defaults are None: an unset flag falls
    back to HOME/provider.toml, then to the key's default."""
    import argparse

    for f in keys():
        flag = flag_name(f)
        if flag is None or (measure_only and not f.metadata["measure"]):
            continue
        kind, item = _kind(_HINTS[f.name])
        help_text = f.metadata["help"] + (f" [{f.metadata['unit']}]" if f.metadata["unit"] else "")
        shown = _shown_default(f)
        if kind is list:
            help_text += " (repeatable)"
        elif shown.startswith("`") and "default" not in help_text:
            help_text += f" (default {shown.strip('`')})"
        options: dict[str, Any] = {"dest": f.name, "help": argparse.SUPPRESS if f.metadata["hidden"] else help_text}
        if kind is bool:
            options.update(action="store_true", default=None)
        elif kind is list:
            options.update(action="append", type=str)
        else:
            options["type"] = str if kind is Path else kind
        if f.metadata["choices"]:
            options["choices"] = f.metadata["choices"]
        if f.name == "metrics":
            options["metavar"] = "HOST:PORT"
        parser.add_argument(flag, **options)


def overrides_from_flags(args) -> dict[str, Any]:
    """The keys a command line set (None: not given)."""
    return {f.name: getattr(args, f.name, None) for f in keys()}


def load_config(home: Path, overrides: dict[str, Any]) -> ProviderConfig:
    """HOME/provider.toml, then every override that is not None."""
    values: dict[str, Any] = {}
    path = home / CONFIG_NAME
    known = {f.name for f in keys()}
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


def _shown_default(f) -> str:
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    if f.name == "arch":
        return "this machine's"
    if default is None:
        return "unset"
    return f"`{str(default).lower() if isinstance(default, bool) else default}`"


def reference() -> str:
    """docs/config.md: every provider.toml key with its default, unit and meaning."""
    lines = ["# provider.toml reference", "",
             "Generated from `node/config.py` (`python -m node.config > docs/config.md`); a test keeps the two",
             "equal. Every key is optional; a flag given on the command line wins over the file.", "",
             "| key | default | unit | meaning |", "|---|---|---|---|"]
    for f in keys():
        shown = _shown_default(f)
        lines.append(f"| `{f.name}` | {shown} | {f.metadata['unit']} | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
