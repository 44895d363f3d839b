"""Runs ONNX models for real with onnxruntime, off the trio thread, one job per slot.

- Models live on disk by sha256 under a size budget; the least recently used go first,
  never one a job is using. A model a buyer sent is first checked in a throwaway
  subprocess (node/modelcheck.py), so a model that crashes the loader cannot take the
  daemon down; the verdict is kept next to the model.
- Sessions are cached by sha256 (a bounded LRU).
- Each job has a timeout (onnxruntime's RunOptions.terminate stops the run, so the
  slot really frees) and a memory ceiling checked against the model's estimate.
- Input rows run in chunks of the model's fixed batch size: `items` is the leading axis.
- With an energy meter, a job's energy is the counter delta over its run, less idle
  power, split among the jobs running at the time; the source says which meter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import trio

from protocol.tensors import Tensor

from .modelio import InputMismatch, check_inputs, signature_of_session
from .power import EnergyMeter

log = logging.getLogger("idlemesh.executor")
ort.set_default_logger_severity(3)  # its graph-cleanup warnings are noise to operators

ORT_ERRORS = tuple(getattr(ort.capi.onnxruntime_pybind11_state, name) for name in (
    "Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NotImplemented",
    "RuntimeException", "EngineError", "ModelLoaded", "NoModel")
    if hasattr(ort.capi.onnxruntime_pybind11_state, name)) + (RuntimeError, MemoryError)
MODEL_CHECK_TIMEOUT_S = 60.0
SESSION_CACHE = 16


class JobFailed(Exception):
    """A job cannot run; `code` is one of protocol.stream.ERROR_CODES."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def best_execution_providers() -> list[str]:
    available = ort.get_available_providers()
    preferred = [p for p in ("CUDAExecutionProvider", "CoreMLExecutionProvider") if p in available]
    return preferred + ["CPUExecutionProvider"]


class ModelStore:
    """ONNX files by content hash under `root`, at most `budget_bytes` in all.
    A file's mtime is its last use, so the LRU order survives restarts."""

    def __init__(self, root: Path, *, budget_bytes: int = 2 << 30):
        self.root = root
        self.budget_bytes = budget_bytes
        self.pinned: dict[str, int] = {}  # sha -> jobs using it
        root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.onnx"

    def has(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def touch(self, sha256: str) -> None:
        try:
            os.utime(self.path(sha256))
        except OSError:
            pass

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*.onnx"))

    def put(self, sha256: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != sha256:
            raise JobFailed("model-invalid", f"model bytes do not hash to {sha256}")
        if len(data) > self.budget_bytes:
            raise JobFailed("too-large", f"model is {len(data)} bytes; this provider keeps at most "
                                         f"{self.budget_bytes} bytes of models")
        self._evict(len(data))
        tmp = self.root / f".{sha256}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.path(sha256))

    def _evict(self, incoming: int) -> None:
        files = sorted(self.root.glob("*.onnx"), key=lambda p: p.stat().st_mtime)
        used = sum(p.stat().st_size for p in files)
        for path in files:
            if used + incoming <= self.budget_bytes:
                return
            sha = path.stem
            if self.pinned.get(sha):
                continue
            used -= path.stat().st_size
            path.unlink(missing_ok=True)
            (self.root / f"{sha}.check.json").unlink(missing_ok=True)
            log.info("evicted model %s (least recently used)", sha[:12])
        if used + incoming > self.budget_bytes:
            raise JobFailed("too-large", "the model store is full of models in use")


@dataclass
class RunOutput:
    outputs: list[Tensor]
    compute_ms: float
    energy_j: float | None = None  # from the meter, when there is one
    energy_source: str | None = None


class Executor:
    def __init__(self, store: ModelStore, *, slots: int, threads_per_slot: int = 1,
                 meter: EnergyMeter | None = None, idle_w: float = 0.0, job_memory_mb: float = 4096.0,
                 check_models: bool = True):
        self.store = store
        self.slots = trio.CapacityLimiter(slots)
        self.threads_per_slot = threads_per_slot
        self.execution_providers = best_execution_providers()
        self.meter = meter
        self.idle_w = idle_w
        self.job_memory_bytes = int(job_memory_mb * (1 << 20))
        self.check_models = check_models
        self._sessions: OrderedDict[str, ort.InferenceSession] = OrderedDict()
        self._checks: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._running = 0

    @property
    def execution_provider(self) -> str:
        return self.execution_providers[0]

    # --- model admission --------------------------------------------------------------

    def trust(self, sha256: str, verdict: dict) -> None:
        """A model the operator configured, checked in-process at start."""
        self._checks[sha256] = verdict

    async def admit(self, sha256: str) -> dict:
        """Check a stored model once, in a subprocess; raise JobFailed if it is unfit."""
        verdict = self._checks.get(sha256)
        marker = self.store.root / f"{sha256}.check.json"
        if verdict is None and marker.exists():
            try:
                verdict = json.loads(marker.read_text())
            except (OSError, ValueError):
                verdict = None
        if verdict is None:
            if not self.check_models:
                verdict = {"ok": True, "estimated_bytes": 0}
            else:
                verdict = await self._run_check(sha256)
            # Kept: a model's own verdict. Not kept: "too-large", which depends on our
            # limit (config may change), and our own failures.
            if verdict.get("code") not in ("internal", "too-large"):
                marker.write_text(json.dumps(verdict))
        if verdict.get("code") != "too-large":
            self._checks[sha256] = verdict
        if not verdict.get("ok"):
            raise JobFailed(verdict.get("code", "model-invalid"), verdict.get("error", "model check failed"))
        return verdict

    async def _run_check(self, sha256: str) -> dict:
        cmd = [sys.executable, "-m", "node.modelcheck", str(self.store.path(sha256)), str(self.job_memory_bytes)]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        try:
            with trio.fail_after(MODEL_CHECK_TIMEOUT_S):
                done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False, env=env)
        except trio.TooSlowError:
            return {"ok": False, "code": "model-invalid", "error": f"model check ran past {MODEL_CHECK_TIMEOUT_S:g} s"}
        if done.returncode != 0:
            return {"ok": False, "code": "model-invalid",
                    "error": f"model check died (exit {done.returncode}): the model crashes the loader"}
        try:
            return json.loads(done.stdout.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"ok": False, "code": "internal", "error": "model check printed no verdict"}

    def _session(self, sha256: str) -> ort.InferenceSession:
        with self._lock:
            session = self._sessions.get(sha256)
            if session is not None:
                self._sessions.move_to_end(sha256)
                return session
        if not self.store.has(sha256):
            raise JobFailed("unknown-model", f"model {sha256} is not held")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads_per_slot
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(self.store.path(sha256)), options, providers=self.execution_providers)
        except ORT_ERRORS as exc:
            raise JobFailed("model-invalid", f"onnxruntime cannot load model {sha256[:12]}: {exc}") from None
        with self._lock:
            self._sessions[sha256] = session
            while len(self._sessions) > SESSION_CACHE:
                self._sessions.popitem(last=False)
        return session

    def warm(self, sha256: str) -> None:
        """Load the model's session now (blocking), so the first buyer of a model we offer
        does not pay onnxruntime's start-up (a few hundred ms) in its latency."""
        self._session(sha256)

    # --- running ------------------------------------------------------------------------

    def _run_sync(self, sha256: str, inputs: tuple[Tensor, ...], run_options: ort.RunOptions) -> RunOutput:
        session = self._session(sha256)
        try:
            rows, batch = check_inputs(signature_of_session(session), {t.name: (t.dtype, t.shape) for t in inputs})
        except InputMismatch as exc:
            raise JobFailed("bad-input", str(exc)) from None
        arrays = {t.name: t.to_array() for t in inputs}
        estimate = self._checks.get(sha256, {}).get("estimated_bytes", 0) + sum(a.nbytes for a in arrays.values())
        if estimate > self.job_memory_bytes:
            raise JobFailed("too-large", f"job needs about {estimate / 2**20:.0f} MB; the limit per job is "
                                         f"{self.job_memory_bytes / 2**20:.0f} MB")
        with self._lock:
            self._running += 1
            peak_running = self._running
        energy_start = self.meter.read_j() if self.meter else 0.0
        started = time.perf_counter()
        chunks = []
        try:
            for start in range(0, rows, batch):
                chunks.append(session.run(None, {k: v[start:start + batch] for k, v in arrays.items()}, run_options))
                with self._lock:
                    peak_running = max(peak_running, self._running)
        except ORT_ERRORS as exc:
            if run_options.terminate:
                raise JobFailed("timeout", "job ran past its timeout and was stopped") from None
            raise JobFailed("execution-failed", f"onnxruntime failed: {str(exc)[:500]}") from None
        finally:
            with self._lock:
                self._running -= 1
        elapsed_s = time.perf_counter() - started
        energy_j = None
        if self.meter:
            # The counter covers the whole device: take off idle power, share the rest
            # among the jobs that ran alongside (an approximation, labelled by meter).
            energy_j = max(0.0, self.meter.read_j() - energy_start - self.idle_w * elapsed_s) / peak_running
        names = [o.name for o in session.get_outputs()]
        outputs = [Tensor.from_array(name, np.concatenate([c[i] for c in chunks], axis=0))
                   for i, name in enumerate(names)]
        return RunOutput(outputs, elapsed_s * 1000, energy_j, self.meter.source if self.meter else None)

    async def run(self, sha256: str, inputs: tuple[Tensor, ...], *, timeout_s: float = 60.0) -> RunOutput:
        await self.admit(sha256)
        self.store.pinned[sha256] = self.store.pinned.get(sha256, 0) + 1
        self.store.touch(sha256)
        run_options = ort.RunOptions()
        # onnxruntime stops a run at its next check once `terminate` is set.
        watchdog = threading.Timer(timeout_s, lambda: setattr(run_options, "terminate", True))
        try:
            async with self.slots:
                # The thread is never abandoned: it holds its slot until onnxruntime has
                # really stopped, so a timed-out job never overbooks the machine.
                watchdog.start()
                return await trio.to_thread.run_sync(self._run_sync, sha256, inputs, run_options)
        finally:
            watchdog.cancel()
            self.store.pinned[sha256] -= 1
