"""Per-job overhead on loopback, cold and warm side by side, for squeezenet (seeded
weights) on one real 2-provider devnet. Prints JSON.

- cold: what `idlemesh submit` does per job: a fresh node that syncs offers, places,
  runs one job and exits (a Buyer per job; the interpreter's own start is not counted,
  `cli_wall_ms` adds one real `idlemesh submit` process for scale).
- warm: one `idlemesh.Client` opened once; `infer` per job, one at a time.

Overhead = round trip minus the model's compute time from the receipt. Jobs go one at
a time so they do not compete for the 2 cores; warm-up jobs (model upload, session
build) are not counted."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devnet.launcher import open_devnet  # noqa: E402
from node.buyer import Buyer, SubmitSpec  # noqa: E402
from node.calibrate import reference_model_path  # noqa: E402
from node.client import Client  # noqa: E402

WARMUP_JOBS = 2


def percentiles(values: list[float]) -> dict:
    return {q: round(float(np.percentile(values, int(q[1:]))), 2) for q in ("p50", "p95", "p99")} if values else {}


async def cold(net, root: Path, x: np.ndarray, jobs: int) -> dict:
    overhead, latency, compute, wall = [], [], [], []
    for i in range(jobs + WARMUP_JOBS):
        spec = SubmitSpec(model_path=reference_model_path("squeezenet"), inputs={"data_0": x}, count=1,
                          bootstrap=[net.bootstrap_addr], home=root / f"cold-{i}", out_dir=root / "out")
        # A fresh buyer identity each time: py-libp2p refuses a quick reconnect under
        # the same peer id while the bootstrap still holds the old connection.
        started = time.perf_counter()
        (outcome,), _ = await Buyer(spec).run()
        if i < WARMUP_JOBS:
            continue
        assert outcome.state == "settled", outcome.error
        wall.append((time.perf_counter() - started) * 1000)
        overhead.append(outcome.overhead_ms)
        latency.append(outcome.latency_ms)
        compute.append(outcome.compute_ms)
    return {"jobs": jobs, "overhead_ms": percentiles(overhead), "job_latency_ms": percentiles(latency),
            "compute_ms": percentiles(compute), "submit_wall_ms": percentiles(wall),
            "note": "job_latency = job stream opened to receipt verified; submit_wall adds node start, "
                    "offer sync, placement and close"}


async def warm(net, root: Path, x: np.ndarray, jobs: int) -> dict:
    overhead, latency, compute = [], [], []
    async with Client(root / "warm", [net.bootstrap_addr]) as client:
        model = client.add_model(reference_model_path("squeezenet"))
        await client.refresh()
        for i in range(jobs + WARMUP_JOBS):
            started = time.perf_counter()
            answer = await client.infer(model, {"data_0": x})
            round_trip_ms = (time.perf_counter() - started) * 1000
            if i < WARMUP_JOBS:
                continue
            latency.append(round_trip_ms)
            compute.append(answer.receipt.compute_ms)
            overhead.append(round_trip_ms - answer.receipt.compute_ms)
    return {"jobs": jobs, "overhead_ms": percentiles(overhead), "round_trip_ms": percentiles(latency),
            "compute_ms": percentiles(compute),
            "note": "round_trip = infer() called to outputs returned with the receipt verified, paid "
                    "and countersigned (the provider's confirmation of the ack follows in the background)"}


def cli_wall_ms(bootstrap: str, root: Path, x_path: Path) -> float:
    """One real `idlemesh submit` process, start to exit."""
    exe = Path(sys.executable).with_name("idlemesh")
    started = time.perf_counter()
    subprocess.run([str(exe), "submit", str(reference_model_path("squeezenet")), "--input", f"data_0={x_path}",
                    "--bootstrap", bootstrap, "--home", str(root / "cli"), "--out", str(root / "cli-out"), "--json"],
                   check=True, capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return round((time.perf_counter() - started) * 1000, 1)


async def main(jobs: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="idlemesh-bench-"))
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    x_path = root / "x.npy"
    np.save(x_path, x)
    async with open_devnet(2, root=root) as net:
        result = {"bench": "overhead", "model": "squeezenet (seeded weights)", "providers": 2,
                  "warm": await warm(net, root, x, jobs), "cold": await cold(net, root, x, jobs),
                  "cli_wall_ms": await trio.to_thread.run_sync(cli_wall_ms, net.bootstrap_addr, root, x_path)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jobs", type=int, default=40)
    trio.run(main, ap.parse_args().jobs)
