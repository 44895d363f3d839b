"""Typed field access over decoded msgpack maps (pure; no I/O here).

Every decoder reads its fields through `Fields`, so every error names the path of the
bad field, what was expected and what came: `offer.slots: expected int >= 1, got -3`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, TypeVar

from .errors import DecodeError

T = TypeVar("T")
_MISSING = object()


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """A decoded map plus the dotted path it sits at."""

    __slots__ = ("_map", "path")

    def __init__(self, value: Any, path: str):
        if not isinstance(value, dict):
            raise DecodeError(f"{path}: expected map, got {type(value).__name__}")
        self._map = value
        self.path = path

    def _get(self, key: str, default: Any) -> Any:
        if key in self._map:
            return self._map[key]
        if default is _MISSING:
            raise DecodeError(f"{self.path}.{key}: required field is missing")
        return default

    def _fail(self, key: str, expected: str, got: Any) -> DecodeError:
        return DecodeError(f"{self.path}.{key}: expected {expected}, got {_show(got)}")

    def int(self, key: str, *, min: int | None = None, max: int | None = None,
            default: Any = _MISSING) -> int:
        value = self._get(key, default)
        if value is None and default is None:
            return None  # type: ignore[return-value]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, "int", value)
        if min is not None and value < min:
            raise self._fail(key, f"int >= {min}", value)
        if max is not None and value > max:
            raise self._fail(key, f"int <= {max}", value)
        return value

    def float(self, key: str, *, min: float | None = None, max: float | None = None,
              default: Any = _MISSING) -> float:
        value = self._get(key, default)
        if value is None and default is None:
            return None  # type: ignore[return-value]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(key, "number", value)
        value = float(value)
        if not math.isfinite(value):
            raise self._fail(key, "finite number", value)
        if min is not None and value < min:
            raise self._fail(key, f"number >= {min}", value)
        if max is not None and value > max:
            raise self._fail(key, f"number <= {max}", value)
        return value

    def bool(self, key: str, *, default: Any = _MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, "bool", value)
        return value

    def str(self, key: str, *, max_len: int = 256, choices: tuple[str, ...] | None = None,
            default: Any = _MISSING) -> str:
        value = self._get(key, default)
        if value is None and default is None:
            return None  # type: ignore[return-value]
        if not isinstance(value, str):
            raise self._fail(key, "str", value)
        if len(value) > max_len:
            raise self._fail(key, f"str of at most {max_len} chars", f"{len(value)} chars")
        if choices is not None and value not in choices:
            raise self._fail(key, "one of " + "/".join(choices), value)
        return value

    def bytes(self, key: str, *, size: int | None = None, max_len: int = 1 << 20,
              default: Any = _MISSING) -> bytes:
        value = self._get(key, default)
        if not isinstance(value, bytes):
            raise self._fail(key, "bytes", value)
        if size is not None and len(value) != size:
            raise self._fail(key, f"{size} bytes", f"{len(value)} bytes")
        if len(value) > max_len:
            raise self._fail(key, f"at most {max_len} bytes", f"{len(value)} bytes")
        return value

    def hex(self, key: str, *, size: int, default: Any = _MISSING) -> str:
        """A lowercase hex string of `size` bytes (sha256 digests are size=32)."""
        value = self.str(key, max_len=2 * size, default=default)
        if len(value) != 2 * size or any(c not in "0123456789abcdef" for c in value):
            raise self._fail(key, f"{2 * size} lowercase hex chars", value)
        return value

    def map(self, key: str, *, default: Any = _MISSING) -> "Fields":
        value = self._get(key, default)
        return Fields(value, f"{self.path}.{key}")

    def list(self, key: str, item: Callable[[Any, str], T], *, max_len: int = 1024,
             default: Any = _MISSING) -> list[T]:
        value = self._get(key, default)
        if not isinstance(value, list):
            raise self._fail(key, "list", value)
        if len(value) > max_len:
            raise self._fail(key, f"list of at most {max_len} items", f"{len(value)} items")
        return [item(v, f"{self.path}.{key}[{i}]") for i, v in enumerate(value)]

    def raw(self, key: str, *, default: Any = _MISSING) -> Any:
        return self._get(key, default)


def bytes_item(max_len: int) -> Callable[[Any, str], bytes]:
    """A list item that must be bytes of at most `max_len` (signed envelopes in a list)."""
    def read(value: Any, path: str) -> bytes:
        if not isinstance(value, bytes) or len(value) > max_len:
            raise DecodeError(f"{path}: expected bytes of at most {max_len}, got {type(value).__name__}")
        return value
    return read


def hex_item(size: int) -> Callable[[Any, str], str]:
    """A list item that must be lowercase hex of `size` bytes (model hashes in a list)."""
    def read(value: Any, path: str) -> str:
        parent, _, key = path.rpartition(".")  # errors name the item's own path
        return Fields({key: value}, parent).hex(key, size=size)
    return read


def row(value: Any, names: tuple[str, ...], path: str) -> Fields:
    """A positional list (a compact table row on the wire) read as fields by name."""
    if not isinstance(value, list) or len(value) != len(names):
        raise DecodeError(f"{path}: expected [{', '.join(names)}], got {_show(value)}")
    return Fields(dict(zip(names, value)), path)


def str_item(max_len: int = 256) -> Callable[[Any, str], str]:
    def read(value: Any, path: str) -> str:
        if not isinstance(value, str) or len(value) > max_len:
            raise DecodeError(f"{path}: expected str of at most {max_len} chars, got {_show(value)}")
        return value
    return read
