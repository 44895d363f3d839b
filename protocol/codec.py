"""Canonical msgpack encoding and strict decoding (pure; no I/O here).

Canonical means: maps with sorted string keys, binary as bin, no ext types, floats as
float64. Signatures are checked over received bytes, never over a re-encoding, so the
canonical form matters for ids and hashes, not for verification.
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


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
