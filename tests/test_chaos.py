"""Chaos against settlement with real processes (devnet/chaos.py): a fault aimed at each
window where two ledgers could part, then resume, restart, reconcile with `idlemesh
settle`, and check the invariants (devnet/invariants.py). A longer seeded random run is
bench/chaos.py."""

from __future__ import annotations

import numpy as np
import trio

from devnet.chaos import AIMED, PROVIDER_ARGS, Chaos, Schedule
from devnet.launcher import open_devnet
from node.calibrate import reference_model_path
from node.models import seeded_model_path


async def test_faults_aimed_at_every_settlement_window_leave_no_violation(tmp_path):
    inputs = tmp_path / "x.npy"
    np.save(inputs, np.random.default_rng(5).random((2, 3, 224, 224), dtype=np.float32))
    reports = []
    with trio.fail_after(420):
        async with open_devnet(2, root=tmp_path / "net", extra_args={0: PROVIDER_ARGS, 1: PROVIDER_ARGS}) as net:
            async with trio.open_nursery() as nursery:
                chaos = Chaos(net, tmp_path, nursery, model=reference_model_path("squeezenet"),
                              # the same architecture with other weights: no provider holds it
                              upload_model=lambda name: seeded_model_path("squeezenet", seed=7, directory=tmp_path),
                              inputs=inputs, jobs=3)
                for point, action, who in AIMED:
                    schedule = Schedule(point, point=point, action=action, who=who,
                                        upload=point == "buyer-model-upload")
                    reports.append(await chaos.run(schedule))
                nursery.cancel_scope.cancel()
    for report in reports:
        name = report["schedule"]["name"]
        assert report["violations"] == [], (name, report)
        # The fault really fired in its window, and the batch still finished.
        assert [e["point"] for e in report["fired"] if e["point"] == name], (name, report)
        assert report["final_exit"] == 0 and set(report["jobs"]) == {"settled"}, (name, report)
        assert all(r.get("reconciled", {}).get("disagreements") == [] for r in report["reconciled"]
                   if "reconciled" in r), (name, report)
