"""The Open Inference Protocol v2 (KServe v2, as Triton, KServe and MLServer speak it):
its JSON tensors and the binary tensor data extension, to and from numpy. Pure: bytes
in, bytes out; node.gateway moves them over HTTP.

Spec: https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/
Binary extension: https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .modelio import Signature

# OIP datatypes <-> numpy dtypes we carry (protocol.tensors.DTYPES). BYTES (strings)
# and the unsigned types wider than 8 bits have no ONNX model here to run them.
DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "INT8": "int8", "INT16": "int16", "INT32": "int32",
             "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64"}
DATATYPE_OF = {v: k for k, v in DATATYPES.items()}
HEADER_LENGTH = "inference-header-content-length"
MAX_BODY_BYTES = 64 * 1024 * 1024 + 1024 * 1024  # the provider's tensor cap, plus the JSON around it
# Our names in a request's and a response's parameters (the receipt goes there) start so.
PARAMETER_PREFIX = "idlemesh_"


class OIPError(Exception):
    """A request the protocol says is wrong: answered as {"error": message} with `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class InferRequest:
    id: str
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None  # names asked for; None: every output
    binary_outputs: set[str] = field(default_factory=set)  # outputs to send as binary
    parameters: dict[str, Any] = field(default_factory=dict)


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise OIPError(400, f"{where}: shape must be a list of non-negative integers")
    return tuple(value)


def _dtype(value: Any, where: str) -> np.dtype:
    if value not in DATATYPES:
        raise OIPError(400, f"{where}: datatype {value!r} is not one of {', '.join(DATATYPES)}")
    return np.dtype(DATATYPES[value])


def parse_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    """An infer request's body: JSON alone, or (binary extension) `header_length` bytes of
    JSON followed by each binary input's bytes in input order."""
    if header_length is not None and not 0 <= header_length <= len(body):
        raise OIPError(400, f"Inference-Header-Content-Length {header_length} is outside the body "
                            f"({len(body)} bytes)")
    head, binary = (body, b"") if header_length is None else (body[:header_length], body[header_length:])
    try:
        doc = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OIPError(400, f"the request is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise OIPError(400, "the request must be an object with a non-empty 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, item in enumerate(doc["inputs"]):
        where = f"inputs[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise OIPError(400, f"{where}: each input is an object with a 'name'")
        where = f"input {item['name']!r}"
        if item["name"] in inputs:
            raise OIPError(400, f"{where} is given twice")
        shape = _shape(item.get("shape"), where)
        dtype = _dtype(item.get("datatype"), where)
        count = math.prod(shape)  # Python ints: a crafted shape cannot wrap around to a small count
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise OIPError(400, f"{where}: parameters must be an object")
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise OIPError(400, f"{where}: binary_data_size {size!r} runs past the body's binary part")
            if size != count * dtype.itemsize:
                raise OIPError(400, f"{where}: {size} bytes of binary data do not make a {list(shape)} "
                                    f"{item['datatype']} tensor ({count * dtype.itemsize} bytes)")
            # bool travels as one byte per element; every other type little-endian.
            array = np.frombuffer(binary, dtype=dtype.newbyteorder("<"), count=count, offset=offset)
            offset += size
        elif "data" in item:
            try:
                array = np.asarray(item["data"], dtype=dtype)
            except (TypeError, ValueError, OverflowError) as exc:
                raise OIPError(400, f"{where}: data does not fit {item['datatype']}: {exc}") from None
            if array.size != count:
                raise OIPError(400, f"{where}: {array.size} values do not fill shape {list(shape)}")
        else:
            raise OIPError(400, f"{where}: give 'data' or parameters.binary_data_size")
        inputs[item["name"]] = array.reshape(shape).astype(dtype.newbyteorder("="), copy=False)
    if offset != len(binary):
        raise OIPError(400, f"{len(binary) - offset} bytes of binary data follow the inputs unclaimed")
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise OIPError(400, "parameters must be an object")
    outputs, binary_outputs = None, set()
    if "outputs" in doc:
        if not isinstance(doc["outputs"], list):
            raise OIPError(400, "'outputs' must be a list")
        outputs = []
        for item in doc["outputs"]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise OIPError(400, "each requested output is an object with a 'name'")
            outputs.append(item["name"])
            if (item.get("parameters") or {}).get("binary_data"):
                binary_outputs.add(item["name"])
    if parameters.get("binary_data_output"):
        binary_outputs = {"*"}
    request_id = doc.get("id", "")
    return InferRequest(str(request_id) if request_id is not None else "", inputs, outputs, binary_outputs,
                        parameters)


def encode_infer_response(model: str, request: InferRequest, outputs: dict[str, np.ndarray],
                          parameters: dict[str, Any]) -> tuple[list[tuple[str, str]], bytes]:
    """The response's headers and body: JSON, or JSON then binary outputs."""
    names = request.outputs if request.outputs is not None else list(outputs)
    missing = [n for n in names if n not in outputs]
    if missing:
        raise OIPError(400, f"model {model} has no output {missing[0]!r} (it has {', '.join(outputs)})")
    items, blobs = [], []
    for name in names:
        array = np.asarray(outputs[name])
        if array.dtype.name not in DATATYPE_OF:
            raise OIPError(500, f"output {name!r} has dtype {array.dtype.name}, which OIP cannot carry")
        item: dict[str, Any] = {"name": name, "datatype": DATATYPE_OF[array.dtype.name], "shape": list(array.shape)}
        if "*" in request.binary_outputs or name in request.binary_outputs:
            blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            item["data"] = array.reshape(-1).tolist()
        items.append(item)
    doc = {"model_name": model, "model_version": "1", "outputs": items, "parameters": parameters}
    if request.id:
        doc["id"] = request.id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return [("content-type", "application/json")], head
    return ([("content-type", "application/octet-stream"), (HEADER_LENGTH, str(len(head)))],
            head + b"".join(blobs))


def model_metadata(name: str, signature: Signature) -> dict:
    """GET /v2/models/{name}: inputs and outputs with OIP datatypes; -1 for a free axis."""
    def port(p) -> dict:
        return {"name": p.name, "datatype": DATATYPE_OF.get(p.dtype or "", "BYTES"),
                "shape": [d if isinstance(d, int) and d > 0 else -1 for d in p.shape]}
    return {"name": name, "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": [port(p) for p in signature.inputs], "outputs": [port(p) for p in signature.outputs]}


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
