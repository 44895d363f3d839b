"""Canonical msgpack encoding and strict decoding (pure; no I/O here).

Canonical means (spec/wire.md, "Canonical encoding"): every value in its shortest
msgpack form; maps with string keys, sorted by their UTF-8 bytes, none repeated; bytes
as bin, text as str; floats as float64; no ext types. Signatures are checked over the
received bytes, never over a re-encoding, and a signed envelope or body that is not
canonical is refused (`check_canonical`): one message has one encoding, so its hash
names it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack

from .errors import DecodeError

# Hard ceilings applied while parsing, before any object is built, so a tiny frame
# cannot declare a huge container.
MAX_CONTAINER_LEN = 100_000
MAX_STR_LEN = 64 * 1024


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"canonical maps take str keys, got {type(key).__name__}")
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str, bytes)):
        return value
    if isinstance(value, float):
        return float(value)
    raise TypeError(f"cannot encode {type(value).__name__} canonically")


def encode(value: Any) -> bytes:
    """Canonical msgpack bytes of plain data (dict/list/str/bytes/int/float/bool/None)."""
    return msgpack.packb(_canonical(value), use_bin_type=True, use_single_float=False)


def _reject_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack: ext type {code} is not allowed")


def decode(data: bytes, *, max_bytes: int, what: str = "message") -> Any:
    """Parse msgpack bytes into plain data, or raise DecodeError saying why."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise DecodeError(f"{what}: {len(data)} bytes exceeds the cap of {max_bytes}")
    try:
        return msgpack.unpackb(
            bytes(data),
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_reject_ext,
            max_str_len=MAX_STR_LEN,
            max_bin_len=max_bytes,
            max_array_len=MAX_CONTAINER_LEN,
            max_map_len=MAX_CONTAINER_LEN,
            max_ext_len=0,
        )
    except DecodeError:
        raise
    # msgpack signals malformed input with these; nothing else is expected from unpackb.
    except (ValueError, UnicodeDecodeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        raise DecodeError(f"{what}: malformed msgpack ({type(exc).__name__}: {exc})") from None


# marker -> (width, the least value needing it); negative ints: (width, the greatest)
_UINT = {0xcc: (1, 128), 0xcd: (2, 1 << 8), 0xce: (4, 1 << 16), 0xcf: (8, 1 << 32)}
_INT = {0xd0: (1, -33), 0xd1: (2, -129), 0xd2: (4, -(1 << 15) - 1), 0xd3: (8, -(1 << 31) - 1)}
_SIZED = {  # marker -> (kind, width of the length, smallest length this marker may carry)
    0xc4: ("bin", 1, 0), 0xc5: ("bin", 2, 1 << 8), 0xc6: ("bin", 4, 1 << 16),
    0xd9: ("str", 1, 32), 0xda: ("str", 2, 1 << 8), 0xdb: ("str", 4, 1 << 16),
    0xdc: ("array", 2, 16), 0xdd: ("array", 4, 1 << 16),
    0xde: ("map", 2, 16), 0xdf: ("map", 4, 1 << 16),
}


def check_canonical(data: bytes, what: str = "message") -> None:
    """Raise DecodeError unless `data` is exactly one canonical msgpack value. Walks the
    bytes without building objects (a job request's tensors are skipped, not copied)."""
    view = memoryview(data)

    def fail(at: int, why: str) -> DecodeError:
        return DecodeError(f"{what}: not canonical msgpack at byte {at}: {why}")

    def need(at: int, n: int) -> None:
        if at + n > len(view):
            raise fail(at, "truncated")

    def length(at: int, width: int) -> int:
        need(at, width)
        return int.from_bytes(view[at:at + width], "big")

    def value(at: int, depth: int) -> tuple[int, bytes | None]:
        """The offset after the value at `at`, and its bytes if it is a str (map keys)."""
        if depth > 64:
            raise fail(at, "nested deeper than 64")
        need(at, 1)
        m = view[at]
        if m <= 0x7f or m >= 0xe0 or m in (0xc0, 0xc2, 0xc3):
            return at + 1, None
        if 0xa0 <= m <= 0xbf:
            n = m & 0x1f
            need(at + 1, n)
            return at + 1 + n, bytes(view[at + 1:at + 1 + n])
        if 0x80 <= m <= 0x8f:
            return container(at + 1, m & 0x0f, "map", depth), None
        if 0x90 <= m <= 0x9f:
            return container(at + 1, m & 0x0f, "array", depth), None
        if m == 0xcb:
            need(at, 9)
            return at + 9, None
        if m in _UINT:
            width, least = _UINT[m]
            n = length(at + 1, width)
            if n < least:
                raise fail(at, f"uint {n} has a shorter form")
            return at + 1 + width, None
        if m in _INT:
            width, greatest = _INT[m]
            need(at + 1, width)
            n = int.from_bytes(view[at + 1:at + 1 + width], "big", signed=True)
            if n >= 0:
                raise fail(at, "a non-negative int is written as uint")
            if n > greatest:
                raise fail(at, f"int {n} has a shorter form")
            return at + 1 + width, None
        if m in _SIZED:
            kind, width, smallest = _SIZED[m]
            n = length(at + 1, width)
            if n < smallest:
                raise fail(at, f"{kind} of {n} has a shorter form")
            start = at + 1 + width
            if kind in ("array", "map"):
                return container(start, n, kind, depth), None
            need(start, n)
            return start + n, bytes(view[start:start + n]) if kind == "str" else None
        if m == 0xca:
            raise fail(at, "float32 (floats are float64)")
        raise fail(at, f"marker 0x{m:02x} (ext types are not allowed)")

    def container(at: int, n: int, kind: str, depth: int) -> int:
        previous = None
        for _ in range(n):
            if kind == "map":
                key_at = at
                at, key = value(at, depth + 1)
                if key is None:
                    raise fail(key_at, "a map key is not a str")
                if previous is not None and key <= previous:
                    raise fail(key_at, "map keys are not sorted" if key != previous else "a map key repeats")
                previous = key
            at, _ = value(at, depth + 1)
        return at

    end, _ = value(0, 0)
    if end != len(view):
        raise fail(end, f"{len(view) - end} bytes after the value")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
