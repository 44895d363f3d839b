"""Requests per second and latency through `idlemesh gateway`, driven by tritonclient (an
Open Inference Protocol client that is not ours), at 1 and 16 requests in flight, next to
the warm Client's own figures on the same devnet. squeezenet (seeded weights), 2
providers, loopback. Prints JSON.

The gateway runs as its own process (`idlemesh gateway`), as an operator runs it; the
OIP client runs here, one thread per request in flight, each with its own connection.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devnet.launcher import open_devnet  # noqa: E402
from node.calibrate import reference_model_path  # noqa: E402
from node.client import Client  # noqa: E402

MODEL = reference_model_path("squeezenet")
WARMUP = 3


def figures(latencies_ms: list[float], wall_s: float) -> dict:
    pct = lambda q: round(float(np.percentile(latencies_ms, q)), 2)  # noqa: E731
    return {"requests": len(latencies_ms), "requests_per_s": round(len(latencies_ms) / wall_s, 1),
            "latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99)}}


async def warm_client(bootstrap: str, home: Path, x: np.ndarray, in_flight: int, per_lane: int) -> dict:
    latencies: list[float] = []
    async with Client(home, [bootstrap]) as client:
        model = client.add_model(MODEL)
        await client.refresh()
        for _ in range(WARMUP):
            await client.infer(model, {"data_0": x})

        async def lane() -> None:
            for _ in range(per_lane):
                started = time.perf_counter()
                await client.infer(model, {"data_0": x})
                latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(in_flight):
                nursery.start_soon(lane)
        wall_s = time.perf_counter() - started
    return figures(latencies, wall_s)


def through_gateway(url: str, x: np.ndarray, in_flight: int, per_lane: int) -> dict:
    import tritonclient.http as httpclient

    def request(client) -> None:
        tensor = httpclient.InferInput("data_0", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        client.infer("squeezenet", [tensor])

    warm = httpclient.InferenceServerClient(url=url)
    for _ in range(WARMUP):
        request(warm)
    warm.close()
    latencies: list[float] = []
    lock = threading.Lock()

    def lane() -> None:
        client = httpclient.InferenceServerClient(url=url)
        for _ in range(per_lane):
            started = time.perf_counter()
            request(client)
            with lock:
                latencies.append((time.perf_counter() - started) * 1000)
        client.close()

    threads = [threading.Thread(target=lane) for _ in range(in_flight)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return figures(latencies, time.perf_counter() - started)


def codec_ms(x: np.ndarray, rounds: int = 200) -> float:
    """What the gateway itself does per request besides HTTP I/O: parse the binary OIP
    request and encode the response (the end-to-end difference above is within the
    run-to-run noise of two processes on 2 cores, so this is measured alone)."""
    from node.oip import encode_infer_response, parse_infer_request

    blob = x.astype("<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "data_0", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    outputs = {"softmaxout_1": np.random.default_rng(1).random((1, 1000, 1, 1), dtype=np.float32)}
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        request = parse_infer_request(head + blob, len(head))
        encode_infer_response("squeezenet", request, outputs, {"idlemesh_receipt_id": "0" * 32})
        times.append((time.perf_counter() - started) * 1000)
    return round(float(np.percentile(times, 50)), 3)


async def main(requests: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="idlemesh-bench-gateway-"))
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    result: dict = {"bench": "gateway", "model": "squeezenet (seeded weights)", "providers": 2,
                    "client_library": "tritonclient.http 2.73.0", "warm_client": {}, "gateway": {}}
    async with open_devnet(2, root=root) as net:
        exe = Path(sys.executable).with_name("idlemesh")
        gateway = subprocess.Popen([str(exe), "gateway", "--listen", "127.0.0.1:0", "--model", f"squeezenet={MODEL}",
                                    "--bootstrap", net.bootstrap_addr, "--home", str(root / "gateway"), "--json"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            ready = json.loads(await trio.to_thread.run_sync(gateway.stdout.readline))
            url = ready["url"].removeprefix("http://")
            for in_flight in (1, 16):
                per_lane = max(1, requests // in_flight)
                result["warm_client"][str(in_flight)] = await warm_client(
                    net.bootstrap_addr, root / f"warm-{in_flight}", x, in_flight, per_lane)
                result["gateway"][str(in_flight)] = await trio.to_thread.run_sync(
                    through_gateway, url, x, in_flight, per_lane)
        finally:
            gateway.terminate()
            gateway.wait()
    one = {k: result[k]["1"]["latency_ms"]["p50"] for k in ("warm_client", "gateway")}
    result["p50_difference_ms_at_1_in_flight"] = round(one["gateway"] - one["warm_client"], 2)
    result["gateway_codec_ms_p50"] = codec_ms(x)
    result["note"] = ("latency = request sent to outputs back, receipt verified and countersigned; each request "
                      "is one job on the market. Both paths share 2 cores with 3 devnet processes.")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=64, help="per setting (split over the lanes in flight)")
    trio.run(main, ap.parse_args().requests)
