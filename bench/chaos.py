"""Seeded random chaos against settlement, with real processes: prints JSON.

Each schedule submits a small batch while faults fire: half the time one aimed at a
settlement window (node/faults.py), and one to three kill -9 or SIGSTOP (0.5-4 s) of the
buyer, a provider or the bootstrap at random moments. Then, as an operator would: every
node is restarted or continued, the batch resumed until it finishes, each provider
reconciled with `idlemesh settle`, and the invariants checked (devnet/invariants.py).

    python bench/chaos.py --schedules 30 --seed 1 > chaos.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devnet.chaos import PROVIDER_ARGS, Chaos, random_schedule  # noqa: E402
from devnet.launcher import open_devnet  # noqa: E402
from node.calibrate import reference_model_path  # noqa: E402
from node.models import seeded_model_path  # noqa: E402


async def main(schedules: int, seed: int, providers: int, jobs: int, root: Path) -> dict:
    rng = random.Random(seed)
    inputs = root / "x.npy"
    np.save(inputs, np.random.default_rng(seed).random((2, 3, 224, 224), dtype=np.float32))
    started = time.perf_counter()
    reports = []
    extra = {i: PROVIDER_ARGS for i in range(providers)}
    async with open_devnet(providers, root=root / "net", extra_args=extra) as net:
        async with trio.open_nursery() as nursery:
            chaos = Chaos(net, root, nursery, model=reference_model_path("squeezenet"),
                          upload_model=lambda name: seeded_model_path(
                              "squeezenet", seed=1000 + int(name.rsplit("-", 1)[1]), directory=root / name),
                          inputs=inputs,
                          jobs=jobs)
            for index in range(schedules):
                schedule = random_schedule(rng, index, providers)
                report = await chaos.run(schedule)
                reports.append(report)
                print(json.dumps({"schedule": index, "faults": len(schedule.timed) + bool(schedule.point),
                                  "jobs": report["jobs"], "violations": len(report["violations"])}),
                      file=sys.stderr, flush=True)
            nursery.cancel_scope.cancel()
    fired = [e for r in reports for e in r["fired"]]
    return {
        "bench": "chaos", "seed": seed, "schedules": schedules, "providers": providers, "jobs_per_batch": jobs,
        "wall_s": round(time.perf_counter() - started, 1),
        "faults_scheduled": sum(len(r["schedule"]["timed"]) + bool(r["schedule"]["point"]) for r in reports),
        "fault_points_fired": len(fired),  # processes that stopped or died at an aimed point
        "timed_faults_fired": sum(len(r["timed_fired"]) for r in reports),
        "jobs": {state: sum(r["jobs"].get(state, 0) for r in reports) for state in ("settled", "failed")},
        "resumes": sum(r["resumes"] for r in reports),
        "batches_unfinished": sum(1 for r in reports if r["final_exit"] != 0),
        "violations": [v for r in reports for v in r["violations"]],
        "reports": reports,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schedules", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--providers", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=4, help="jobs per batch")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="idlemesh-chaos-") as tmp:
        result = trio.run(main, args.schedules, args.seed, args.providers, args.jobs, Path(tmp))
    print(json.dumps(result, indent=2))
    sys.exit(1 if result["violations"] else 0)
