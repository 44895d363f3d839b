"""Energy-aware micro-batching on the devnet fleet: concurrent squeezenet requests from
one warm client (as a gateway's are), with micro-batching on and off, against one real
devnet of the default fleet's simulated devices. Prints JSON.

Energy is what the receipts say: `simulated`, from each device's published figures
(devnet/fleets/default.toml: batch-1 and efficient-batch ResNet-50 rates, power), so it
shows what the matcher and the batcher choose, not what this machine spends. Outputs are
real onnxruntime runs and are checked against a local run. Latency is this machine's
wall time (the simulated devices hold their slots for their own time, scaled by
--time-scale, while this CPU computes the real outputs beside them)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devnet.fleet import DEFAULT_FLEET, load_fleet  # noqa: E402
from devnet.launcher import open_devnet  # noqa: E402
from node.calibrate import reference_model_path  # noqa: E402
from node.client import MICRO_BATCH_MS, Client  # noqa: E402


def percentiles(values: list[float]) -> dict:
    return {q: round(float(np.percentile(values, int(q[1:]))), 1) for q in ("p50", "p99")} if values else {}


async def one_setting(net, root: Path, name: str, micro_batch_ms: float, inputs: list[np.ndarray],
                      expected: list[np.ndarray], concurrent: int, deadline_ms: float) -> dict:
    latency, energy, shares, wrong = [], [], 0, 0
    async with Client(root / name, [net.bootstrap_addr], micro_batch_ms=micro_batch_ms) as client:
        model = client.add_model(reference_model_path("squeezenet"))
        await client.refresh()
        await client.infer(model, {"data_0": inputs[0]})  # warm: sessions, connections
        answers: list = [None] * len(inputs)

        async def one(i: int) -> None:
            started = time.perf_counter()
            answers[i] = await client.infer(model, {"data_0": inputs[i]}, deadline_ms=deadline_ms)
            latency.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        for wave in range(0, len(inputs), concurrent):
            async with trio.open_nursery() as nursery:
                for i in range(wave, min(wave + concurrent, len(inputs))):
                    nursery.start_soon(one, i)
        wall_s = time.perf_counter() - started
        await client.drain()
        for i, answer in enumerate(answers):
            energy.append(answer.outcome.energy_j)
            shares += answer.share is not None
            if answer.share_problems({"data_0": inputs[i]}) or not np.allclose(
                    answer.outputs["softmaxout_1"] if "softmaxout_1" in answer.outputs
                    else next(iter(answer.outputs.values())), expected[i], atol=1e-4):
                wrong += 1
        providers = sorted({a.outcome.provider[-8:] for a in answers})
        return {"micro_batch_ms": micro_batch_ms, "requests": len(inputs), "in_flight": concurrent,
                "jobs_sent": len({a.job_id for a in answers}), "batched_requests": shares,
                "energy_j_per_request": round(float(np.mean(energy)), 6),
                "energy_source": sorted({a.outcome.energy_source for a in answers}),
                "latency_ms": percentiles(latency), "requests_per_s": round(len(inputs) / wall_s, 1),
                "outputs_wrong_or_share_unverified": wrong, "providers": providers}


async def main(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="idlemesh-microbatch-"))
    rng = np.random.default_rng(0)
    inputs = [rng.random((1, 3, 224, 224), dtype=np.float32) for _ in range(args.requests)]
    session = ort.InferenceSession(str(reference_model_path("squeezenet")), providers=["CPUExecutionProvider"])
    expected = [session.run(None, {"data_0": x})[0] for x in inputs]
    fleet = load_fleet(DEFAULT_FLEET)
    async with open_devnet(args.providers, root=root, models=[reference_model_path("squeezenet")], fleet=fleet,
                           progress=lambda line: print(line, file=sys.stderr),
                           time_scale=args.time_scale) as net:
        off = await one_setting(net, root, "off", 0.0, inputs, expected, args.in_flight, args.deadline_ms)
        on = await one_setting(net, root, "on", args.micro_batch_ms, inputs, expected, args.in_flight,
                               args.deadline_ms)
    saving = 1 - on["energy_j_per_request"] / off["energy_j_per_request"]
    print(json.dumps({"bench": "microbatch", "model": "squeezenet (seeded weights)", "fleet": fleet.name,
                      "providers": args.providers, "time_scale": args.time_scale,
                      "deadline_ms": args.deadline_ms, "off": off, "on": on,
                      "energy_saving_per_request": round(saving, 3),
                      "note": "energy is simulated from the fleet's published figures; latency is this "
                              "machine's wall time"}, indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--providers", type=int, default=6)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--in-flight", type=int, default=16)
    ap.add_argument("--micro-batch-ms", type=float, default=MICRO_BATCH_MS)
    ap.add_argument("--deadline-ms", type=float, default=2000.0)
    ap.add_argument("--time-scale", type=float, default=1.0)
    trio.run(main, ap.parse_args())
