"""`idlemesh` command line: provider, bootstrap, submit, match, devnet."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import trio

DEFAULT_HOME = Path.home() / ".idlemesh"


def _provider_run(args) -> int:
    from .gossip import setup_logging
    from .provider import Provider, ProviderConfig

    setup_logging(args.verbose)
    config = ProviderConfig(
        home=Path(args.home), listen=[args.listen], bootstrap=args.bootstrap or [], slots=args.slots,
        idle_w=args.idle_w, busy_w=args.busy_w, marginal_w_per_slot=args.marginal_w,
        carbon_g_per_kwh=args.carbon, price_per_s=args.price_per_s,
        reference_models=[Path(m) for m in args.model or []], speed_factor=args.speed_factor,
        memory_mb=args.memory_mb)
    if args.device_name:
        config.device_name = args.device_name
    trio.run(Provider(config).run)
    return 0


def _bootstrap_run(args) -> int:
    from .bootstrap import run_bootstrap
    from .gossip import setup_logging

    setup_logging(args.verbose)
    trio.run(run_bootstrap, Path(args.home), [args.listen])
    return 0


def _parse_inputs(values: list[str]) -> dict[str, np.ndarray]:
    inputs = {}
    for value in values:
        name, _, path = value.rpartition("=")
        inputs[name] = np.load(path, allow_pickle=False)
    return inputs


def _print_outcomes(outcomes, summary, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"jobs": [o.to_json() for o in outcomes], **summary}, indent=2))
        return
    print(f"{'job':10} {'provider':14} {'state':9} {'latency_ms':>10} {'compute_ms':>10} "
          f"{'energy_j':>9} {'source':9} {'price':>9}")
    for o in outcomes:
        print(f"{o.job_id[:8]:10} ...{o.provider[-10:]:11} {o.state:9} {o.latency_ms:10.1f} {o.compute_ms:10.2f} "
              f"{o.energy_j:9.4f} {o.energy_source:9} {o.price:9.2e}")
        if o.error:
            print(f"    error: {o.error}")
    settled = [o for o in outcomes if o.state == "settled"]
    providers = {o.provider for o in settled}
    print(f"\n{len(settled)}/{len(outcomes)} jobs settled with verified receipts from {len(providers)} providers"
          f"; energy {sum(o.energy_j for o in settled):.3f} J (declared/simulated profiles, not metered)")


def _submit(args) -> int:
    from .buyer import Buyer, SubmitError, SubmitSpec
    from .gossip import setup_logging

    setup_logging(args.verbose)
    model = Path(args.model)
    if not model.exists():
        print(f"error: model file {model} not found", file=sys.stderr)
        return 2
    try:
        inputs = _parse_inputs(args.input)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read input: {exc}", file=sys.stderr)
        return 2
    spec = SubmitSpec(model_path=model, inputs=inputs, count=args.count, bootstrap=args.bootstrap,
                      home=Path(args.home), out_dir=Path(args.out), max_price=args.max_price, solver=args.solver)
    try:
        buyer = Buyer(spec)
        outcomes, summary = trio.run(buyer.run)
    except SubmitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print_outcomes(outcomes, summary, args.json)
    return 0 if all(o.state == "settled" for o in outcomes) else 1


def _match(args) -> int:
    from matcher import ProblemError, problem_from_json, solve

    try:
        problem = problem_from_json(json.loads(Path(args.problem).read_text()))
    except (OSError, ValueError) as exc:
        print(f"error: {args.problem}: {exc}", file=sys.stderr)
        return 2
    result = solve(problem, solver=args.solver, time_limit_s=args.time_limit, seed=args.seed,
                   clock=time.perf_counter)
    out = result.to_json()
    if not args.explain:
        out["unassigned"] = [{"job": u["job"], "reason": u["reason"]} for u in out["unassigned"]]
    print(json.dumps(out, indent=2))
    if args.explain:
        for u in result.unassigned:
            print(u.explain, file=sys.stderr)
    return 0


def _devnet_up(args) -> int:
    from devnet.launcher import open_devnet

    async def main():
        async with open_devnet(args.n, root=Path(args.root) if args.root else None,
                               progress=lambda t: print(t, file=sys.stderr, flush=True)) as net:
            print(json.dumps({"bootstrap": net.bootstrap_addr, "root": str(net.root),
                              "providers": [c.ready["peer_id"] for c in net.providers]}), flush=True)
            print(f"devnet up: idlemesh submit MODEL.onnx --input X.npy --bootstrap {net.bootstrap_addr}"
                  f"\nCtrl-C stops every node.", file=sys.stderr, flush=True)
            await trio.sleep_forever()

    try:
        trio.run(main)
    except KeyboardInterrupt:
        print("devnet stopped", file=sys.stderr)
    return 0


def _devnet_demo(args) -> int:
    from devnet.demo import run_demo

    return trio.run(run_demo, args.n, args.jobs, args.json)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="idlemesh", description="An open marketplace for idle AI compute.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    prov = sub.add_parser("provider", help="run a provider daemon").add_subparsers(dest="action", required=True)
    run = prov.add_parser("run", help="advertise capacity and serve jobs")
    run.add_argument("--home", default=str(DEFAULT_HOME / "provider"))
    run.add_argument("--listen", default="/ip4/0.0.0.0/tcp/4001")
    run.add_argument("--bootstrap", action="append", help="bootstrap multiaddr with /p2p/ id (repeatable)")
    run.add_argument("--slots", type=int, default=1)
    run.add_argument("--device-name")
    run.add_argument("--memory-mb", type=int, default=4096)
    run.add_argument("--idle-w", type=float, default=10.0, help="declared idle power, W")
    run.add_argument("--busy-w", type=float, default=40.0, help="declared busy power, W")
    run.add_argument("--marginal-w", type=float, default=30.0, help="declared marginal power per busy slot, W")
    run.add_argument("--carbon", type=float, default=300.0, help="grid carbon intensity, g CO2/kWh")
    run.add_argument("--price-per-s", type=float, default=0.0001, help="price per busy second")
    run.add_argument("--model", action="append", help="ONNX model to offer (repeatable); throughput is measured")
    run.add_argument("--speed-factor", type=float, default=1.0, help="simulate a device this many times faster")
    run.set_defaults(func=_provider_run)

    boot = sub.add_parser("bootstrap", help="run a bootstrap node").add_subparsers(dest="action", required=True)
    brun = boot.add_parser("run")
    brun.add_argument("--home", default=str(DEFAULT_HOME / "bootstrap"))
    brun.add_argument("--listen", default="/ip4/0.0.0.0/tcp/4000")
    brun.set_defaults(func=_bootstrap_run)

    sm = sub.add_parser("submit", help="submit ONNX inference jobs")
    sm.add_argument("model")
    sm.add_argument("--input", action="append", required=True, help="X.npy, or NAME=X.npy for a named input")
    sm.add_argument("--count", type=int, default=1, help="number of jobs")
    sm.add_argument("--bootstrap", action="append", required=True)
    sm.add_argument("--home", default=str(DEFAULT_HOME / "buyer"))
    sm.add_argument("--out", default="idlemesh-out")
    sm.add_argument("--max-price", type=float, default=1.0, help="price ceiling per job")
    sm.add_argument("--solver", default="optimal")
    sm.add_argument("--json", action="store_true")
    sm.set_defaults(func=_submit)

    mt = sub.add_parser("match", help="solve a placement problem file and print JSON")
    mt.add_argument("problem")
    mt.add_argument("--solver", default="optimal", choices=["optimal", "greedy-price", "greedy-energy", "round-robin"])
    mt.add_argument("--time-limit", type=float, default=2.0)
    mt.add_argument("--seed", type=int, default=0)
    mt.add_argument("--explain", action="store_true")
    mt.set_defaults(func=_match)

    dn = sub.add_parser("devnet", help="local multi-process network").add_subparsers(dest="action", required=True)
    up = dn.add_parser("up", help="start a bootstrap node and N providers")
    up.add_argument("-n", type=int, default=3)
    up.add_argument("--root", help="directory for node homes (default: a new temp dir)")
    up.set_defaults(func=_devnet_up)
    demo = dn.add_parser("demo", help="start a devnet, submit jobs, print receipts, stop")
    demo.add_argument("-n", type=int, default=3)
    demo.add_argument("--jobs", type=int, default=12)
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(func=_devnet_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
