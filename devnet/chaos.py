"""Chaos against settlement, with real processes: faults aimed at the windows where two
ledgers can part (node/faults.py), and seeded random kill -9 / SIGSTOP of buyer,
providers and bootstrap; then resume, restart, reconcile (`idlemesh settle`), and check
the invariants (devnet/invariants.py). tests/test_chaos.py runs the aimed schedules;
bench/chaos.py runs many random ones and prints JSON.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .invariants import violations
from .launcher import Child, Devnet, child_env

REPO = Path(__file__).resolve().parents[1]
ACK_TIMEOUT_S = 2.0  # providers in a chaos devnet give up on an ack after this
PROVIDER_ARGS = ["--ack-timeout-s", str(ACK_TIMEOUT_S)]
BUYER_TIMEOUT_S = 120.0
MAX_RESUMES = 4

# (fault point, action, who): each window where settlement went wrong before.
AIMED = [
    ("buyer-after-ack", "kill", "buyer"),          # provider holds the ack, buyer's journal does not
    ("buyer-model-upload", "kill", "buyer"),       # a buyer gone mid-upload resubmits
    ("buyer-after-result", "stop", "buyer"),       # paused longer than the provider's ack timeout
    ("provider-before-ack", "kill", "provider"),   # result sent, ack never received
    ("provider-after-ack", "kill", "provider"),    # ack applied, never confirmed
]


@dataclass
class Schedule:
    name: str
    point: str | None = None     # an aimed fault: (point, action) in `who`
    action: str = "kill"
    who: str = "buyer"           # buyer / provider / bootstrap
    timed: list[dict] = field(default_factory=list)  # random faults: {"at_s", "target", "action", "for_s"}
    upload: bool = False         # a model the providers do not hold, so it is uploaded

    def to_json(self) -> dict:
        return dict(vars(self))


def random_schedule(rng: random.Random, index: int, n_providers: int) -> Schedule:
    """One aimed fault half the time, and one to three timed kills or pauses of random nodes."""
    schedule = Schedule(f"random-{index}")
    if rng.random() < 0.5:
        schedule.point, schedule.action, schedule.who = rng.choice(AIMED)
    targets = ["buyer", "bootstrap"] + [f"provider-{i}" for i in range(n_providers)]
    for _ in range(rng.randint(1, 3)):
        schedule.timed.append({"at_s": round(rng.uniform(0.2, 4.0), 2), "target": rng.choice(targets),
                               "action": rng.choice(["kill", "stop"]), "for_s": round(rng.uniform(0.5, 4.0), 2)})
    schedule.upload = schedule.point == "buyer-model-upload" or rng.random() < 0.3
    return schedule


class Chaos:
    """Runs schedules one after another against one devnet, keeping every node's events
    drained (a full pipe would stall a node) and restarting what a schedule killed."""

    def __init__(self, net: Devnet, root: Path, nursery: trio.Nursery, *, model: Path, upload_model,
                 inputs: Path, jobs: int = 4):
        self.net, self.root, self.nursery = net, root, nursery
        self.model, self.upload_model, self.inputs, self.jobs = model, upload_model, inputs, jobs
        self.buyer_home = root / "buyer"
        self.events: list[tuple[str, dict]] = []
        self.timed_fired: list[dict] = []  # timed faults that found their target running
        self._new_event = trio.Event()
        for child in net.children:
            self._drain(child)

    def _drain(self, child: Child) -> None:
        async def pump() -> None:
            async for event in child.events:
                self.events.append((child.name, event))
                self._new_event.set()
                self._new_event = trio.Event()
        self.nursery.start_soon(pump)

    async def wait_event(self, match, timeout_s: float) -> tuple[str, dict] | None:
        start = len(self.events)
        with trio.move_on_after(timeout_s):
            while True:
                for name, event in self.events[start:]:
                    if match(name, event):
                        return name, event
                start = len(self.events)
                await self._new_event.wait()
        return None

    def child(self, name: str) -> Child:
        return next(c for c in self.net.children if c.name == name)

    async def restart(self, name: str, env: dict[str, str] | None = None) -> None:
        fresh = await self.net.restart(self.child(name), env=env)
        self._drain(fresh)

    async def heal(self) -> list[str]:
        """Every node running again (a killed one restarted, a paused one continued)."""
        healed = []
        for child in list(self.net.children):
            child.process.send_signal(signal.SIGCONT)
            if child.process.returncode is not None:
                await self.restart(child.name)
                healed.append(child.name)
        return healed

    def _submit_cmd(self, schedule: Schedule, resume: bool) -> list[str]:
        common = ["--bootstrap", self.net.bootstrap_addr, "--home", str(self.buyer_home), "--json",
                  "--job-timeout-s", "20"]
        if resume:
            return [sys.executable, "-m", "node.cli", "submit", "--resume", *common]
        # A model no provider holds yet (a fresh one per schedule), so it is uploaded.
        model = self.upload_model(schedule.name) if schedule.upload else self.model
        return [sys.executable, "-m", "node.cli", "submit", str(model), "--input", str(self.inputs),
                "--count", str(self.jobs), "--out", str(self.root / "out"), *common]

    async def _buyer(self, schedule: Schedule, resume: bool, env: dict[str, str],
                     faults: bool = False) -> tuple[int, dict | None]:
        process = await trio.lowlevel.open_process(self._submit_cmd(schedule, resume), stdout=subprocess.PIPE,
                                                   stderr=subprocess.DEVNULL, cwd=REPO, env=child_env(env))
        out = b""

        async def read() -> None:
            nonlocal out
            while chunk := await process.stdout.receive_some():
                out += chunk

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            if faults:  # the schedule's faults fire during its first run only
                nursery.start_soon(self._timed_faults, schedule, process)
                if schedule.point and schedule.who == "buyer" and schedule.action == "stop":
                    nursery.start_soon(self._continue_after_ack_timeout, process)
            with trio.move_on_after(BUYER_TIMEOUT_S):
                await process.wait()
            if process.returncode is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                await process.wait()
            nursery.cancel_scope.cancel()
        text = out.decode(errors="replace")
        for line in text.splitlines():
            if line.startswith('{"event": "fault"'):
                self.events.append(("buyer", json.loads(line)))
        try:  # `--json`: one document, the batch or {"error": ...}, after any fault line
            summary = json.loads("\n".join(ln for ln in text.splitlines() if not ln.startswith('{"event"')))
        except ValueError:
            summary = None  # killed before it printed
        return process.returncode, summary

    async def _continue_after_ack_timeout(self, process) -> None:
        """The buyer stopped itself after a result: continue it once a provider gave up
        waiting for its ack (the window where the late ack must still settle the job)."""
        # After 60 s without one, the stop never fired (no job reached it): continuing is harmless.
        await self.wait_event(lambda name, e: e.get("event") == "refused" and e.get("code") == "no-ack", timeout_s=60)
        process.send_signal(signal.SIGCONT)

    async def _timed_faults(self, schedule: Schedule, buyer_process) -> None:
        started = trio.current_time()
        for fault in sorted(schedule.timed, key=lambda f: f["at_s"]):
            await trio.sleep_until(started + fault["at_s"])
            process = buyer_process if fault["target"] == "buyer" else self.child(fault["target"]).process
            if process.returncode is not None:
                continue
            self.timed_fired.append(dict(fault))
            if fault["action"] == "kill":
                process.kill()
            else:
                process.send_signal(signal.SIGSTOP)
                self.nursery.start_soon(_continue_later, process, fault["for_s"])

    async def run(self, schedule: Schedule) -> dict:
        report = {"schedule": schedule.to_json(), "fired": [], "resumes": 0, "healed": []}
        first_event, first_timed = len(self.events), len(self.timed_fired)
        fault_env = {"IDLEMESH_FAULT": f"{schedule.point}:{schedule.action}"} if schedule.point else {}
        if schedule.point and schedule.who == "provider":
            for child in self.net.providers:  # whichever provider the job lands on
                await self.restart(child.name, env=fault_env)
        rc, summary = await self._buyer(schedule, resume=False, env=fault_env if schedule.who == "buyer" else {},
                                        faults=True)
        report["first_exit"] = rc
        if schedule.point and schedule.who == "provider":
            for child in self.net.providers:  # the fault is spent or not: run clean from here
                await self.restart(child.name)
        report["healed"] += await self.heal()
        # As an operator would: `submit --resume` until the batch is done (a job that
        # failed because every provider it tried died is run again, or its kept result
        # fetched from the provider that ran it).
        while rc != 0 and report["resumes"] < MAX_RESUMES:
            report["resumes"] += 1
            # A batch the buyer journalled is resumed; one it never got to journal (it
            # died first, or could not reach the bootstrap) is submitted again.
            rc, summary = await self._buyer(schedule, resume=_has_unfinished(self.buyer_home), env={})
            if summary and "error" in summary:
                report.setdefault("errors", []).append(summary["error"])
            report["healed"] += await self.heal()
        report["final_exit"] = rc
        if summary and "error" in summary:
            report["error"] = summary["error"]
        report["jobs"] = {}
        if summary and "jobs" in summary:
            for job in summary["jobs"]:
                report["jobs"][job["state"]] = report["jobs"].get(job["state"], 0) + 1
        report["fired"] = [e for _, e in self.events[first_event:] if e.get("event") == "fault"]
        report["timed_fired"] = self.timed_fired[first_timed:]
        report["reconciled"] = [await self.reconcile(child) for child in self.net.providers]
        report["violations"] = violations([self.buyer_home], [c.home for c in self.net.providers])
        return report

    async def reconcile(self, provider: Child) -> dict:
        if not (self.buyer_home / "ledger.sqlite").exists():
            return {"peer": provider.ready.get("peer_id"), "skipped": "the buyer holds no ledger yet"}
        done = await trio.run_process(
            [sys.executable, "-m", "node.cli", "settle", provider.ready["peer_id"], "--bootstrap",
             self.net.bootstrap_addr, "--home", str(self.buyer_home), "--json",
             "--out", str(self.root / f"statement-{provider.name}.idm")],
            capture_stdout=True, stderr=subprocess.DEVNULL, cwd=REPO, check=False)
        try:
            return json.loads(done.stdout)
        except ValueError:
            return {"peer": provider.ready.get("peer_id"), "exit": done.returncode}


def _has_unfinished(home: Path) -> bool:
    from node.journal import Journal

    if not (home / "jobs.sqlite").exists():
        return False
    journal = Journal(home)
    try:
        return journal.latest_unfinished() is not None
    finally:
        journal.close()


async def _continue_later(process, after_s: float) -> None:
    await trio.sleep(after_s)
    if process.returncode is None:
        process.send_signal(signal.SIGCONT)
