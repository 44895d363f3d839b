"""Jobs across real links and NAT, on the namespace devnet (devnet/netns.py; root only).
Prints JSON.

For each one-way delay per link (every link: buyer, bootstrap/relay and provider), and
each path to a provider, one fresh devnet with one provider and a warm `idlemesh.Client`
in the buyer's namespace, running squeezenet (seeded weights) one job at a time:

- direct: a public provider;
- relayed: a provider behind a cone NAT, hole punching off on both ends
  (IDLEMESH_HOLE_PUNCH=0), so every byte goes through the bootstrap's relay;
- hole-punched: the same provider with hole punching on; jobs are measured once the
  provider reports the direct connection (`time_to_direct_ms` is from the first job).

Per path: the first job's round trip (it pays the dial), warm round trip and overhead
(round trip minus the model's compute from the receipt), and for the relayed path the
relay's CPU time per job (the bootstrap process, from /proc).

Then which NAT pairs hole punching crossed: a buyer public or behind each NAT kind,
against a provider behind each kind, at 20 ms per link; "direct" means the provider
reported a direct connection within --punch-wait-s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devnet import netns  # noqa: E402
from devnet.launcher import open_devnet  # noqa: E402
from node.calibrate import reference_model_path  # noqa: E402
from node.client import Client  # noqa: E402
from node.p2p.host import HOLE_PUNCH_ENV, quiet_libp2p_logs  # noqa: E402

MODEL = reference_model_path("squeezenet")


def percentiles(values: list[float]) -> dict:
    return {q: round(float(np.percentile(values, int(q[1:]))), 1) for q in ("p50", "p95")} if values else {}


def _cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def _wait_direct(provider, timeout_s: float) -> bool:
    with trio.move_on_after(timeout_s):
        async for event in provider.events:
            if event.get("event") == "hole-punched":
                return True
    return False


async def path(kind: str, delay_ms: float, jobs: int, root: Path, punch_wait_s: float) -> dict:
    nat = "none" if kind == "direct" else "cone"
    punch = kind == "hole-punched"
    env = {0: {HOLE_PUNCH_ENV: "1" if punch else "0"}}
    os.environ[HOLE_PUNCH_ENV] = "1" if punch else "0"  # the buyer: this process
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    shape = netns.LinkShape(delay_ms=delay_ms)
    async with open_devnet(1, root=root, netns=True, nats={0: nat}, extra_env=env, link=shape) as net:
        provider = net.providers[0]
        relay_pid = net.bootstrap.process.pid
        async with Client(root / "buyer", [net.bootstrap_addr]) as client:
            model = client.add_model(MODEL)
            await client.refresh()
            started = time.perf_counter()
            await client.infer(model, {"data_0": x})
            first_ms = (time.perf_counter() - started) * 1000
            result = {"path": kind, "delay_ms_per_link": delay_ms, "first_job_round_trip_ms": round(first_ms, 1)}
            if punch:
                direct = await _wait_direct(provider, punch_wait_s)
                result["time_to_direct_ms"] = round((time.perf_counter() - started) * 1000, 1) if direct else None
                if not direct:
                    result["note"] = f"no direct connection within {punch_wait_s} s: measured relayed"
            await client.infer(model, {"data_0": x})  # the job after the upgrade opens its stream direct
            cpu_before = _cpu_s(relay_pid)
            round_trips, overheads = [], []
            for _ in range(jobs):
                started = time.perf_counter()
                answer = await client.infer(model, {"data_0": x})
                round_trip = (time.perf_counter() - started) * 1000
                round_trips.append(round_trip)
                overheads.append(round_trip - answer.receipt.compute_ms)
            relay_cpu_s = _cpu_s(relay_pid) - cpu_before
            result.update(jobs=jobs, round_trip_ms=percentiles(round_trips), overhead_ms=percentiles(overheads),
                          relay_cpu_ms_per_job=round(relay_cpu_s * 1000 / jobs, 2),
                          relayed_dials=client.p2p.counters.get("relayed-dials", 0))
    os.environ.pop(HOLE_PUNCH_ENV, None)
    return result


async def crossing(buyer_nat: str, provider_nat: str, root: Path, punch_wait_s: float) -> dict:
    x = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)
    async with open_devnet(1, root=root, netns=True, nats={0: provider_nat}, buyer_nat=buyer_nat,
                           link=netns.LinkShape(delay_ms=20.0)) as net:
        async with Client(root / "buyer", [net.bootstrap_addr]) as client:
            model = client.add_model(MODEL)
            await client.refresh()
            started = time.perf_counter()
            answer = await client.infer(model, {"data_0": x})
            settled = answer.receipt is not None
            direct = await _wait_direct(net.providers[0], punch_wait_s)
            return {"buyer": buyer_nat, "provider": provider_nat, "job_settled": settled,
                    "direct": direct,
                    "time_to_direct_ms": round((time.perf_counter() - started) * 1000, 1) if direct else None}


async def main(args) -> None:
    reason = netns.unavailable() or netns.nat_unavailable()
    if reason:
        raise SystemExit(f"bench/links.py needs the namespace devnet: {reason}")
    quiet_libp2p_logs()  # hole punching's failed dials are expected, and logged at ERROR
    root = Path(tempfile.mkdtemp(prefix="idlemesh-links-"))
    paths = []
    for delay in args.delays:
        for kind in ("direct", "relayed", "hole-punched"):
            print(f"{kind} at {delay:g} ms per link", file=sys.stderr, flush=True)
            paths.append(await path(kind, delay, args.jobs, root / f"{kind}-{delay:g}", args.punch_wait_s))
    crossings = []
    if not args.skip_crossings:
        for buyer_nat in ("none", "cone", "symmetric"):
            for provider_nat in ("cone", "symmetric"):
                print(f"hole punching: buyer {buyer_nat}, provider {provider_nat}", file=sys.stderr, flush=True)
                crossings.append(await crossing(buyer_nat, provider_nat, root / f"x-{buyer_nat}-{provider_nat}",
                                                args.punch_wait_s))
    print(json.dumps({"bench": "links", "model": "squeezenet (seeded weights)", "paths": paths,
                      "hole_punching": crossings,
                      "note": "delay is added by devnet/wire.py on every link, one way: a buyer-provider round "
                              "trip crosses 4 delayed links direct, 8 relayed"}, indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delays", type=float, nargs="+", default=[0.0, 20.0, 80.0], help="one-way ms per link")
    ap.add_argument("--jobs", type=int, default=15)
    ap.add_argument("--punch-wait-s", type=float, default=30.0)
    ap.add_argument("--skip-crossings", action="store_true")
    trio.run(main, ap.parse_args())
