"""A node's persistent Ed25519 identity: a 32-byte seed in HOME/identity.key, mode 0600."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from protocol.signing import SigningKey

IDENTITY_FILE = "identity.key"


class HomeError(Exception):
    """A node home that cannot be used; the message says which and why, in one line."""


def prepare_home(home: Path) -> None:
    """Create `home` if needed and check that we can write there, before anything else
    happens (a provider would otherwise calibrate for minutes, then fail to save)."""
    try:
        home.mkdir(parents=True, exist_ok=True)
        probe = home / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise HomeError(f"home {home} is not writable: {exc.strerror or exc}; choose another with --home") from None


def load_or_create_seed(home: Path) -> bytes:
    prepare_home(home)
    path = home / IDENTITY_FILE
    if path.exists():
        seed = path.read_bytes()
        if len(seed) != 32:
            raise SystemExit(f"{path}: expected a 32-byte key, found {len(seed)} bytes; move it away to make a new one")
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise SystemExit(f"{path}: key file is readable by others (mode {mode:o}); chmod 600 it")
        return seed
    seed = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, seed)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return seed


def load_key(home: Path) -> tuple[bytes, SigningKey]:
    seed = load_or_create_seed(home)
    return seed, SigningKey(seed)
