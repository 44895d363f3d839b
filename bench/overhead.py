"""Per-job overhead on loopback: submit to verified result, minus the model's own compute
time (from the receipt), for squeezenet on a real 2-provider devnet. Jobs go one at a
time so they do not compete for the 2 cores. Prints JSON."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devnet.launcher import open_devnet  # noqa: E402
from node.calibrate import reference_model_path  # noqa: E402
from node.buyer import Buyer, SubmitSpec  # noqa: E402


async def main(jobs: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="idlemesh-bench-"))
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    overhead, latency, compute = [], [], []
    async with open_devnet(2, root=root) as net:
        for i in range(jobs + 2):
            spec = SubmitSpec(model_path=reference_model_path("squeezenet"), inputs={"data_0": x}, count=1,
                              bootstrap=[net.bootstrap_addr], home=root / f"buyer-{i}", out_dir=root / "out")
            # A fresh buyer identity each time: py-libp2p refuses a quick reconnect under
            # the same peer id while the bootstrap still holds the old connection.
            (outcome,), _ = await Buyer(spec).run()
            if i < 2:
                continue  # warm-up: first jobs ship the model and build sessions
            assert outcome.state == "settled", outcome.error
            overhead.append(outcome.overhead_ms)
            latency.append(outcome.latency_ms)
            compute.append(outcome.compute_ms)
    pct = lambda a, q: round(float(np.percentile(a, q)), 2)  # noqa: E731
    print(json.dumps({"bench": "overhead", "model": "squeezenet (seeded weights)", "jobs": jobs,
                      "overhead_ms": {"p50": pct(overhead, 50), "p95": pct(overhead, 95)},
                      "latency_ms": {"p50": pct(latency, 50), "p95": pct(latency, 95)},
                      "compute_ms": {"p50": pct(compute, 50), "p95": pct(compute, 95)},
                      "note": "latency = job stream opened to receipt verified (offer sync excluded)"}, indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jobs", type=int, default=40)
    trio.run(main, ap.parse_args().jobs)
