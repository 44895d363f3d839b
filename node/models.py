"""Reference architectures with seeded random weights, made on demand and cached.

The `light_*` models that ship with the `onnx` package compute every weight from a
constant (ConstantOfShape, 0.02 everywhere), so their outputs barely depend on the input:
squeezenet answers 0.001 for each of its 1,000 classes whatever it is shown, and a
check that a provider's output "equals a local run" would pass for almost any output.
Here each such weight becomes a seeded random tensor (He-normal for convolution and
dense weights, small biases, batch-norm statistics near identity), so outputs depend on
the input and on the seed, and a wrong output is caught.

The bytes depend only on (architecture, seed) and the pinned numpy and onnx versions,
so every process of a devnet and every buyer computes the same sha256 for a model.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

LIGHT_MODELS = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
# densenet121 and inception_v1/v2 are left out: their light graphs give the same output
# for any input even with random weights (a constant stands where the image should flow).
ARCHITECTURES = ("squeezenet", "shufflenet", "resnet50", "bvlc_alexnet", "zfnet512", "vgg19")
DEFAULT_SEED = 0


def cache_dir() -> Path:
    """IDLEMESH_MODEL_CACHE, else $XDG_CACHE_HOME/idlemesh/models, else ~/.cache/idlemesh/models."""
    if os.environ.get("IDLEMESH_MODEL_CACHE"):
        return Path(os.environ["IDLEMESH_MODEL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "idlemesh" / "models"


def seeded_model_path(name: str, seed: int = DEFAULT_SEED, *, directory: Path | None = None) -> Path:
    """DIR/seed-S/NAME.onnx, written the first time it is asked for. Safe when several
    processes ask at once: each writes its own temporary file and renames it into place."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    path = (directory or cache_dir()) / f"seed-{seed}" / f"{name}.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    data = seeded_model_bytes(name, seed)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def seeded_model_bytes(name: str, seed: int = DEFAULT_SEED) -> bytes:
    model = onnx.load(str(LIGHT_MODELS / f"light_{name}.onnx"))
    _seed_weights(model.graph, seed, list_as_inputs=model.ir_version < 4)
    _scale_logits(model, seed)
    model.producer_name = "idlemesh-seeded-weights"
    model.doc_string = f"{name} (onnx light_{name} architecture) with seeded random weights, seed {seed}"
    return model.SerializeToString(deterministic=True)


def _seed_weights(graph: onnx.GraphProto, seed: int, *, list_as_inputs: bool) -> None:
    """Replace every constant weight of a Conv, Gemm or BatchNormalization with a seeded
    random initializer of the same shape; leave every other constant as it is. Before IR
    version 4 every initializer must also be listed as a graph input."""
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    initializers = {i.name: i for i in graph.initializer}
    replaced: dict[str, np.ndarray] = {}
    constant_nodes = []
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in initializers:
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(initializers[node.input[0]]))
        values = _weights_for(node.output[0], shape, consumers.get(node.output[0], []), seed)
        if values is not None:
            replaced[node.output[0]] = values
            constant_nodes.append(node)
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            values = _weights_for(init.name, tuple(init.dims), consumers.get(init.name, []), seed)
            if values is not None:
                replaced[init.name] = values
    for node in constant_nodes:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name not in replaced and i.name in used]
    dropped = {i.name for i in graph.initializer} - {i.name for i in kept} - set(replaced)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(values, name) for name, values in replaced.items())
    inputs = [i for i in graph.input if i.name not in dropped]
    if list_as_inputs:
        listed = {i.name for i in inputs}
        inputs += [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, values.shape)
                   for name, values in replaced.items() if name not in listed]
    del graph.input[:]
    graph.input.extend(inputs)


# Logits with this spread keep the softmax off its saturated corners: a different input
# moves the probabilities by far more than float noise.
TARGET_LOGIT_STD = 3.0
_LINEAR_PASSTHROUGH = ("Relu", "GlobalAveragePool", "AveragePool", "Dropout", "Flatten", "Reshape")


def _scale_logits(model: onnx.ModelProto, seed: int) -> None:
    """Deep random networks without trained batch-norm statistics blow up (resnet50's
    logits spread over thousands) and saturate the softmax. Scale the last weighted layer
    before the softmax by a power of two, measured on a seeded input: positive scaling
    passes through ReLU and pooling unchanged, and a power of two keeps the bytes the
    same on any CPU whose float results differ in the last bits."""
    import onnxruntime as ort

    graph = model.graph
    softmax = next((n for n in graph.node if n.op_type == "Softmax"), None)
    if softmax is None:
        return
    producers = {out: node for node in graph.node for out in node.output}
    node = producers.get(softmax.input[0])
    while node is not None and node.op_type in _LINEAR_PASSTHROUGH:
        node = producers.get(node.input[0])
    if node is None or node.op_type not in ("Conv", "Gemm"):
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(softmax.input[0], onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {}
    rng = np.random.default_rng([seed, 1])
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        feed[i.name] = rng.random(shape, dtype=np.float32)
    logits = session.run(None, feed)[-1]
    spread = float(np.std(logits))
    if not np.isfinite(spread) or spread == 0.0:
        return
    factor = np.float32(2.0 ** round(np.log2(TARGET_LOGIT_STD / spread)))
    initializers = {i.name: i for i in graph.initializer}
    for name in node.input[1:3]:
        if name in initializers:
            init = initializers[name]
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, name))


def _weights_for(name: str, shape: tuple[int, ...], uses: list[tuple[onnx.NodeProto, int]],
                 seed: int) -> np.ndarray | None:
    if len(uses) != 1:
        return None
    node, index = uses[0]
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    normal = lambda std: rng.normal(0.0, std, size=shape).astype(np.float32)  # noqa: E731
    if node.op_type == "Conv" and index == 1:
        return normal(np.sqrt(2.0 / max(1, int(np.prod(shape[1:])))))
    if node.op_type == "Gemm" and index == 1:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        fan_in = shape[1] if trans_b else shape[0]
        return normal(np.sqrt(2.0 / max(1, fan_in)))
    if node.op_type in ("Conv", "Gemm") and index == 2:
        return normal(0.05)
    if node.op_type == "BatchNormalization" and 1 <= index <= 4:
        if index == 1:   # scale
            return (1.0 + normal(0.1)).astype(np.float32)
        if index == 4:   # variance: positive
            return rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
        return normal(0.1)  # bias, mean
    return None
