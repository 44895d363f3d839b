"""Seeded test models: same bytes for the same seed, and outputs that depend on the input."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from node.models import LIGHT_MODELS, seeded_model_bytes, seeded_model_path


def _run(model: bytes | str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("name", ["squeezenet", "shufflenet"])
def test_seeded_weights_make_outputs_depend_on_the_input(name, tmp_path):
    rng = np.random.default_rng(5)
    a, b = (rng.random((1, 3, 224, 224), dtype=np.float32) for _ in range(2))
    seeded = seeded_model_bytes(name, 0)
    onnx.checker.check_model(onnx.load_from_string(seeded))
    shipped = str(LIGHT_MODELS / f"light_{name}.onnx")
    # The shipped model hardly notices its input; the seeded one does, by far more than
    # any tolerance a buyer compares with (rtol 1e-3, atol 1e-4).
    assert np.abs(_run(shipped, a) - _run(shipped, b)).max() < 1e-6
    out_a, out_b = _run(seeded, a), _run(seeded, b)
    assert np.abs(out_a - out_b).max() > 1e-3
    assert np.isfinite(out_a).all() and out_a.max() < 0.99  # softmax not saturated
    # Same seed, same bytes (every process computes the same sha256); another seed differs.
    assert seeded_model_bytes(name, 0) == seeded
    assert seeded_model_bytes(name, 1) != seeded
    path = seeded_model_path(name, 0, directory=tmp_path)
    assert path.read_bytes() == seeded and seeded_model_path(name, 0, directory=tmp_path) == path


def test_unknown_architecture_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown architecture 'densenet121'"):
        seeded_model_path("densenet121", directory=tmp_path)
