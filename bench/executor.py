"""Executor overhead per job against a bare onnxruntime call of the same model: prints JSON.

Both sides run one intra-op thread at the model's own batch size, on the same input.
The executor side is `Executor.run` from trio: admission (cached), input checks, the
hop to a worker thread, the timeout watchdog and output packing into wire tensors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.calibrate import reference_model_path  # noqa: E402
from node.executor import Executor, ModelStore  # noqa: E402
from protocol.tensors import Tensor  # noqa: E402


def bare_ms(path: Path, feeds: dict, runs: int) -> list[float]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feeds)
        out.append((time.perf_counter() - started) * 1000)
    return out


async def executor_ms(path: Path, feeds: dict, runs: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(Path(tmp))
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        store.put(sha, data)
        executor = Executor(store, slots=1)
        inputs = tuple(Tensor.from_array(name, array) for name, array in feeds.items())
        await executor.run(sha, inputs)  # admission (model check subprocess) and session load
        out = []
        for _ in range(runs):
            started = time.perf_counter()
            result = await executor.run(sha, inputs)
            result.outputs[0].to_array()
            out.append((time.perf_counter() - started) * 1000)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--models", default="squeezenet,resnet50")
    args = ap.parse_args()
    cases = []
    for name in args.models.split(","):
        path = reference_model_path(name)
        spec = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0]
        feeds = {spec.name: np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in spec.shape],
                                                            dtype=np.float32)}
        bare = bare_ms(path, feeds, args.runs)
        ours = trio.run(executor_ms, path, feeds, args.runs)
        b, o = statistics.median(bare), statistics.median(ours)
        cases.append({"model": name, "runs": args.runs, "bare_ms_p50": round(b, 3), "executor_ms_p50": round(o, 3),
                      "overhead_ms_p50": round(o - b, 3), "ratio_p50": round(o / b, 4),
                      "bare_ms_p95": round(sorted(bare)[int(0.95 * len(bare)) - 1], 3),
                      "executor_ms_p95": round(sorted(ours)[int(0.95 * len(ours)) - 1], 3)})
    print(json.dumps({"bench": "executor", "cases": cases}, indent=2))


if __name__ == "__main__":
    main()
