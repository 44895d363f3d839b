"""A model's inputs and outputs, and whether a set of input arrays fits them.

One check, used twice: by the buyer before anything leaves the machine (a wrong input
is a local error in milliseconds, not a provider's refusal seconds later) and by the
provider's executor before it runs a job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# onnxruntime's type names -> our wire dtypes (protocol.tensors.DTYPES)
ORT_TYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}


class InputMismatch(ValueError):
    """The inputs do not fit the model; the message says which and how."""


@dataclass(frozen=True)
class Port:
    """One input or output: its name, dtype (None when not one we carry), and shape
    (an int per fixed axis, a str naming a symbolic one, None when unknown)."""

    name: str
    dtype: str | None
    shape: tuple[int | str | None, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]

    def to_json(self) -> dict:
        return {"inputs": [p.to_json() for p in self.inputs], "outputs": [p.to_json() for p in self.outputs]}


def signature_of_model(model: Path | bytes) -> Signature:
    """Read from the ONNX graph (a file, or its bytes), without building a session.
    Raises InputMismatch when it is not an ONNX model."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    try:
        if isinstance(model, bytes):
            graph = onnx.load_model_from_string(model).graph
        else:
            graph = onnx.load(str(model), load_external_data=False).graph
    except Exception as exc:  # noqa: BLE001 - protobuf and onnx raise many kinds on garbage
        raise InputMismatch(f"not an ONNX model: {type(exc).__name__}: {str(exc)[:200]}") from None
    initializers = {i.name for i in graph.initializer}

    def port(value) -> Port:
        tensor_type = value.type.tensor_type
        try:
            dtype = tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        except (KeyError, TypeError, ValueError):
            dtype = None
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim)
        return Port(value.name, dtype, shape)

    return Signature(tuple(port(i) for i in graph.input if i.name not in initializers),
                     tuple(port(o) for o in graph.output))


def signature_of_session(session) -> Signature:
    def port(arg) -> Port:
        return Port(arg.name, ORT_TYPES.get(arg.type), tuple(arg.shape))

    return Signature(tuple(port(i) for i in session.get_inputs()), tuple(port(o) for o in session.get_outputs()))


def check_inputs(signature: Signature, inputs: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[int, int]:
    """`inputs`: name -> (dtype, shape). Returns (rows, batch): the leading axis every
    input shares, and the model's fixed batch size it splits into. Raises InputMismatch."""
    names = [p.name for p in signature.inputs]
    if set(inputs) != set(names):
        raise InputMismatch(f"model takes inputs {names}, got {sorted(inputs)}")
    rows, batch = None, None
    for port in signature.inputs:
        dtype, shape = inputs[port.name]
        if port.dtype != dtype:
            raise InputMismatch(f"input {port.name}: model wants {port.dtype}, got {dtype}")
        if len(shape) != len(port.shape):
            raise InputMismatch(f"input {port.name}: model wants rank {len(port.shape)} {list(port.shape)}, "
                                f"got {len(shape)} {list(shape)}")
        for axis, (want, got) in enumerate(zip(port.shape[1:], shape[1:]), start=1):
            if isinstance(want, int) and want != got:
                raise InputMismatch(f"input {port.name}: axis {axis} must be {want}, got {got}")
        if not shape:
            raise InputMismatch(f"input {port.name}: a scalar has no batch axis")
        rows = shape[0] if rows is None else rows
        if shape[0] != rows:
            raise InputMismatch(f"inputs disagree on the number of rows ({rows} and {shape[0]})")
        if isinstance(port.shape[0], int):
            batch = port.shape[0]
    batch = batch or rows or 1
    if rows == 0 or rows % batch:
        raise InputMismatch(f"{rows} rows do not split into batches of {batch} (the model's batch axis)")
    return rows, batch
