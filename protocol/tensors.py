"""Tensors on the wire: dtype, shape and raw little-endian bytes (pure; no I/O here)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import codec
from .errors import DecodeError
from .fields import Fields

DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
MAX_TENSOR_BYTES = 64 * 1024 * 1024
MAX_RANK = 8


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "data": self.data}

    @classmethod
    def from_wire(cls, value: Any, path: str) -> "Tensor":
        f = Fields(value, path)
        name = f.str("name", max_len=256)
        dtype = f.str("dtype", choices=DTYPES)
        shape_raw = f.raw("shape")
        if (not isinstance(shape_raw, list) or len(shape_raw) > MAX_RANK
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 1 << 31
                           for d in shape_raw)):
            raise DecodeError(f"{path}.shape: expected up to {MAX_RANK} ints in [0, 2^31], got {shape_raw!r:.60}")
        shape = tuple(shape_raw)
        data = f.bytes("data", max_len=MAX_TENSOR_BYTES)
        expected = math.prod(shape) * np.dtype(dtype).itemsize
        if expected != len(data):
            raise DecodeError(f"{path}.data: shape {list(shape)} of {dtype} needs {expected} bytes, got {len(data)}")
        return cls(name, dtype, shape, data)

    def to_array(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<")).reshape(self.shape)

    @classmethod
    def from_array(cls, name: str, array: np.ndarray) -> "Tensor":
        array = np.asarray(array)
        if array.dtype.name not in DTYPES:
            raise DecodeError(f"tensor {name!r}: dtype {array.dtype.name} is not one of {'/'.join(DTYPES)}")
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        return cls(name, array.dtype.name, tuple(int(d) for d in array.shape), little.tobytes())


def tensors_sha256(tensors: list[Tensor] | tuple[Tensor, ...]) -> str:
    """Content hash of an ordered tensor list, as receipts commit to it."""
    return hashlib.sha256(codec.encode([t.to_wire() for t in tensors])).hexdigest()


def rows(tensor: Tensor, start: int, stop: int) -> Tensor:
    """Rows [start, stop) along the leading (batch) axis, as a tensor of its own."""
    if not tensor.shape:
        raise DecodeError(f"tensor {tensor.name!r} has no batch axis to split")
    row_bytes = math.prod(tensor.shape[1:]) * np.dtype(tensor.dtype).itemsize
    return Tensor(tensor.name, tensor.dtype, (stop - start, *tensor.shape[1:]),
                  tensor.data[start * row_bytes:stop * row_bytes])


def split_rows(tensors: list[Tensor] | tuple[Tensor, ...], parts: tuple[int, ...]) -> list[tuple[Tensor, ...]]:
    """Tensors cut along the batch axis into consecutive parts of `parts` rows each (a
    micro-batched job's members); every tensor must have exactly sum(parts) rows."""
    total = sum(parts)
    for t in tensors:
        if not t.shape or t.shape[0] != total:
            raise DecodeError(f"tensor {t.name!r}: {list(t.shape)} has no batch axis of {total} rows to split "
                              f"into parts {list(parts)}")
    cut, start = [], 0
    for n in parts:
        cut.append(tuple(rows(t, start, start + n) for t in tensors))
        start += n
    return cut


def parts_sha256(tensors: list[Tensor] | tuple[Tensor, ...], parts: tuple[int, ...]) -> list[str]:
    """Each part's own tensors_sha256: what a receipt commits to per member of a batch."""
    return [tensors_sha256(part) for part in split_rows(tensors, parts)]

