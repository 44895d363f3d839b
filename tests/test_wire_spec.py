"""spec/wire.md stays true: its vectors are what the code writes, the code accepts and
refuses them as the spec says, its constants are the code's, it names every message,
and clients written from it alone (spec/independent_client.py, and the JavaScript
spec/independent_client.mjs where Node.js is installed) pass the vectors."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import codec
from protocol.errors import DecodeError, ExpiredError, SignatureError
from protocol.job import MAX_CLOCK_SKEW_MS
from protocol.messages import open_job_request, open_offer
from protocol.settlement import OPENERS
from protocol.signing import DOMAINS
from protocol.stream import ERROR_CODES, decode_message, frame_length

SPEC = Path(__file__).resolve().parents[1] / "spec"
VECTORS = SPEC / "vectors"
TEXT = (SPEC / "wire.md").read_text()


def load(name: str):
    return json.loads((VECTORS / name).read_text())


def independent_client():
    spec = importlib.util.spec_from_file_location("independent_client", SPEC / "independent_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_vectors_are_what_the_code_writes(tmp_path):
    sys.path.insert(0, str(SPEC))
    try:
        make_vectors = importlib.import_module("make_vectors")
    finally:
        sys.path.remove(str(SPEC))
    for path in make_vectors.write(tmp_path):
        assert path.read_text() == (VECTORS / path.name).read_text(), \
            f"{path.name} changed: the wire changed; run python spec/make_vectors.py and update spec/wire.md"


def open_as(msg_type: str, envelope: bytes, now_ms: int):
    if msg_type == "offer":
        return open_offer(envelope, now_ms=now_ms, max_skew_ms=MAX_CLOCK_SKEW_MS)
    if msg_type == "job-request":
        return open_job_request(envelope)[1]
    return OPENERS[msg_type](envelope)[1]


def category(exc: Exception) -> str:
    text = str(exc)
    if isinstance(exc, SignatureError):
        return "signature"
    if isinstance(exc, ExpiredError):
        return "expired"
    if "not canonical" in text:
        return "canonical"
    if "exceeds the cap" in text:
        return "size"
    if ".type: expected" in text:
        return "type"
    if ".v: expected" in text:
        return "version"
    return "field"


def test_the_reference_code_accepts_every_positive_vector_and_refuses_every_negative_one_as_the_spec_says():
    envelopes = load("envelopes.json")
    assert {v["type"] for v in envelopes} == set(DOMAINS)  # one vector per signed type
    for v in envelopes:
        message = open_as(v["type"], bytes.fromhex(v["envelope_hex"]), v["now_ms"])
        assert codec.encode(message.to_wire()).hex() == v["body_hex"]
    for v in load("negative.json"):
        try:
            open_as(v["type"], bytes.fromhex(v["envelope_hex"]), v["now_ms"])
        except DecodeError as exc:
            assert category(exc) == v["error"], (v["name"], exc)
        else:
            raise AssertionError(f"accepted: {v['name']}")
    for v in load("canonical.json")["bad"]:
        try:
            codec.check_canonical(bytes.fromhex(v["msgpack_hex"]))
        except DecodeError:
            continue
        raise AssertionError(f"non-canonical accepted: {v['name']}")
    kinds = set()
    for v in load("frames.json"):
        data = bytes.fromhex(v["frame_hex"])
        message = decode_message(data[4:], max_bytes=1 << 24, expect=(v["kind"],))
        kinds.add(message.kind)
    for v in load("negative_frames.json"):
        data = bytes.fromhex(v["frame_hex"])
        try:
            length = frame_length(data[:4], max_bytes=v["cap"])
            decode_message(data[4:4 + length], max_bytes=v["cap"], expect=tuple(v["expect"]))
        except DecodeError as exc:
            got = "kind" if "frame.kind: expected" in str(exc) else category(exc)
            assert got == v["error"], (v["name"], exc)
        else:
            raise AssertionError(f"frame accepted: {v['name']}")
    assert kinds == {"submit", "need-model", "model", "accepted", "result", "error", "ack", "settled", "offers",
                     "settle-acks", "settle-held"}


def test_a_client_written_from_the_spec_alone_passes_every_vector(tmp_path):
    source = (SPEC / "independent_client.py").read_text()
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(source))
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in getattr(node, "names", [])}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"protocol", "node", "matcher", "devnet"}, imported
    # -I: isolated from this repository's paths, run from elsewhere.
    done = subprocess.run([sys.executable, "-I", str(SPEC / "independent_client.py"), str(VECTORS)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"failures": 0}


@pytest.mark.skipif(shutil.which("node") is None, reason="no Node.js here for the JavaScript client")
def test_a_javascript_client_written_from_the_spec_alone_passes_every_vector(tmp_path):
    """spec/independent_client.mjs: Node's standard library only, msgpack by hand."""
    assert "import" not in "".join(line for line in (SPEC / "independent_client.mjs").read_text().splitlines()
                                   if line.startswith("import") and "node:" not in line)
    done = subprocess.run(["node", str(SPEC / "independent_client.mjs"), str(VECTORS)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"failures": 0}


def test_every_constant_the_spec_names_is_the_code_constant():
    section = TEXT.split("## 13. Constants", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| `(.+?)` \| `([\w.]+)` \|$", section, re.M)
    assert len(rows) >= 40
    for name, value, module in rows:
        assert getattr(importlib.import_module(module), name) == ast.literal_eval(value), (name, module)


def test_the_spec_names_every_signed_type_frame_and_error_code():
    for msg_type, domain in DOMAINS.items():
        assert f"`{msg_type}`" in TEXT and domain.decode().replace("\0", "\\0") in TEXT, msg_type
    for code in ERROR_CODES:
        assert f"`{code}`" in TEXT, code
    for kind in ("submit", "need-model", "model", "accepted", "result", "error", "ack", "settled", "offers",
                 "settle-acks", "settle-held"):
        assert f"| `{kind}` |" in TEXT, kind


def containers(inner):
    return st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=8), inner, max_size=20)


scalars = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40) | st.binary(max_size=300))
values = st.recursive(scalars, containers, max_leaves=60)


@settings(max_examples=300, deadline=None)
@given(values)
def test_one_value_has_one_canonical_encoding_and_every_other_is_refused(value):
    canonical = codec.encode(value)
    codec.check_canonical(canonical)
    assert independent_client().encode(value) == canonical  # the spec's rules, written twice, agree
    # The same value in msgpack-python's other forms (maps in insertion order, float32)
    # decodes to the same value, but is refused unless it is the same bytes.
    for options in ({"use_bin_type": True, "use_single_float": True}, {"use_bin_type": True}):
        try:
            other = msgpack.packb(value, **options)
        except OverflowError:  # too big for a float32
            continue
        if other == canonical or msgpack.unpackb(other, raw=False) != value:
            continue  # the same bytes, or (float32 rounding) another value
        try:
            codec.check_canonical(other)
        except DecodeError:
            continue
        raise AssertionError(f"accepted a second encoding of {value!r:.60}")
