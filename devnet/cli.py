"""`idlemesh devnet up | run | demo`: added to the idlemesh CLI through the
`idlemesh.commands` entry point (pyproject.toml), so node/ never imports devnet/."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

import trio

from node.cli import exit_status, setup_logging_from_args


async def _serve_gateway(host: str, port: int, net) -> None:
    """An OIP gateway on the devnet's models, in this process, until Ctrl-C."""
    from node.calibrate import reference_model_path
    from node.client import Client
    from node.gateway import Gateway

    from .launcher import DEFAULT_MODELS

    client = Client(net.root / "gateway", [net.bootstrap_addr])
    models = {name: client.add_model(reference_model_path(name)) for name in DEFAULT_MODELS}
    async with client, trio.open_nursery() as nursery:
        bound = await nursery.start(Gateway(client, models).serve, host, port)
        print(f"gateway: Open Inference Protocol v2 at http://{bound[0]}:{bound[1]}/v2 for {', '.join(models)} "
              "(e.g. tritonclient.http.InferenceServerClient)", file=sys.stderr, flush=True)
        await trio.sleep_forever()


def choose_netns(args) -> bool:
    """Separate network stacks when this machine allows (root, iproute2, a TUN device);
    `--netns` insists, `--loopback` declines. A loopback devnet says why it is one."""
    from . import netns

    if getattr(args, "loopback", False):
        return False
    reason = netns.unavailable()
    if reason is None:
        return True
    if getattr(args, "netns", False):
        raise SystemExit(f"idlemesh: --netns: {reason}")
    print(f"loopback devnet ({reason}): every node shares 127.0.0.1, link delay is a sleep in the transport "
          "and nobody is behind NAT", file=sys.stderr, flush=True)
    return False


def _devnet_clean(args) -> int:
    from . import netns

    removed = netns.clean(everything=args.all)
    print(json.dumps({"removed": removed}) if args.json else
          f"removed {len(removed)} devnet network namespaces" + (f": {', '.join(removed)}" if removed else ""))
    return 0


def _devnet_up(args) -> int:
    from node.gateway import parse_listen

    from .launcher import open_devnet

    gateway = None
    if args.gateway:
        try:
            gateway = parse_listen(args.gateway)  # checked before any node starts
        except ValueError as exc:
            raise SystemExit(f"idlemesh: --gateway {exc}") from None

    fleet = None
    if args.fleet:
        from .fleet import FleetError, load_fleet
        try:
            fleet = load_fleet(Path(args.fleet))
        except FleetError as exc:
            raise SystemExit(f"idlemesh: bad fleet file: {exc}") from None

    setup_logging_from_args(args)
    use_netns = choose_netns(args)

    async def main() -> int:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            stopped_by = {}
            async with trio.open_nursery() as nursery:
                async def stop_on_signal() -> None:
                    async for signum in signals:
                        stopped_by["signal"] = signum
                        nursery.cancel_scope.cancel()  # open_devnet stops every child on the way out

                nursery.start_soon(stop_on_signal)
                async with open_devnet(args.n, root=Path(args.root) if args.root else None, fleet=fleet,
                                       progress=lambda t: print(t, file=sys.stderr, flush=True),
                                       netns=use_netns) as net:
                    buyer_ns = next((s.ns for s in net.spots if s.name == "buyer"), None)
                    print(json.dumps({"bootstrap": net.bootstrap_addr, "root": str(net.root),
                                      "providers": [c.ready["peer_id"] for c in net.providers],
                                      "buyer_netns": buyer_ns}), flush=True)
                    boot = net.bootstrap
                    listen = boot.args[boot.args.index("--listen") + 1]
                    within = f"ip netns exec {buyer_ns} " if buyer_ns else ""
                    print(f"devnet up: {within}idlemesh submit MODEL.onnx --input X.npy --bootstrap "
                          f"{net.bootstrap_addr}\nthe bootstrap (pid {boot.process.pid}) comes back with: "
                          f"{' '.join(boot.wrap) + ' ' if boot.wrap else ''}idlemesh bootstrap run "
                          f"--home {boot.home} --listen {listen}\nCtrl-C stops every node.", file=sys.stderr, flush=True)
                    if gateway:
                        await _serve_gateway(*gateway, net)
                    await trio.sleep_forever()
        return stopped_by["signal"]

    signum = trio.run(main)
    print("devnet stopped: every node was shut down", file=sys.stderr)
    return exit_status(signum)


def _load_trace(args):
    """The scenario and fleet a run or simulation uses, with the command line's overrides."""
    from node.calibrate import model_name

    from .fleet import DEFAULT_FLEET, FleetError, load_fleet, model_speed
    from .scenario import ScenarioError, load_scenario

    try:
        scenario = load_scenario(Path(args.scenario))
        if args.providers:
            scenario.providers = args.providers
        if args.solver:
            scenario.solvers = args.solver
        fleet = load_fleet(Path(args.fleet) if args.fleet else scenario.fleet or DEFAULT_FLEET)
        for path in scenario.models:
            model_speed(fleet, model_name(path))  # every model of the trace has a rate on this fleet
        scenario.check_sizes()
    except (ScenarioError, FleetError) as exc:
        raise SystemExit(f"idlemesh: {exc}") from None
    return scenario, fleet


def _print_report(report: dict, out: Path, mode: str) -> None:
    for name, s in report["solvers"].items():
        p50 = s["latency_ms_p50"]
        print(f"{name:14} lost {s['jobs_lost']}  late {s['deadline_misses']}  settled {s['settled']}/{s['jobs']}  "
              f"{s['energy_j_per_submitted_job']:.4f} J/submitted job  "
              f"p50 {p50 if isinstance(p50, str) else f'{p50 or 0:.0f} ms'}"
              + (f"  applied twice {s['receipts_applied_twice']}" if mode == "run" else ""))
    for name, c in report["ours_vs"].items():
        print(f"ours vs {name}: {c['energy']} (simulated); misses + losses {c['misses_and_losses_ours']} vs "
              f"{c['misses_and_losses_theirs']}")
    for name, c in report.get("run_vs_simulate", {}).items():
        e = c["energy_j_per_submitted_job"]
        print(f"{name}: run vs simulate: {e['run']:.4f} vs {e['simulate']:.4f} J/submitted job, "
              f"{100 * c['same_provider_share']:.0f}% of jobs on the same provider"
              + ("" if c["within_tolerance"] else "  (outside the tolerance)"))
    if "time_scale" in report:
        print(f"time scale: x{report['time_scale']:g}")
    print(f"report: {out / 'index.html'} and {out / 'report.json'}")


def _devnet_run(args) -> int:
    from .report import write_report
    from .run import run_scenario
    from .simulate import Simulation

    setup_logging_from_args(args)
    scenario, fleet = _load_trace(args)
    out = Path(args.out or f"devnet-report-{scenario.name}")
    say = (lambda line: print(line, file=sys.stderr, flush=True))
    use_netns = choose_netns(args)
    runs = trio.run(lambda: run_scenario(scenario, out / "runs", fleet=fleet, say=say, netns=use_netns))
    # The same trace in virtual time with this run's provider ids: how close the real
    # processes came to the model the solvers are judged on.
    simulated = [Simulation(scenario, fleet, run.solver, peer_ids=run.peer_ids).go() for run in runs]
    report = write_report(scenario, fleet, runs, out, mode="run", simulated=simulated)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report, out, "run")
    lost = sum(report["jobs_lost"].values()) + sum(report["receipts_applied_twice"].values())
    return 0 if lost == 0 else 1


def _devnet_simulate(args) -> int:
    from .report import write_report
    from .simulate import simulate

    scenario, fleet = _load_trace(args)
    out = Path(args.out or f"devnet-simulation-{scenario.name}")
    runs = simulate(scenario, fleet, say=lambda line: print(line, file=sys.stderr, flush=True))
    report = write_report(scenario, fleet, runs, out, mode="simulate")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report, out, "simulate")
    return 0


def _devnet_demo(args) -> int:
    from .demo import run_demo

    setup_logging_from_args(args)
    return trio.run(run_demo, args.n, args.jobs, args.json, choose_netns(args))


def add_commands(sub: argparse._SubParsersAction) -> None:
    dn = sub.add_parser("devnet", help="local multi-process network").add_subparsers(dest="action", required=True)
    up = dn.add_parser("up", help="start a bootstrap node and N providers")
    up.add_argument("-n", type=int, default=3)
    up.add_argument("--root", help="directory for node homes (default: a new temp dir)")
    up.add_argument("--fleet", help="fleet file (TOML) of simulated devices; e.g. devnet/fleets/default.toml")
    up.add_argument("--gateway", metavar="HOST:PORT", help="also serve the Open Inference Protocol v2 for the "
                    "devnet's models here (e.g. 127.0.0.1:8000)")
    up.set_defaults(func=_devnet_up)
    drun = dn.add_parser("run", help="replay a scenario trace with our matcher and each baseline; write a report")
    drun.add_argument("scenario", help="scenario file (TOML), e.g. devnet/scenarios/default.toml")
    drun.add_argument("--fleet", help="fleet file (overrides the scenario's)")
    drun.add_argument("--providers", type=int, help="number of providers (overrides the scenario's)")
    drun.add_argument("--solver", action="append", help="run only these solvers (repeatable)")
    drun.add_argument("--out", help="report directory (default devnet-report-<scenario>)")
    drun.add_argument("--json", action="store_true")
    sim = dn.add_parser("simulate", help="replay a scenario in virtual time (deterministic, seconds): where the "
                                         "solvers' energy is compared")
    sim.add_argument("scenario", help="scenario file (TOML), e.g. devnet/scenarios/default.toml")
    sim.add_argument("--fleet", help="fleet file (overrides the scenario's)")
    sim.add_argument("--providers", type=int, help="number of providers (overrides the scenario's)")
    sim.add_argument("--solver", action="append", help="simulate only these solvers (repeatable)")
    sim.add_argument("--out", help="report directory (default devnet-simulation-<scenario>)")
    sim.add_argument("--json", action="store_true", help="print report.json")
    sim.set_defaults(func=_devnet_simulate)
    drun.set_defaults(func=_devnet_run)
    demo = dn.add_parser("demo", help="start a devnet, submit jobs, print receipts, stop")
    demo.add_argument("-n", type=int, default=3)
    demo.add_argument("--jobs", type=int, default=12)
    demo.add_argument("--json", action="store_true")
    for command in (up, drun, demo):
        where = command.add_mutually_exclusive_group()
        where.add_argument("--netns", action="store_true",
                           help="each node in its own network namespace, links shaped in user space, NAT from the "
                                "fleet file (the default when run as root with iproute2 and /dev/net/tun)")
        where.add_argument("--loopback", action="store_true", help="every node on 127.0.0.1 (the default otherwise)")
    clean = dn.add_parser("clean", help="remove network namespaces left by devnets whose launcher is gone")
    clean.add_argument("--all", action="store_true", help="also those of devnets still running")
    clean.add_argument("--json", action="store_true")
    clean.set_defaults(func=_devnet_clean)
    demo.set_defaults(func=_devnet_demo)
