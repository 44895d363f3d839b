"""`idlemesh gateway`: the Open Inference Protocol v2 REST API over the market, so that
OIP clients (tritonclient, KServe's and MLServer's) run inference on idlemesh unchanged.

HTTP/1.1 comes from h11 on trio, directly. Why not hypercorn's trio worker: this server
has seven fixed routes and one job per request; an ASGI layer (hypercorn, plus a
framework or hand-written ASGI routing) would add a dependency tree (h2, priority,
wsproto, taskgroup) and a per-request translation for nothing we use. h11 is the parser
hypercorn itself uses, it is already pinned, and it runs in this process's trio loop
next to the warm Client, so a request reaches the market without a thread hop.

Every infer request is one job placed by the Client (journal, ledger, exactly-once, as
`submit`); the receipt comes back in the response's parameters and headers.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from dataclasses import dataclass
from functools import partial
from urllib.parse import unquote, urlsplit

import h11
import trio

from .client import Client, ClientError, InputError, Model
from .oip import (HEADER_LENGTH, MAX_BODY_BYTES, PARAMETER_PREFIX, OIPError, encode_infer_response, error_body,
                  model_metadata, parse_infer_request)

log = logging.getLogger("idlemesh.gateway")
try:
    __version__ = importlib.metadata.version("idlemesh")
except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
    __version__ = "0"
IDLE_KEEPALIVE_S = 300.0  # a kept-alive connection with no request for this long is closed
READ_TIMEOUT_S = 60.0     # the rest of a request, once it has begun
RECEIVE_CHUNK = 256 * 1024
MAX_HEADER_BYTES = 64 * 1024


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, as `--listen` and `devnet up --gateway` take it; ValueError says the form."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text}: give HOST:PORT, e.g. 127.0.0.1:8000")
    return host, int(port)


@dataclass
class Reply:
    status: int
    body: bytes
    headers: list[tuple[str, str]]

    @classmethod
    def json(cls, status: int, doc: dict) -> "Reply":
        return cls(status, json.dumps(doc, separators=(",", ":")).encode(), [("content-type", "application/json")])

    @classmethod
    def error(cls, status: int, message: str) -> "Reply":
        return cls(status, error_body(message), [("content-type", "application/json")])


class Gateway:
    """Routes OIP requests to `client`; `models` are the names it serves."""

    def __init__(self, client: Client, models: dict[str, Model]):
        self.client = client
        self.models = models

    # --- HTTP -------------------------------------------------------------------------

    async def serve(self, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; `task_status.started` gets the bound (host, port)."""
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, self.serve_connection, port, host=host))
            task_status.started(listeners[0].socket.getsockname()[:2])

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            while True:
                reply = await self._read_and_route(conn, stream)
                if reply is None:
                    return
                await self._send(conn, stream, reply)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return  # a reply sent before the body was read, or a client closing
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError) as exc:
            log.debug("connection ended: %s", exc)
        finally:
            with trio.move_on_after(1):
                await stream.aclose()

    async def _next_event(self, conn: h11.Connection, stream, timeout_s: float):
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            with trio.fail_after(timeout_s):
                conn.receive_data(await stream.receive_some(RECEIVE_CHUNK))

    async def _read_and_route(self, conn: h11.Connection, stream) -> Reply | None:
        """The reply to the next request; None when the connection is done with."""
        try:
            event = await self._next_event(conn, stream, IDLE_KEEPALIVE_S)
        except trio.TooSlowError:
            return None
        except h11.RemoteProtocolError as exc:
            return Reply.error(exc.error_status_hint, f"malformed HTTP: {exc}")
        if not isinstance(event, h11.Request):
            return None
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return Reply.error(413, f"a body of {length} bytes is over this gateway's {MAX_BODY_BYTES} bytes")
        body = bytearray()
        try:
            while True:
                part = await self._next_event(conn, stream, READ_TIMEOUT_S)
                if isinstance(part, h11.Data):
                    body += part.data
                    if len(body) > MAX_BODY_BYTES:
                        return Reply.error(413, f"the body is over this gateway's {MAX_BODY_BYTES} bytes")
                elif isinstance(part, h11.EndOfMessage):
                    break
                else:
                    return None
        except trio.TooSlowError:
            return Reply.error(408, f"the request body did not arrive within {READ_TIMEOUT_S:g} s")
        except h11.RemoteProtocolError as exc:
            return Reply.error(exc.error_status_hint, f"malformed HTTP: {exc}")
        try:
            return await self.route(event.method.decode(), event.target.decode("latin-1"), headers, bytes(body))
        except OIPError as exc:
            return Reply.error(exc.status, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug of ours: one 500, never the whole gateway
            log.exception("request %s %s failed", event.method.decode(), event.target.decode("latin-1"))
            return Reply.error(500, f"internal error: {type(exc).__name__}: {exc}")

    async def _send(self, conn: h11.Connection, stream, reply: Reply) -> None:
        headers = [*reply.headers, ("content-length", str(len(reply.body))), ("server", f"idlemesh/{__version__}")]
        if conn.their_state is not h11.DONE:
            headers.append(("connection", "close"))  # the body was not read: the connection cannot go on
        data = conn.send(h11.Response(status_code=reply.status, headers=headers))
        data += conn.send(h11.Data(data=reply.body)) if reply.body else b""
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)

    # --- OIP ---------------------------------------------------------------------------

    async def route(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Reply:
        parts = [unquote(p) for p in urlsplit(target).path.strip("/").split("/")]
        if not parts or parts[0] != "v2":
            raise OIPError(404, f"no route {target}: the Open Inference Protocol lives under /v2")
        rest = parts[1:]
        if rest == [] and method == "GET":
            return Reply.json(200, {"name": "idlemesh", "version": __version__,
                                    "extensions": ["binary_tensor_data"]})
        if rest == ["health", "live"] and method == "GET":
            return Reply.json(200, {"live": True})
        if rest == ["health", "ready"] and method == "GET":
            ready = self.client.p2p is not None and len(self.client.unreachable) < len(self.client.bootstrap)
            return Reply.json(200 if ready else 503, {"ready": ready})
        if len(rest) >= 2 and rest[0] == "models":
            name, tail = rest[1], rest[2:]
            if len(tail) >= 2 and tail[0] == "versions":
                if tail[1] != "1":
                    raise OIPError(404, f"model {name} has one version, 1 (asked for {tail[1]})")
                tail = tail[2:]
            model = self.models.get(name)
            if model is None:
                raise OIPError(404, f"unknown model {name!r}; this gateway serves {', '.join(sorted(self.models))}")
            if tail == [] and method == "GET":
                return Reply.json(200, model_metadata(name, model.signature))
            if tail == ["ready"] and method == "GET":
                ready = self.offered(model)
                return Reply.json(200 if ready else 503, {"name": name, "ready": ready})
            if tail == ["infer"] and method == "POST":
                return await self.infer(name, model, headers, body)
        raise OIPError(404 if method in ("GET", "POST") else 405, f"no route {method} {target}")

    def offered(self, model: Model) -> bool:
        """Whether some provider in the book runs `model` now."""
        try:
            return bool(self.client.candidates(model.sha256))
        except ClientError:
            return False

    async def infer(self, name: str, model: Model, headers: dict[str, str], body: bytes) -> Reply:
        length = headers.get(HEADER_LENGTH)
        if length is not None and not length.isdigit():
            raise OIPError(400, f"Inference-Header-Content-Length {length!r} is not a byte count")
        request = parse_infer_request(body, int(length) if length is not None else None)
        terms = {k: request.parameters.get(PARAMETER_PREFIX + k) for k in ("deadline_ms", "max_price")}
        for key, value in terms.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise OIPError(400, f"parameter {PARAMETER_PREFIX + key} must be a positive number")
        # A request may lower the gateway's price ceiling, never raise it: the operator pays.
        max_price = min(terms["max_price"] or self.client.max_price, self.client.max_price)
        try:
            answer = await self.client.infer(model, request.inputs, deadline_ms=terms["deadline_ms"],
                                             max_price=max_price)
        except InputError as exc:
            raise OIPError(400, str(exc)) from None
        except ClientError as exc:
            raise OIPError(503, str(exc)) from None
        outcome = answer.outcome
        receipt = {"receipt_id": answer.job_id, "provider": outcome.provider, "energy_j": outcome.energy_j,
                   "energy_source": outcome.energy_source, "price": outcome.price,
                   "compute_ms": round(outcome.compute_ms, 3), "latency_ms": round(outcome.latency_ms, 3)}
        if answer.share is not None:
            # Micro-batched: the receipt is the batch's; this request is part `share` of it,
            # and energy and price above are its rows' share.
            receipt["batch_part"] = answer.share
            receipt["batch_parts"] = len(answer.receipt.parts)
        out_headers, out_body = encode_infer_response(name, request, answer.outputs,
                                                      {PARAMETER_PREFIX + k: v for k, v in receipt.items()})
        out_headers += [(f"x-idlemesh-{k.replace('_', '-')}", str(v)) for k, v in receipt.items()]
        return Reply(200, out_body, out_headers)
