"""node/p2p/yamux.py: py-libp2p's yamux streams, with a writer that wakes at a window
update (not at its 10 ms poll) and a reader that gives credit back at half its window
(not after every read). Real YamuxStream objects over a recording connection, under
trio's MockClock: "wakes at once" means no virtual time passed."""

from __future__ import annotations

import struct

import pytest
import trio
import trio.testing
from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE, HEADER_SIZE, TYPE_DATA, TYPE_WINDOW_UPDATE, \
    YAMUX_HEADER_FORMAT, YamuxStream

from node.p2p import yamux

yamux.install()


class _Conn:
    """What a YamuxStream asks of its connection, recording the frames it writes."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, int, int]] = []  # (type, length field, payload bytes)
        self.stream_buffers: dict[int, bytearray] = {1: bytearray()}

    def rtt(self) -> float:
        return 0.0

    async def _write_frame(self, data: bytes) -> None:
        _, kind, _, _, length = struct.unpack(YAMUX_HEADER_FORMAT, data[:HEADER_SIZE])
        self.frames.append((kind, length, len(data) - HEADER_SIZE))


@pytest.fixture
def mock_clock():
    return trio.testing.MockClock()


async def test_a_writer_with_a_spent_window_wakes_at_the_window_update_not_at_a_poll(mock_clock):
    conn = _Conn()
    stream = YamuxStream(1, conn, True)
    payload = b"x" * (DEFAULT_WINDOW_SIZE + 1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.write, payload)
        await trio.testing.wait_all_tasks_blocked()
        assert stream.send_window == 0 and sum(p for _, _, p in conn.frames) == DEFAULT_WINDOW_SIZE
        before = trio.current_time()
        stream.send_window += 1000  # what the connection's reader does with a WINDOW_UPDATE
    assert trio.current_time() == before  # woken by the update: no 10 ms poll elapsed
    assert sum(p for _, _, p in conn.frames) == len(payload)
    # Every data frame fits one Noise message with its header (65,519 bytes).
    assert all(kind == TYPE_DATA and p + HEADER_SIZE <= 65519 for kind, _, p in conn.frames)


async def test_a_reader_gives_credit_back_at_half_its_window_not_after_every_read():
    conn = _Conn()
    stream = YamuxStream(1, conn, False)
    buffer = conn.stream_buffers[1]

    def arrive(n: int) -> None:  # what the connection's reader does with a DATA frame
        stream.recv_window -= n
        buffer.extend(b"y" * n)

    async def consume(n: int) -> None:  # what YamuxStream.read does
        del buffer[:n]
        await stream._auto_tune_and_send_window_update(bytes_read=n)

    arrive(DEFAULT_WINDOW_SIZE)
    for _ in range(10):  # multistream-select's byte-at-a-time reads, a frame header
        await consume(1)
    await consume(4)
    assert conn.frames == []
    await consume(DEFAULT_WINDOW_SIZE // 2 - 14)
    ((kind, increment, _),) = conn.frames
    assert kind == TYPE_WINDOW_UPDATE and increment >= DEFAULT_WINDOW_SIZE // 2
    # The writer may now send exactly what the reader holds room for.
    assert stream.recv_window + len(buffer) >= DEFAULT_WINDOW_SIZE
