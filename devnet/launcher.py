"""Starts a bootstrap node and N providers as separate processes; waits on their events.

Each child prints JSON event lines on stdout ("ready", "announced", "offer", ...); the
launcher waits for those events, never for a fixed time. Logs go to HOME/node.log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import trio

from node.calibrate import reference_model_path

from .netns import all_namespaces, entered, exec_prefix
from .netns import remove as remove_namespaces

DEFAULT_MODELS = ("squeezenet", "shufflenet")  # seeded random weights: outputs depend on inputs

# A small built-in fleet of declared profiles, so the matcher has real choices before
# issue-6 fleets exist: (device name, slots, idle W, busy W, marginal W/slot, g CO2/kWh,
# price per busy second).
BUILTIN_PROFILES = [
    ("workstation-a", 2, 12.0, 65.0, 25.0, 350.0, 0.00010),
    ("laptop-b", 1, 4.0, 20.0, 14.0, 120.0, 0.00005),
    ("server-c", 2, 60.0, 180.0, 55.0, 450.0, 0.00003),
]


@dataclass
class Child:
    name: str
    process: trio.Process
    home: Path
    events: "trio.MemoryReceiveChannel[dict]"
    ready: dict = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    wrap: list[str] = field(default_factory=list)  # e.g. `ip netns exec NS`: where the process runs


@dataclass
class Devnet:
    root: Path
    bootstrap_addr: str
    children: list[Child]
    _nursery: trio.Nursery | None = None
    bootstrap_addrs: list[str] = field(default_factory=list)
    spots: list = field(default_factory=list)  # devnet/netns.py Spots, when on separate network stacks

    async def restart(self, child: Child, timeout_s: float = 60.0, env: dict[str, str] | None = None) -> Child:
        """Start a stopped (or killed) node again with the same home, port and arguments;
        `env` is added to its environment (a fault to inject, say); faults given at start
        do not carry over."""
        if child.process.returncode is None:
            child.process.send_signal(signal.SIGCONT)
            child.process.kill()
        await child.process.wait()
        fresh = await _start(self._nursery, child.name, child.home, child.args, env, child.wrap)
        self.children[self.children.index(child)] = fresh
        fresh.ready = await _wait_event(fresh, "ready", timeout_s)
        return fresh

    @property
    def providers(self) -> list[Child]:
        return [c for c in self.children if c.name.startswith("provider")]

    @property
    def bootstrap(self) -> Child:
        return next(c for c in self.children if c.name == "bootstrap")


async def _pump(stream, send: trio.MemorySendChannel) -> None:
    buffer = b""
    async with send:
        async for chunk in stream:
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    try:
                        send.send_nowait(event)
                    except trio.WouldBlock:
                        # Nobody is reading (a long `devnet up`): drop the event rather
                        # than stall the pipe, which would block the child's stdout.
                        pass


async def _wait_event(child: Child, name: str, timeout_s: float) -> dict:
    return (await _wait_events(child, {name}, timeout_s))[name]


async def _wait_events(child: Child, names: set[str], timeout_s: float) -> dict[str, dict]:
    """The first event of each name, in whatever order they come."""
    found: dict[str, dict] = {}
    with trio.move_on_after(timeout_s):
        async for event in child.events:
            if event.get("event") in names and event["event"] not in found:
                found[event["event"]] = event
                if len(found) == len(names):
                    return found
        raise RuntimeError(f"{child.name} exited before {sorted(names - set(found))} (see {child.home / 'node.log'})")
    raise RuntimeError(f"{child.name}: no {sorted(names - set(found))} within {timeout_s:.0f} s "
                       f"(see {child.home / 'node.log'})")


def peak_rss_mb(pid: int) -> float:
    """A node process's peak resident memory so far (Linux VmHWM), MiB: psutil reports
    the current RSS, not the peak."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a node process we start: unbuffered lines, one BLAS thread, no
    fault inherited from ours (a fault is only ever given on purpose, in `extra`)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("IDLEMESH_FAULT", None)
    env.update(extra or {})
    return env


async def _start(nursery: trio.Nursery, name: str, home: Path, args: list[str],
                 extra_env: dict[str, str] | None = None, wrap: list[str] | None = None) -> Child:
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "node.log", "ab")
    # IDLEMESH_TRACE_OFFERS: each node reports when offers arrive (gossip delivery figures).
    env = child_env({"IDLEMESH_TRACE_OFFERS": "1", **(extra_env or {})})
    process = await trio.lowlevel.open_process(
        [*(wrap or []), sys.executable, "-m", "node.cli", *args], stdout=subprocess.PIPE, stderr=log, env=env,
        start_new_session=True)  # our own process group: Ctrl-C reaches us, we stop them in order
    send, receive = trio.open_memory_channel[dict](1000)
    nursery.start_soon(_pump, process.stdout, send)
    return Child(name, process, home, receive, args=list(args), wrap=list(wrap or []))


async def _stop(children: list[Child]) -> None:
    for child in reversed(children):
        if child.process.returncode is None:
            child.process.send_signal(signal.SIGCONT)  # a paused child cannot act on SIGTERM
            child.process.send_signal(signal.SIGTERM)
    for child in reversed(children):
        with trio.move_on_after(10) as scope:
            await child.process.wait()
        if scope.cancelled_caught:
            child.process.kill()
            await child.process.wait()


LOOPBACK_LISTEN = "/ip4/127.0.0.1/tcp/0"


def provider_args(i: int, home: Path, bootstrap: str, models: list[Path], listen: str = LOOPBACK_LISTEN) -> list[str]:
    name, slots, idle, busy, marginal, carbon, price = BUILTIN_PROFILES[i % len(BUILTIN_PROFILES)]
    args = ["provider", "run", "--home", str(home), "--listen", listen, "--bootstrap", bootstrap,
            "--slots", str(slots), "--device-name", name, "--idle-w", str(idle), "--busy-w", str(busy),
            "--marginal-w", str(marginal), "--carbon", str(carbon), "--price-per-s", str(price)]
    for m in models:
        args += ["--model", str(m)]
    return args


START_S_PER_PROVIDER = 3.0  # measured: 100 providers up in 144-186 s on 2 cores
CALIBRATE_EACH_UP_TO = 8  # devnets with more (real, not fleet) providers calibrate once for all


def share_one_calibration(models: list[Path], homes: list[Path]) -> None:
    """One quick calibration of `models` on this machine, saved as every home's profile:
    each provider then starts with it instead of measuring again."""
    from node.calibrate import calibrate, save_profile

    profile = calibrate(models, batches=(), seconds_per_point=0.3)
    for home in homes:
        home.mkdir(parents=True, exist_ok=True)
        save_profile(home, profile)


def host_profile(models: list[Path]) -> tuple[dict[str, float], float]:
    """This machine's measured items/s per model on one slot, and its resnet50 rate: the
    yardstick a simulated device's published resnet50 figure is scaled against."""
    from node.calibrate import calibrate

    reference = reference_model_path("resnet50")
    measured = calibrate(list(dict.fromkeys([*models, reference])), batches=(), seconds_per_point=0.3)
    rates = {m.sha256: m.items_per_s for m in measured.models}
    return rates, next(m.items_per_s for m in measured.models if m.name == "resnet50")


def fleet_provider_args(member, home: Path, bootstrap: str, models: list[Path], host_resnet50: float, fleet,
                        time_scale: float = 1.0, listen: str = LOOPBACK_LISTEN, wire_delay: bool = False) -> list[str]:
    """Arguments for a simulated device, and its profile.json written in advance: the
    throughput is the device's published resnet50 rate times each model's speed relative
    to resnet50 (the same figures `devnet simulate` uses), and every figure is labelled
    simulated. This machine's rates only say how much faster than it the device is.
    `wire_delay`: the link's delay is added by the namespace devnet's wire, not by the
    node's own transport."""
    import hashlib

    from node.calibrate import ModelFigures, PowerFigures, Profile, model_name, save_profile
    from node.executor import best_execution_providers

    from .fleet import capability

    device = member.device
    speed = device.resnet50_img_s / host_resnet50
    figures = []
    for path in models:
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        cap = capability(fleet, device, model_name(path), sha)
        figures.append(ModelFigures(cap.name, sha, 1, cap.items_per_s, "simulated", [], cap.peak_items_per_s))
    power = PowerFigures(device.idle_w, "simulated", device.busy_w, "simulated", device.marginal_w_per_slot,
                         "simulated", f"published profile: {device.source}"[:200])
    home.mkdir(parents=True, exist_ok=True)
    save_profile(home, Profile(device.name, best_execution_providers()[0], power, figures, 0, speed))
    args = ["provider", "run", "--home", str(home), "--listen", listen, "--bootstrap", bootstrap,
            "--slots", str(device.slots), "--device-name", device.name, "--arch", device.arch,
            "--memory-mb", str(device.memory_mb), "--idle-w", str(device.idle_w), "--busy-w", str(device.busy_w),
            "--marginal-w", str(device.marginal_w_per_slot), "--carbon", str(member.region.carbon_g_per_kwh),
            "--carbon-source", f"simulated: {member.region.name}, {member.region.source}"[:120],
            "--price-per-s", str(device.price_per_s), "--speed-factor", repr(speed),
            "--link-delay-ms", str(member.link_ms), "--time-scale", repr(time_scale)]
    if wire_delay:
        args.append("--link-on-wire")
    for m in models:
        args += ["--model", str(m)]
    return args


@asynccontextmanager
async def open_devnet(n_providers: int, *, root: Path | None = None, models: list[Path] | None = None,
                      progress=None, timeout_s: float = 120.0,
                      extra_args: dict[int, list[str]] | None = None, fleet=None,
                      n_bootstraps: int = 1, extra_env: dict[int, dict[str, str]] | None = None,
                      host_resnet50: float | None = None,
                      time_scale: float = 1.0, netns: bool = False,
                      nats: dict[int, str] | None = None, buyer_nat: str = "none",
                      link: "LinkShape | None" = None) -> AsyncIterator[Devnet]:
    """A running devnet; every child is stopped when the block exits, however it exits.
    With a fleet (devnet/fleet.py) the providers are its simulated devices. With several
    bootstraps, each later one keeps a connection to the first, and every provider is
    given all of their addresses. `host_resnet50`: this machine's resnet50 rate, the
    yardstick of a simulated device's speed, measured once by a caller that opens
    several devnets (else measured here).

    `netns`: each node in its own network namespace (devnet/netns.py, root only), its
    link shaped by the wire process, providers behind the NAT their fleet entry (or
    `nats`, by provider index) names; the block itself runs in the buyer's namespace (behind
    `buyer_nat`), so a client opened there reaches the nodes as a buyer on the internet
    would. `link`: one shape for every link (else providers' from the fleet, the rest plain)."""
    root = root or Path(tempfile.mkdtemp(prefix="idlemesh-devnet-"))
    models = models or [reference_model_path(m) for m in DEFAULT_MODELS]
    say = progress or (lambda text: None)
    children: list[Child] = []
    members = fleet.pick(n_providers) if fleet is not None else []
    boot_names = ["bootstrap" if b == 0 else f"bootstrap-{b}" for b in range(n_bootstraps)]
    spots: dict[str, object] = {}
    wire = None
    async with trio.open_nursery() as nursery:
        try:
            if netns:
                spots, wire = await _open_namespaces(root, boot_names, n_providers, members, nats or {}, say,
                                                     timeout_s, buyer_nat, link, time_scale)

            def place(name: str) -> tuple[str, list[str]]:
                spot = spots.get(name)
                return (spot.listen(), exec_prefix(spot.ns)) if spot else (LOOPBACK_LISTEN, [])

            addrs: list[str] = []
            for name in boot_names:
                listen, wrap = place(name)
                args = ["bootstrap", "run", "--home", str(root / name), "--listen", listen]
                boot = await _start(nursery, name, root / name, args + [a for addr in addrs[:1] for a in
                                                                        ("--bootstrap", addr)], wrap=wrap)
                children.append(boot)
                boot.ready = await _wait_event(boot, "ready", timeout_s)
                addrs.append(boot.ready["addrs"][0])
                # A restart must come back on the same port: providers keep dialing this address.
                boot.args[boot.args.index("--listen") + 1] = addrs[-1].split("/p2p/")[0]
                say(f"{name} ready at {addrs[-1]}")
            bootstrap_addr = addrs[0]
            if fleet is not None and host_resnet50 is None:
                say("measuring this machine's resnet50 rate once, the yardstick of the fleet's speeds")
                _, host_resnet50 = await trio.to_thread.run_sync(host_profile, [])
            if fleet is None and n_providers > CALIBRATE_EACH_UP_TO:
                # Providers of one machine measure the same figures: once, not a hundred
                # times (a hundred calibrations at once would take minutes of 2 cores).
                say(f"measuring this machine's throughput once for {n_providers} providers")
                await trio.to_thread.run_sync(share_one_calibration, models,
                                              [root / f"provider-{i}" for i in range(n_providers)])
            for i in range(n_providers):
                home = root / f"provider-{i}"
                listen, wrap = place(f"provider-{i}")
                if fleet is not None:
                    args = fleet_provider_args(members[i], home, bootstrap_addr, models, host_resnet50, fleet,
                                               time_scale, listen, wire_delay=netns)
                else:
                    args = provider_args(i, home, bootstrap_addr, models, listen)
                args += [a for addr in addrs[1:] for a in ("--bootstrap", addr)]
                args += (extra_args or {}).get(i, [])
                children.append(await _start(nursery, f"provider-{i}", home, args, (extra_env or {}).get(i), wrap))
            for i, child in enumerate(children[n_bootstraps:], start=1):
                # On separate stacks, also until a dial-back said how the provider is
                # reached (behind NAT: its relayed address is in the bootstrap's book).
                wanted = {"ready", "announced"} | ({"reachability"} if netns else set())
                # They all start at once: on a few cores a hundred take minutes together.
                child.ready = (await _wait_events(child, wanted,
                                                  timeout_s + START_S_PER_PROVIDER * n_providers))["ready"]
                label = f" ({members[i - 1].device.name}, {members[i - 1].region.name})" if fleet is not None else ""
                say(f"provider {i}/{n_providers} ready{label}: {child.ready['peer_id']}")
            devnet = Devnet(root, bootstrap_addr, children, nursery, bootstrap_addrs=addrs,
                            spots=list(spots.values()))
            if netns:
                with entered(spots["buyer"].ns):
                    yield devnet
            else:
                yield devnet
        finally:
            with trio.CancelScope(shield=True):
                await _stop(children)
                if wire is not None:
                    await _stop_wire(wire)
                if spots:
                    remove_namespaces(all_namespaces(spots.values()))
            nursery.cancel_scope.cancel()


async def _open_namespaces(root: Path, boot_names: list[str], n_providers: int, members: list, nats: dict[int, str],
                           say, timeout_s: float, buyer_nat: str = "none", link=None, time_scale: float = 1.0):
    """Namespaces for the bootstraps, the providers and the buyer (this process), and the
    wire between them, running; raises RuntimeError with the reason if they cannot be."""
    from . import netns

    reason = netns.unavailable()
    if reason is None and (any(m.nat != "none" for m in members) or any(k != "none" for k in nats.values())
                           or buyer_nat != "none"):
        reason = netns.nat_unavailable()
    if reason:
        raise RuntimeError(f"no namespace devnet: {reason}")
    stale = netns.clean()
    if stale:
        say(f"removed {len(stale)} namespaces left by an earlier devnet that did not exit")
    names = [*boot_names, "buyer", *(f"provider-{i}" for i in range(n_providers))]
    kinds = ["none"] * len(boot_names) + [buyer_nat] + [nats.get(i, members[i].nat if members else "none")
                                                         for i in range(n_providers)]
    links = [link or netns.LinkShape()] * (len(boot_names) + 1) + [
        # A simulated device's link lasts as long as its other durations: time_scale times.
        link or (netns.LinkShape(m.link_ms * time_scale, m.jitter_ms * time_scale, m.loss, m.rate_mbit)
                 if m else netns.LinkShape())
        for m in (members or [None] * n_providers)]
    spots = netns.plan(names, kinds, links)
    try:
        await trio.to_thread.run_sync(netns.create, spots)
        plan_path = root / "wire.json"
        root.mkdir(parents=True, exist_ok=True)
        plan_path.write_text(json.dumps(netns.wire_plan(spots)))
        log = open(root / "wire.log", "ab")
        wire = await trio.lowlevel.open_process([sys.executable, "-m", "devnet.wire", str(plan_path)],
                                                stdout=subprocess.PIPE, stderr=log)
        with trio.fail_after(timeout_s):
            line = b""
            while b"\n" not in line:
                chunk = await wire.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"the wire process exited at start (see {root / 'wire.log'})")
                line += chunk
    except BaseException:
        netns.remove(netns.all_namespaces(spots))
        raise
    behind = [f"{s.name} ({s.nat})" for s in spots if s.nat != "none"]
    say(f"{len(spots)} network namespaces joined by the wire (delay, jitter, loss and rate in user space)"
        + (f"; behind NAT: {', '.join(behind)}" if behind else ""))
    return {spot.name: spot for spot in spots}, wire


async def _stop_wire(wire) -> None:
    if wire.returncode is None:
        wire.terminate()
    with trio.move_on_after(5):
        await wire.wait()
    if wire.returncode is None:
        wire.kill()
        await wire.wait()
