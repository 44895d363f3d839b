"""The README's demo: a devnet, a buyer submitting real squeezenet jobs, verified receipts."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from node.buyer import Buyer, SubmitSpec
from node.output import print_outcomes

from node.calibrate import reference_model_path

from .launcher import open_devnet

DEMO_NATS = ("none", "cone", "symmetric", "forwarded")


async def run_demo(n_providers: int, n_jobs: int, as_json: bool, netns: bool = False) -> int:
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    root = Path(tempfile.mkdtemp(prefix="idlemesh-demo-"))
    started = time.perf_counter()
    say(f"starting devnet: 1 bootstrap + {n_providers} providers under {root}")
    # On separate network stacks, providers sit at home behind each kind of NAT in turn.
    nats = {i: DEMO_NATS[i % len(DEMO_NATS)] for i in range(n_providers)} if netns else {}
    async with open_devnet(n_providers, root=root, progress=say, netns=netns, nats=nats) as net:
        say(f"devnet up in {time.perf_counter() - started:.1f} s; submitting {n_jobs} squeezenet jobs")
        for child in net.providers:
            reach = json.loads((child.home / "status.json").read_text()).get("reachability") or {}
            say(f"{child.name}{f' ({nats[int(child.name.split(chr(45))[1])]} NAT)' if netns else ''} reached: "
                f"{reach.get('how', 'unknown')}")
        x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
        spec = SubmitSpec(model_path=reference_model_path("squeezenet"), inputs={"data_0": x}, count=n_jobs,
                          bootstrap=[net.bootstrap_addr], home=root / "buyer", out_dir=root / "out")
        outcomes, summary = await Buyer(spec).run()
    print_outcomes(outcomes, summary, as_json)
    say(f"devnet stopped; outputs and ledgers under {root}")
    settled = [o for o in outcomes if o.state == "settled"]
    return 0 if len(settled) == len(outcomes) and len({o.provider for o in settled}) >= min(2, n_providers) else 1
