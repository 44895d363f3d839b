"""Soak: a devnet of real processes kept up for many offer lifetimes, a fresh buyer
every minute, and (optionally) a kill -9 and restart of the bootstrap. Prints JSON.

    python bench/soak.py                      # 10 providers, 10 minutes, default lifetime (60 s)
    python bench/soak.py --providers 12 --minutes 15 --restart-bootstrap-at 5
    python bench/soak.py --providers 100 --fleet devnet/fleets/default.toml   # issue 22's 100 nodes

Figures:
- jobs settled per minute, and the offers a fresh buyer sees in one sync each minute;
- offer delivery latency by gossip: arrival time at each node minus the offer's
  issued_at (one machine, one clock), p50/p99 over every (receiver, provider) pair;
- per node: RSS at start and end, and CPU share while no buyer was running ("idle")
  and over the whole run;
- after a bootstrap restart: seconds until each provider is connected again
  ("announced" its offer to the new bootstrap) and until the bootstrap holds every
  offer again.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devnet.launcher import open_devnet  # noqa: E402
from node.buyer import Buyer, SubmitSpec  # noqa: E402
from node.calibrate import reference_model_path  # noqa: E402
from node.logs import setup_logging  # noqa: E402


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


class NodeMeter:
    """CPU and RSS of one node process, with CPU split into idle and busy intervals."""

    def __init__(self, name: str, pid: int):
        self.name = name
        self.process = psutil.Process(pid)
        self.started_at = time.monotonic()
        self.cpu_start = self._cpu()
        self.rss_start_mb = self.process.memory_info().rss / 1e6
        self.idle_cpu_s = 0.0
        self.idle_wall_s = 0.0
        self.rss_warm_mb: float | None = None  # after the first buyer: models loaded once
        self._mark = (self.started_at, self.cpu_start)

    def rss_mb(self) -> float:
        return self.process.memory_info().rss / 1e6

    def _cpu(self) -> float:
        t = self.process.cpu_times()
        return t.user + t.system

    def idle_until_now(self) -> None:
        """The interval since the last mark had no buyer: count it as idle."""
        now, cpu = time.monotonic(), self._cpu()
        self.idle_wall_s += now - self._mark[0]
        self.idle_cpu_s += cpu - self._mark[1]
        self._mark = (now, cpu)

    def skip_until_now(self) -> None:
        self._mark = (time.monotonic(), self._cpu())

    def report(self) -> dict:
        wall = time.monotonic() - self.started_at
        return {
            "node": self.name,
            "rss_mb_start": round(self.rss_start_mb, 1),
            "rss_mb_end": round(self.process.memory_info().rss / 1e6, 1),
            "rss_growth_mb": round(self.process.memory_info().rss / 1e6 - self.rss_start_mb, 1),
            "rss_mb_after_first_buyer": round(self.rss_warm_mb, 1) if self.rss_warm_mb else None,
            "rss_growth_after_first_buyer_mb": round(self.rss_mb() - self.rss_warm_mb, 1) if self.rss_warm_mb else None,
            "cpu_share_idle": round(self.idle_cpu_s / self.idle_wall_s, 4) if self.idle_wall_s else None,
            "cpu_share_total": round((self._cpu() - self.cpu_start) / wall, 4),
            "seconds": round(wall, 1),
        }


async def soak(n_providers: int, minutes: float, jobs: int, restart_at_min: float | None, say,
               fleet_path: str | None = None, netns: bool = False) -> dict:
    root = Path(tempfile.mkdtemp(prefix="idlemesh-soak-"))
    model = reference_model_path("squeezenet")
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    delivery: dict[tuple[str, str], list[float]] = {}   # offers issued once every node was up
    delivery_startup: list[float] = []                   # offers issued while nodes were starting
    up_at_ms = {"ms": float("inf")}
    published = {"n": 0}
    restart: dict = {}
    buyers: list[dict] = []
    meters: dict[str, NodeMeter] = {}
    redials: list[dict] = []

    async def collect(child) -> None:
        async for event in child.events:
            kind = event.get("event")
            if kind == "offer-heard" and event.get("via") == "gossip":
                if event["issued_at_ms"] >= up_at_ms["ms"]:
                    delivery.setdefault((child.name, event["provider"]), []).append(event["latency_ms"])
                else:
                    delivery_startup.append(event["latency_ms"])
            elif kind == "redial":
                redials.append(event)
            elif kind == "offer-published":
                published["n"] += 1
            elif kind == "announced" and "restarted_at" in restart:
                restart["back_s"].setdefault(child.name, round(time.monotonic() - restart["restarted_at"], 2))
            elif kind == "offer" and child.name == "bootstrap" and "restarted_at" in restart:
                restart["offers_back"] += 1
                if restart["offers_back"] == n_providers:
                    restart["all_offers_held_s"] = round(time.monotonic() - restart["restarted_at"], 2)

    fleet = None
    if fleet_path:  # simulated devices: a profile each, no calibration per provider at start
        from devnet.fleet import load_fleet
        fleet = load_fleet(Path(fleet_path))
    say(f"starting {n_providers} providers under {root}")
    up_from = time.monotonic()
    async with open_devnet(n_providers, root=root, progress=say, timeout_s=max(300, 6 * n_providers),
                           fleet=fleet, netns=netns) as net:
        up_s = round(time.monotonic() - up_from, 1)
        up_at_ms["ms"] = time.time() * 1000
        say(f"all {n_providers} providers up in {up_s} s")
        async with trio.open_nursery() as nursery:
            for child in net.children:
                meters[child.name] = NodeMeter(child.name, child.process.pid)
                nursery.start_soon(collect, child)
            started = trio.current_time()  # trio's clock: sleep_until reads it
            for minute in range(1, int(minutes) + 1):
                await trio.sleep_until(started + 60 * minute - 20)  # a buyer 40 s into each minute
                if restart_at_min is not None and minute == int(restart_at_min) and not restart:
                    say(f"minute {minute}: kill -9 of the bootstrap, then a restart on the same port")
                    boot = net.bootstrap
                    boot.process.send_signal(signal.SIGKILL)
                    await boot.process.wait()
                    killed = time.monotonic()
                    boot = await net.restart(boot)
                    restart.update(restarted_at=time.monotonic(), down_s=round(time.monotonic() - killed, 2),
                                   back_s={}, offers_back=0)
                    meters["bootstrap"] = NodeMeter("bootstrap", boot.process.pid)
                    nursery.start_soon(collect, boot)
                for meter in meters.values():
                    meter.idle_until_now()
                t0 = time.monotonic()
                spec = SubmitSpec(model_path=model, inputs={"data_0": x}, count=jobs, bootstrap=[net.bootstrap_addr],
                                  home=root / f"buyer-{minute}", out_dir=root / f"out-{minute}")
                try:
                    outcomes, summary = await Buyer(spec).run()
                    row = {"minute": minute, "offers_visible": summary["offers"], "jobs": jobs,
                           "settled": sum(o.state == "settled" for o in outcomes),
                           "providers_used": len({o.provider for o in outcomes if o.state == "settled"})}
                except Exception as exc:  # noqa: BLE001 - a failed minute is a figure, not a crash
                    row = {"minute": minute, "offers_visible": 0, "jobs": jobs, "settled": 0, "error": str(exc)}
                row["buyer_wall_s"] = round(time.monotonic() - t0, 2)
                buyers.append(row)
                say(json.dumps(row))
                for meter in meters.values():
                    meter.skip_until_now()
                    if meter.rss_warm_mb is None:
                        meter.rss_warm_mb = meter.rss_mb()
            await trio.sleep_until(started + 60 * minutes)
            for meter in meters.values():
                meter.idle_until_now()
            nodes = [m.report() for m in meters.values()]
            nursery.cancel_scope.cancel()
    samples = [v for values in delivery.values() for v in values]
    per_pair_p99 = [float(np.percentile(v, 99)) for v in delivery.values() if v]
    def spread(values: list[float]) -> dict:
        return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": percentile(values, 100)}

    providers = [n for n in nodes if n["node"].startswith("provider")]
    return {
        "bench": "soak", "providers": n_providers, "minutes": minutes, "offer_ttl_s": 60,
        "fleet": fleet_path, "netns": netns, "up_s": up_s,
        "provider_idle_cpu_pct_of_core": spread([100 * (n["cpu_share_idle"] or 0) for n in providers]),
        "bootstrap_idle_cpu_pct_of_core": [round(100 * (n["cpu_share_idle"] or 0), 3) for n in nodes
                                           if n["node"].startswith("bootstrap")],
        "provider_rss_mb_end": spread([n["rss_mb_end"] for n in providers]),
        "jobs_settled_per_minute": [b["settled"] for b in buyers],
        "offers_visible_per_minute": [b["offers_visible"] for b in buyers],
        "buyers": buyers,
        "offer_delivery_ms": {"p50": percentile(samples, 50), "p99": percentile(samples, 99),
                              "max": percentile(samples, 100), "samples": len(samples), "pairs": len(delivery),
                              "worst_pair_p99": round(max(per_pair_p99), 1) if per_pair_p99 else None,
                              "how": "arrival wall clock minus the offer's issued_at, same machine"},
        "offer_delivery_ms_while_starting": {"p50": percentile(delivery_startup, 50),
                                             "p99": percentile(delivery_startup, 99),
                                             "samples": len(delivery_startup)},
        "providers_heard_by_gossip": len({provider for _, provider in delivery}),
        "redials_for_a_lost_subscription": len(redials),
        "offers_published": published["n"],
        "bootstrap_restart": ({k: v for k, v in restart.items() if k not in ("restarted_at", "offers_back")}
                              | {"providers_back": len(restart.get("back_s", {})),
                                 "max_back_s": max(restart["back_s"].values(), default=None)}) if restart else None,
        "nodes": nodes,
        "rss_growth_mb_max": max(n["rss_growth_mb"] for n in nodes),
        "rss_growth_after_first_buyer_mb_max": max((n["rss_growth_after_first_buyer_mb"] or 0) for n in nodes),
        "cpu_share_idle_max": max((n["cpu_share_idle"] or 0) for n in nodes),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--providers", type=int, default=10)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--jobs", type=int, default=4, help="jobs per fresh buyer")
    ap.add_argument("--restart-bootstrap-at", type=float, default=None, metavar="MINUTE")
    ap.add_argument("--fleet", default=None, help="a fleet file: its simulated devices as the providers")
    ap.add_argument("--netns", action="store_true", help="each node in its own network namespace, NAT and links "
                    "from the fleet (root; see devnet/netns.py)")
    args = ap.parse_args()
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    setup_logging(level=logging.WARNING)  # the in-process buyers' library noise stays out of the figures
    print(json.dumps(trio.run(soak, args.providers, args.minutes, args.jobs, args.restart_bootstrap_at, say,
                              args.fleet, args.netns), indent=2))


if __name__ == "__main__":
    main()
