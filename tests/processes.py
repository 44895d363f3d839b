"""Starting an `idlemesh` command as a real process, for tests that talk to it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]


async def start_node(*args: str, env: dict[str, str] | None = None, timeout_s: float = 60.0):
    """`idlemesh ARGS` running, once it has printed its first line (its JSON `ready`
    event): (the process, that event)."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "node.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO,
        env={**os.environ, **(env or {})})
    line = b""
    with trio.fail_after(timeout_s):
        while not line.endswith(b"\n"):
            chunk = await process.stdout.receive_some(1)
            assert chunk, f"idlemesh {args[0]} exited before it was ready"
            line += chunk
    return process, json.loads(line)
