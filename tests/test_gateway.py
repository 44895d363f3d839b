"""Buyers as applications: the warm Client and the Open Inference Protocol gateway, on a
real devnet, driven by an OIP client library that is not ours (tritonclient)."""

from __future__ import annotations

import json
import re
import sqlite3
import sys

import numpy as np
import onnxruntime as ort
import pytest
import trio

from devnet.launcher import open_devnet
from node.calibrate import reference_model_path
from node.client import Client, ClientError, InputError, SyncClient
from node.gateway import Gateway
from node.oip import HEADER_LENGTH, OIPError, encode_infer_response, parse_infer_request
from tests.processes import start_node

MODEL = reference_model_path("squeezenet")  # seeded weights: outputs depend on the input


def local_run(x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    return session.run(None, {"data_0": x})[0]


def ledger_status(home) -> dict[str, str]:
    db = sqlite3.connect(home / "ledger.sqlite")
    try:
        return dict(db.execute("SELECT receipt_id, status FROM receipts").fetchall())
    finally:
        db.close()


def journal_jobs(home) -> int:
    db = sqlite3.connect(home / "jobs.sqlite")
    try:
        return db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    finally:
        db.close()


# --- the protocol's encoding (pure) ---------------------------------------------------

def binary_request(inputs: dict[str, np.ndarray], **doc) -> tuple[bytes, int]:
    items, blobs = [], []
    for name, a in inputs.items():
        blob = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
        items.append({"name": name, "shape": list(a.shape), "datatype": {"float32": "FP32", "int64": "INT64",
                                                                         "bool": "BOOL"}[a.dtype.name],
                      "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    head = json.dumps({"inputs": items, **doc}).encode()
    return head + b"".join(blobs), len(head)


def test_oip_requests_parse_from_json_and_binary_alike():
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    flags = np.array([True, False, True])
    as_json = json.dumps({"id": "r1", "inputs": [
        {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": x.tolist()},
        {"name": "f", "shape": [3], "datatype": "BOOL", "data": flags.tolist()}]}).encode()
    body, head = binary_request({"x": x, "f": flags}, id="r1")
    for parsed in (parse_infer_request(as_json, None), parse_infer_request(body, head)):
        assert parsed.id == "r1" and parsed.outputs is None
        np.testing.assert_array_equal(parsed.inputs["x"], x)
        np.testing.assert_array_equal(parsed.inputs["f"], flags)
        assert parsed.inputs["x"].dtype == np.float32 and parsed.inputs["f"].dtype == np.bool_


@pytest.mark.parametrize("body, head, words", [
    (b"{not json", None, "not JSON"),
    (b'{"inputs": []}', None, "non-empty 'inputs'"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "STRING", "data": [1, 2]}]}', None, "datatype"),
    (b'{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}', None, "do not fill"),
    (b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": []}]}', None, "non-negative"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]}', None, "does not fit"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32"}]}', None, "give 'data'"),
    # 2**62 x 4 wraps to 0 in int64: an empty list must not pass for it
    (b'{"inputs": [{"name": "x", "shape": [4611686018427387904, 4], "datatype": "FP32", "data": []}]}', None,
     "0 values do not fill"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}',
     b"\x00" * 4, "runs past"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}',
     b"\x00" * 4, "do not make"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}',
     b"\x00" * 9, "unclaimed"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}', 999, "outside the body"),
])
def test_bad_oip_requests_get_a_400_that_says_what_is_wrong(body, head, words):
    # `head`: None for plain JSON; bytes of binary data to follow the JSON; or a header
    # length to send as it is.
    if isinstance(head, bytes):
        body, head = body + head, len(body)
    with pytest.raises(OIPError) as caught:
        parse_infer_request(body, head)
    assert caught.value.status == 400 and words in str(caught.value)


def test_oip_responses_carry_binary_outputs_after_the_json_header():
    outputs = {"y": np.arange(4, dtype=np.float32).reshape(2, 2), "n": np.array([3], dtype=np.int64)}
    request = parse_infer_request(json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                                          "data": [0]}], "outputs": [
        {"name": "y", "parameters": {"binary_data": True}}, {"name": "n"}]}).encode(), None)
    headers, body = encode_infer_response("m", request, outputs, {"idlemesh_price": 1.5})
    length = int(dict(headers)[HEADER_LENGTH])
    doc = json.loads(body[:length])
    assert doc["parameters"] == {"idlemesh_price": 1.5}
    y, n = doc["outputs"]
    assert y["parameters"]["binary_data_size"] == 16 and n["data"] == [3] and n["datatype"] == "INT64"
    np.testing.assert_array_equal(np.frombuffer(body[length:], dtype="<f4").reshape(2, 2), outputs["y"])
    with pytest.raises(OIPError, match="no output 'z'"):
        encode_infer_response("m", parse_infer_request(
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0]}], "outputs": [{"name": "z"}]}',
            None), outputs, {})


# --- a real devnet ------------------------------------------------------------------

def through_tritonclient(url: str, inputs: list[np.ndarray]) -> dict:
    """An off-the-shelf OIP client, as an application would use it (blocking, in a thread)."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url=url)
    seen: dict = {"live": client.is_server_live(), "ready": client.is_server_ready(),
                  "model_ready": client.is_model_ready("squeezenet"),
                  "metadata": client.get_model_metadata("squeezenet"), "answers": []}
    for i, x in enumerate(inputs):
        tensor = httpclient.InferInput("data_0", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=i % 2 == 0)  # the binary extension, then plain JSON
        wanted = [httpclient.InferRequestedOutput("softmaxout_1", binary_data=i % 2 == 0)]
        result = client.infer("squeezenet", [tensor], outputs=wanted)
        seen["answers"].append((result.as_numpy("softmaxout_1"), result.get_response()["parameters"]))
    for name, shape in (("squeezenet", [1, 3, 224, 225]), ("no-such-model", [1, 3, 224, 224])):
        wrong = httpclient.InferInput("data_0", shape, "FP32")
        wrong.set_data_from_numpy(np.zeros(shape, dtype=np.float32))
        try:
            client.infer(name, [wrong])
        except InferenceServerException as exc:
            seen[name] = (exc.status(), exc.message())
    client.close()
    return seen


async def raw_http(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        reply = b""
        with trio.move_on_after(10):
            while chunk := await stream.receive_some(65536):
                reply += chunk
    return reply


async def test_an_oip_client_runs_inference_through_the_gateway_and_a_warm_client_serves_many_at_once(tmp_path):
    rng = np.random.default_rng(11)
    inputs = [rng.random((1, 3, 224, 224), dtype=np.float32) for _ in range(3)]
    expected = [local_run(x) for x in inputs]
    assert not np.allclose(expected[0], expected[1])  # the check below can fail
    async with open_devnet(2, root=tmp_path / "net") as net:
        home = tmp_path / "gateway"
        client = Client(home, [net.bootstrap_addr])
        model = client.add_model(MODEL)
        async with client, trio.open_nursery() as nursery:
            gateway = Gateway(client, {"squeezenet": model})
            host, port = await nursery.start(gateway.serve, "127.0.0.1", 0)
            seen = await trio.to_thread.run_sync(through_tritonclient, f"{host}:{port}", inputs)

            # A wrong input is the buyer's own error, found before anything is sent:
            # no journal row, no provider asked.
            jobs_before = journal_jobs(home)
            with pytest.raises(InputError, match="axis 2 must be 224, got 32"):
                await client.infer(model, {"data_0": np.zeros((1, 3, 32, 224), dtype=np.float32)})
            assert journal_jobs(home) == jobs_before

            # Many requests in flight on one warm client, each its own verified job.
            answers: list = [None] * 6

            async def one(i: int) -> None:
                answers[i] = await client.infer(model, {"data_0": inputs[i % 3]}, deadline_ms=60_000)

            async with trio.open_nursery() as requests:
                for i in range(6):
                    requests.start_soon(one, i)
            # Paid requests leave nothing in the journal: a gateway's does not grow per request.
            await client.drain()
            assert journal_jobs(home) == 0

            # Bad HTTP and bad JSON get the protocol's error shape; the gateway goes on.
            garbage = await raw_http(port, b"\x16\x03\x01 not http at all\r\n\r\n")
            bad_json = await raw_http(port, b"POST /v2/models/squeezenet/infer HTTP/1.1\r\nhost: x\r\n"
                                            b"content-length: 5\r\nconnection: close\r\n\r\n{nope")
            still = await raw_http(port, b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            nursery.cancel_scope.cancel()

    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert seen["metadata"]["inputs"] == [{"name": "data_0", "datatype": "FP32", "shape": [1, 3, 224, 224]}]
    receipts = ledger_status(home)
    for (outputs, params), want in zip(seen["answers"], expected):
        np.testing.assert_allclose(outputs, want, rtol=1e-5, atol=1e-6)
        # The receipt rides in the response: paid for once in the gateway's ledger.
        assert receipts[params["idlemesh_receipt_id"]] == "accepted"
        assert params["idlemesh_energy_source"] == "declared" and params["idlemesh_energy_j"] > 0
        assert params["idlemesh_provider"] in {c.ready["peer_id"] for c in net.providers}
    status, message = seen["squeezenet"]
    assert status == "400" and "axis 3 must be 224, got 225" in message
    assert seen["no-such-model"][0] == "404" and "unknown model 'no-such-model'" in seen["no-such-model"][1]

    assert len({a.job_id for a in answers}) == 6
    for i, answer in enumerate(answers):
        np.testing.assert_allclose(answer.outputs["softmaxout_1"], expected[i % 3], rtol=1e-5, atol=1e-6)
        assert receipts[answer.job_id] == "accepted" and answer.receipt.job_id == answer.job_id

    assert garbage.startswith(b"HTTP/1.1 400") and b'"error"' in garbage
    assert bad_json.startswith(b"HTTP/1.1 400") and b"not JSON" in bad_json
    assert still.startswith(b"HTTP/1.1 200")


async def test_the_sync_client_serves_threaded_code_and_submit_takes_a_batch_of_different_inputs(tmp_path):
    x = np.random.default_rng(5).random((1, 3, 224, 224), dtype=np.float32)
    rows = np.random.default_rng(6).random((3, 3, 224, 224), dtype=np.float32)
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i in range(2):
        np.save(folder / f"img-{i}.npy", rows[i:i + 1])
    np.savez(tmp_path / "rows.npz", data_0=rows)
    async with open_devnet(1, root=tmp_path / "net") as net:
        submitted = {}
        for name, source in (("dir", ["--inputs", str(folder)]),
                             ("rows", ["--inputs", str(tmp_path / "rows.npz"), "--rows-per-job", "1"])):
            done = await trio.run_process(
                [sys.executable, "-m", "node.cli", "submit", str(MODEL), *source, "--bootstrap", net.bootstrap_addr,
                 "--home", str(tmp_path / "cli"), "--out", str(tmp_path / name), "--json"],
                capture_stdout=True, capture_stderr=True, check=False)
            assert done.returncode == 0, done.stderr.decode()
            submitted[name] = json.loads(done.stdout)

        def threaded() -> tuple:
            with SyncClient(tmp_path / "sync", [net.bootstrap_addr]) as client:
                first = client.infer(MODEL, {"data_0": x})
                try:
                    client.infer(MODEL, {"data": x})
                except InputError as exc:
                    wrong = str(exc)
            return first, wrong

        first, wrong = await trio.to_thread.run_sync(threaded)
    # One job per input, in input order, each with its own outputs.
    for name, count in (("dir", 2), ("rows", 3)):
        jobs = sorted(submitted[name]["jobs"], key=lambda job: job["index"])
        assert [job["state"] for job in jobs] == ["settled"] * count
        for i, job in enumerate(jobs):
            np.testing.assert_allclose(np.load(job["output_path"]), local_run(rows[i:i + 1]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first.outputs["softmaxout_1"], local_run(x), rtol=1e-5, atol=1e-6)
    assert "model takes inputs ['data_0'], got ['data']" in wrong
    with pytest.raises(ClientError, match="bootstrap"):
        SyncClient(tmp_path / "sync2", ["/ip4/127.0.0.1/tcp/1"])


def test_a_batch_of_different_inputs_resumes_with_each_jobs_own_inputs(tmp_path):
    from node.buyer import SubmitSpec, resume_spec
    from node.journal import Journal

    sets = [{"data_0": np.full((1, 3, 224, 224), i, dtype=np.float32)} for i in range(3)]
    spec = SubmitSpec(model_path=MODEL, inputs={}, job_inputs=sets, count=0, bootstrap=[], home=tmp_path,
                      out_dir=tmp_path / "out")
    assert spec.count == 3
    journal = Journal(tmp_path)
    journal.new_batch(model_path=MODEL, model_sha256="0" * 64, inputs=spec.journalled_inputs(), count=spec.count,
                      max_price=1.0, solver="optimal", out_dir=spec.out_dir, now_ms=1)
    journal.close()
    resumed = resume_spec(tmp_path, ["/ip4/127.0.0.1/tcp/1/p2p/x"])
    assert resumed.count == 3 and resumed.inputs == {}
    for mine, theirs in zip(sets, resumed.job_inputs):
        np.testing.assert_array_equal(mine["data_0"], theirs["data_0"])


class _NoMarket:
    """The gateway's HTTP layer alone: a client with no market behind it."""

    p2p = None
    unreachable: dict = {}
    bootstrap = ["/ip4/127.0.0.1/tcp/1/p2p/x"]
    max_price = 1.0
    asked: list[dict] = []

    def candidates(self, sha):
        raise ClientError("no offers")

    async def infer(self, *args, **terms):
        self.asked.append(terms)
        raise ClientError("no provider offers model squeezenet")


async def _exchange(requests: bytes) -> bytes:
    from trio.testing import memory_stream_pair

    from node.client import Model

    model = Model.from_path(MODEL, "squeezenet")
    ours, theirs = memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Gateway(_NoMarket(), {"squeezenet": model}).serve_connection, ours)
        await theirs.send_all(requests)
        reply = b""
        while chunk := await theirs.receive_some(65536):
            reply += chunk
    return reply


async def test_the_gateways_http_keeps_connections_alive_and_refuses_what_it_cannot_take():
    get = b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n"
    meta = b"GET /v2/models/squeezenet/versions/1 HTTP/1.1\r\nhost: x\r\n\r\n"
    infer = (b"POST /v2/models/squeezenet/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 76\r\n\r\n"
             b'{"inputs":[{"name":"data_0","shape":[1],"datatype":"FP32","data":[0.5]}]}   ')
    huge = b"POST /v2/models/squeezenet/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 999999999\r\n\r\n"
    reply = await _exchange(get + meta + b"DELETE /v2 HTTP/1.1\r\nhost: x\r\n\r\n" + infer + huge)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)
    # Five requests on one connection, answered in order; the one whose body is too big
    # is refused before it is read, and the connection closes after it.
    assert statuses == [b"200", b"200", b"405", b"503", b"413"]
    assert b'"platform":"onnxruntime_onnx"' in reply and b"no provider offers model squeezenet" in reply
    assert reply.rstrip().endswith(b'"}') and b"connection: close" in reply.lower()
    ready = await _exchange(b"GET /v2/health/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert ready.startswith(b"HTTP/1.1 503") and b'"ready":false' in ready


def test_inputs_too_big_for_one_job_are_a_local_error_that_says_how_to_split_them():
    from node.client import Model, Work

    model = Model.from_path(MODEL)
    big = np.zeros((70, 1 << 18), dtype=np.float32)  # 70 MiB in one tensor
    with pytest.raises(InputError, match=r"input data_0 is 70.0 MiB; .* at most 64 MiB per tensor: split"):
        Work.prepare(model, {"data_0": big}, max_price=1.0, timeout_s=10)
    many = {f"x{i}": np.zeros(1, dtype=np.float32) for i in range(17)}
    with pytest.raises(InputError, match="17 inputs; a job carries at most 16"):
        Work.prepare(model, many, max_price=1.0, timeout_s=10)


async def _start_gateway(home, bootstrap: str, env: dict | None = None):
    return await start_node("gateway", "--listen", "127.0.0.1:0", "--model", f"squeezenet={MODEL}",
                            "--bootstrap", bootstrap, "--home", str(home), "--json", env=env)


def _rows(db_path, query: str, *args) -> list:
    db = sqlite3.connect(db_path)
    try:
        return db.execute(query, args).fetchall()
    finally:
        db.close()


async def test_a_gateway_killed_mid_request_settles_what_was_paid_and_nothing_else_when_it_comes_back(tmp_path):
    x = np.random.default_rng(9).random((1, 3, 224, 224), dtype=np.float32)
    body, head = binary_request({"data_0": x})
    request = (b"POST /v2/models/squeezenet/infer HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
               + f"content-length: {len(body)}\r\n{HEADER_LENGTH}: {head}\r\n\r\n".encode() + body)
    async with open_devnet(1, root=tmp_path / "net") as net:
        provider_ledger = net.providers[0].home / "ledger.sqlite"
        for point, paid in (("buyer-after-ack", True), ("buyer-after-result", False)):
            home = tmp_path / point
            gateway, ready = await _start_gateway(home, net.bootstrap_addr, {"IDLEMESH_FAULT": f"{point}:kill"})
            reply = await raw_http(int(ready["url"].rsplit(":", 1)[1]), request)
            assert await gateway.wait() < 0 and reply == b""  # killed mid-request: no answer
            ((job_id, state),) = _rows(home / "jobs.sqlite", "SELECT job_id, state FROM jobs")
            assert state == "requested"
            # The same home opened again: what the kill left is settled before it serves anyone.
            async with Client(home, [net.bootstrap_addr]):
                pass
            ours = dict(_rows(home / "ledger.sqlite", "SELECT receipt_id, status FROM receipts"))
            theirs = dict(_rows(provider_ledger, "SELECT receipt_id, status FROM receipts WHERE receipt_id = ?",
                                job_id))
            journal = _rows(home / "jobs.sqlite", "SELECT state, error FROM jobs")
            if paid:
                # Paid and acked before the kill: both ledgers say accepted, the ack is
                # confirmed, and the journal keeps nothing.
                assert ours == {job_id: "accepted"} and theirs == {job_id: "accepted"} and journal == []
                assert _rows(home / "ledger.sqlite", "SELECT receipt_id FROM acks_delivered") == [(job_id,)]
            else:
                # Killed with the result in hand, before paying: nothing was paid on either side.
                assert ours == {} and theirs == {job_id: "unacked"}
                assert journal == [("failed", "the client stopped before this request was paid for; nothing was paid")]


async def test_a_request_may_lower_the_gateways_price_ceiling_but_not_raise_it():
    def infer(price: float, last: bool = False) -> bytes:
        body = json.dumps({"inputs": [{"name": "data_0", "shape": [1], "datatype": "FP32", "data": [0.5]}],
                           "parameters": {"idlemesh_max_price": price}}).encode()
        return (b"POST /v2/models/squeezenet/infer HTTP/1.1\r\nhost: x\r\n" + (b"connection: close\r\n" if last else b"")
                + f"content-length: {len(body)}\r\n\r\n".encode() + body)

    _NoMarket.asked.clear()
    await _exchange(infer(0.25) + infer(50.0, last=True))
    assert [terms["max_price"] for terms in _NoMarket.asked] == [0.25, 1.0]


async def test_a_failure_inside_one_request_is_a_500_and_the_gateway_goes_on(monkeypatch):
    async def broken(*args, **terms):
        raise RuntimeError("a bug")

    monkeypatch.setattr(_NoMarket, "infer", broken)
    body = b'{"inputs":[{"name":"data_0","shape":[1],"datatype":"FP32","data":[0.5]}]}'
    reply = await _exchange(b"POST /v2/models/squeezenet/infer HTTP/1.1\r\nhost: x\r\n"
                            + f"content-length: {len(body)}\r\n\r\n".encode() + body
                            + b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", reply) == [b"500", b"200"]
    assert b"internal error: RuntimeError: a bug" in reply
