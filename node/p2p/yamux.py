"""Three fixes to py-libp2p 0.8.1's yamux streams (pinned by requirements.lock); the
frames each side may send are unchanged, only when they go and how they are cut.

1. A writer whose stream's send window is spent polls it every 10 ms
   (`YamuxStream.write`: `await trio.sleep(0.01)`), however soon the peer's window
   update arrives: each time a writer outruns its reader's credit it loses up to 10 ms
   (a 600 KB request crosses a fresh stream's 256 KB window at least twice). Here the
   writer wakes when its window grows: `send_window` becomes a property whose setter
   wakes the waiting writer. The 10 ms poll stays only as the fallback for a stream
   that closes while a writer waits.
2. A reader sends a window update after every read however small (the library's
   "partial slack" branch), so multistream-select's byte-at-a-time reads and each
   frame header cost the peer a frame, a Noise message and a wake-up. Here a reader
   gives credit back as go-yamux does: once what it has consumed reaches half its
   window (the window still grows by the library's auto-tuning). A writer never
   waits on this: its window is spent only when the reader holds none of it unread,
   and then all of it is consumed credit.
3. A data frame carries at most 65,524 bytes, so with its header it is one byte over
   what one Noise message holds (65,519), and every full frame went out as two Noise
   messages (two encryptions, two socket writes). Here a frame holds what fits in one.

`install()` patches the class once per process."""

from __future__ import annotations

import struct

import trio
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux import yamux as _yamux

WINDOW_WAIT_TIMEOUT_S = 5.0  # the library's own limit on waiting for a window update
CLOSED_POLL_S = 0.01  # the library's poll, kept only to notice a stream closed meanwhile
# A data frame and its header in one Noise message (a receiver takes any size up to the
# window: yamux frames have no minimum).
MAX_FRAME_PAYLOAD = min(_yamux.MAX_MESSAGE_SIZE, MAX_PLAINTEXT_LENGTH) - _yamux.HEADER_SIZE

_installed = False


def _get_send_window(stream) -> int:
    return stream.__dict__.get("_send_window", 0)


def _set_send_window(stream, value: int) -> None:
    grew = value > stream.__dict__.get("_send_window", 0)
    stream.__dict__["_send_window"] = value
    waiting = stream.__dict__.get("_window_grew")
    if grew and waiting is not None:
        waiting.set()


async def _wait_for_window(stream) -> None:
    """Until the send window is open or the stream closed; MuxedStreamError after 5 s."""
    with trio.move_on_after(WINDOW_WAIT_TIMEOUT_S) as waited:
        while True:
            async with stream.window_lock:
                if stream.send_window > 0 or stream.closed:
                    return
                grew = stream.__dict__["_window_grew"] = trio.Event()
            with trio.move_on_after(CLOSED_POLL_S):
                await grew.wait()
    if waited.cancelled_caught:
        raise MuxedStreamError("Timed out waiting for window update after 5 seconds.")


async def _write(self, data: bytes) -> None:
    """The library's `YamuxStream.write`, waking on a window update, in frames that
    each fit one Noise message."""
    if self.send_closed:
        raise MuxedStreamError("Stream is closed for sending")
    total_len = len(data)
    sent = 0
    while sent < total_len:
        frame: bytes | None = None
        while frame is None:
            async with self.rw_lock.write_lock():
                if self.send_closed:
                    raise MuxedStreamError("Stream is closed for sending")
                async with self.window_lock:
                    if self.closed:
                        raise MuxedStreamError("Stream is closed")
                    if self.send_window > 0:
                        to_send = min(self.send_window, MAX_FRAME_PAYLOAD, total_len - sent)
                        chunk = data[sent:sent + to_send]
                        self.send_window -= to_send
                        header = struct.pack(_yamux.YAMUX_HEADER_FORMAT, 0, _yamux.TYPE_DATA, 0,
                                             self.stream_id, len(chunk))
                        frame = header + chunk
            if frame is None:
                self._zero_window_waits += 1
                await _wait_for_window(self)
        await self.conn._write_frame(frame)
        sent += len(frame) - _yamux.HEADER_SIZE


async def _give_back_credit(self, *, bytes_read: int = 0) -> None:
    """go-yamux's sendWindowUpdate: credit once the consumed bytes reach the threshold."""
    del bytes_read  # consumed bytes are what the window and the buffer no longer hold
    increment = 0
    async with self.window_lock:
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        consumed = self.target_recv_window - (self.recv_window + buffered)
        if consumed > 0 and consumed >= self._grow_threshold():
            increment = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
            self._pending_recv_release = 0
    if increment > 0:
        await self.send_window_update(increment, skip_lock=True)


def install() -> None:
    global _installed
    if _installed:
        return
    cls = _yamux.YamuxStream
    cls.send_window = property(_get_send_window, _set_send_window)
    cls.write = _write
    cls._auto_tune_and_send_window_update = _give_back_credit
    _installed = True
