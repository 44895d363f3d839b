"""A corpus of models a hostile or careless buyer might send (built with onnx.helper)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from node.calibrate import reference_model_path


def _relu_model(opset: int) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Relu", ["X"], ["Y"])], "relu",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def huge_shape_model() -> onnx.ModelProto:
    """Valid and tiny on disk, but its output is declared 100,000 x 100,000 floats (40 GB)."""
    shape = numpy_helper.from_array(np.array([100_000, 100_000], dtype=np.int64), "shape")
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
             helper.make_node("Add", ["X", "s"], ["Y"])]
    graph = helper.make_graph(nodes, "huge", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])], [shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def write_corpus(root: Path) -> dict[str, tuple[Path, set[str]]]:
    """name -> (file, the error codes a provider may answer with)."""
    root.mkdir(parents=True, exist_ok=True)
    good = reference_model_path("squeezenet").read_bytes()
    files = {
        "truncated": (good[: len(good) // 2], {"model-invalid"}),
        "garbage": (bytes(range(256)) * 64, {"model-invalid"}),
        "future-opset": (_relu_model(999).SerializeToString(), {"model-unsupported"}),
        "huge-shapes": (huge_shape_model().SerializeToString(), {"too-large"}),
    }
    out = {}
    for name, (data, codes) in files.items():
        path = root / f"{name}.onnx"
        path.write_bytes(data)
        out[name] = (path, codes)
    return out
