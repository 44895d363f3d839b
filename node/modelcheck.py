"""Checks a model a buyer sent before the daemon loads it: run as a throwaway subprocess.

`python -m node.modelcheck MODEL.onnx [MAX_BYTES]` prints one JSON line: whether onnx and
onnxruntime accept the model, its inputs, and an upper bound on the memory one run
needs (every tensor shape inference can size, summed, at the model's own batch size).
A model that crashes or hangs the loader takes this process down, not the daemon.
"""

from __future__ import annotations

import json
import sys

import numpy as np

ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
MAX_OPSET = 23  # newest default-domain opset this onnxruntime runs


def _tensor_bytes(value_type, unknown_dim: int) -> tuple[int, bool]:
    tensor = value_type.tensor_type
    if not tensor.HasField("shape"):
        return 0, False
    count = 1
    for dim in tensor.shape.dim:
        if dim.HasField("dim_value"):
            if dim.dim_value < 0:
                return 0, False
            count *= dim.dim_value
        else:
            count *= unknown_dim
    return count * ELEMENT_BYTES.get(tensor.elem_type, 8), True


def check(path: str, max_bytes: int | None = None) -> dict:
    import onnx
    from onnx import shape_inference

    try:
        model = onnx.load(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the model's fault
        return {"ok": False, "code": "model-invalid", "error": f"not a valid ONNX file: {str(exc)[:300]}"}
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > MAX_OPSET:
            return {"ok": False, "code": "model-unsupported",
                    "error": f"opset {opset.version} is newer than this runtime supports ({MAX_OPSET})"}
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "code": "model-invalid", "error": f"not a valid ONNX model: {str(exc)[:300]}"}
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "code": "model-invalid", "error": f"shape inference failed: {str(exc)[:300]}"}
    graph = inferred.graph
    total = sum(int(np.prod(init.dims, dtype=np.float64)) * ELEMENT_BYTES.get(init.data_type, 8)
                for init in graph.initializer)
    for value in list(graph.value_info) + list(graph.output):
        size, _ = _tensor_bytes(value.type, 1)
        total += size
    if max_bytes is not None and total > max_bytes:
        # Refused before onnxruntime sees it: constant folding at load time would
        # allocate these tensors.
        return {"ok": False, "code": "too-large", "estimated_bytes": int(total),
                "error": f"model needs about {total / 2**20:.0f} MB per run; the limit is {max_bytes / 2**20:.0f} MB"}
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        inputs = [{"name": i.name, "type": i.type, "shape": [d if isinstance(d, int) else None for d in i.shape]}
                  for i in session.get_inputs()]
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "code": "model-unsupported", "error": f"onnxruntime cannot load it: {str(exc)[:300]}"}
    return {"ok": True, "inputs": inputs, "estimated_bytes": int(total)}


if __name__ == "__main__":
    print(json.dumps(check(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)), flush=True)
