"""Runs ONNX models for real with onnxruntime, off the trio thread, one job per slot.

Models are stored by sha256 in a directory; sessions are cached by sha256. Input rows
are run in chunks of the model's fixed batch size, so `items` is the leading dimension.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import trio

from protocol.tensors import Tensor

log = logging.getLogger("idlemesh.executor")

ORT_TYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}


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
    """ONNX files by content hash under `root`."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.onnx"

    def has(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def put(self, sha256: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != sha256:
            raise JobFailed("model-invalid", f"model bytes do not hash to {sha256}")
        tmp = self.root / f".{sha256}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.path(sha256))


@dataclass
class RunOutput:
    outputs: list[Tensor]
    compute_ms: float


class Executor:
    def __init__(self, store: ModelStore, *, slots: int, threads_per_slot: int = 1):
        self.store = store
        self.slots = trio.CapacityLimiter(slots)
        self.threads_per_slot = threads_per_slot
        self.execution_providers = best_execution_providers()
        self._sessions: dict[str, ort.InferenceSession] = {}

    @property
    def execution_provider(self) -> str:
        return self.execution_providers[0]

    def _session(self, sha256: str) -> ort.InferenceSession:
        session = self._sessions.get(sha256)
        if session is None:
            if not self.store.has(sha256):
                raise JobFailed("unknown-model", f"model {sha256} is not held")
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads_per_slot
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            try:
                session = ort.InferenceSession(str(self.store.path(sha256)), options,
                                               providers=self.execution_providers)
            except (ort.capi.onnxruntime_pybind11_state.Fail,
                    ort.capi.onnxruntime_pybind11_state.InvalidGraph,
                    ort.capi.onnxruntime_pybind11_state.InvalidProtobuf,
                    ort.capi.onnxruntime_pybind11_state.NoSuchFile,
                    ort.capi.onnxruntime_pybind11_state.NotImplemented,
                    RuntimeError) as exc:
                raise JobFailed("model-invalid", f"onnxruntime cannot load model {sha256[:12]}: {exc}") from None
            self._sessions[sha256] = session
        return session

    def _run_sync(self, sha256: str, inputs: tuple[Tensor, ...]) -> RunOutput:
        session = self._session(sha256)
        model_inputs = session.get_inputs()
        by_name = {t.name: t for t in inputs}
        if set(by_name) != {i.name for i in model_inputs}:
            raise JobFailed("bad-input", f"model takes inputs {[i.name for i in model_inputs]}, got {sorted(by_name)}")
        arrays, rows, batch = {}, None, None
        for spec in model_inputs:
            tensor = by_name[spec.name]
            want = ORT_TYPES.get(spec.type)
            if want != tensor.dtype:
                raise JobFailed("bad-input", f"input {spec.name}: model wants {want}, got {tensor.dtype}")
            if len(tensor.shape) != len(spec.shape):
                raise JobFailed("bad-input", f"input {spec.name}: model wants rank {len(spec.shape)}, got {len(tensor.shape)}")
            for axis, (want_dim, got_dim) in enumerate(zip(spec.shape[1:], tensor.shape[1:]), start=1):
                if isinstance(want_dim, int) and want_dim != got_dim:
                    raise JobFailed("bad-input", f"input {spec.name}: axis {axis} must be {want_dim}, got {got_dim}")
            arrays[spec.name] = tensor.to_array()
            rows = tensor.shape[0] if rows is None else rows
            if tensor.shape[0] != rows:
                raise JobFailed("bad-input", "inputs disagree on the number of rows")
            if isinstance(spec.shape[0], int):
                batch = spec.shape[0]
        batch = batch or rows or 1
        if rows == 0 or rows % batch:
            raise JobFailed("bad-input", f"{rows} rows do not split into batches of {batch}")
        started = time.perf_counter()
        chunks = []
        try:
            for start in range(0, rows, batch):
                chunks.append(session.run(None, {k: v[start:start + batch] for k, v in arrays.items()}))
        except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                ort.capi.onnxruntime_pybind11_state.RuntimeException, RuntimeError, MemoryError) as exc:
            raise JobFailed("execution-failed", f"onnxruntime failed: {exc}") from None
        compute_ms = (time.perf_counter() - started) * 1000
        names = [o.name for o in session.get_outputs()]
        outputs = [Tensor.from_array(name, np.concatenate([c[i] for c in chunks], axis=0))
                   for i, name in enumerate(names)]
        return RunOutput(outputs, compute_ms)

    async def run(self, sha256: str, inputs: tuple[Tensor, ...]) -> RunOutput:
        async with self.slots:
            return await trio.to_thread.run_sync(self._run_sync, sha256, inputs, abandon_on_cancel=True)

    def measure_throughput(self, sha256: str, *, runs: int = 5) -> float:
        """Items per second on one slot, measured by running the model on zeros."""
        session = self._session(sha256)
        feeds = {}
        for spec in session.get_inputs():
            shape = [d if isinstance(d, int) else 1 for d in spec.shape]
            feeds[spec.name] = np.zeros(shape, dtype=ORT_TYPES[spec.type])
        batch = next(iter(feeds.values())).shape[0] if feeds else 1
        session.run(None, feeds)  # warm-up
        started = time.perf_counter()
        for _ in range(runs):
            session.run(None, feeds)
        return runs * batch / (time.perf_counter() - started)
