"""Fault injection at named points, for the chaos test and bench/chaos.py only.

`IDLEMESH_FAULT=POINT:ACTION[@N]` makes this process SIGKILL (`kill`) or SIGSTOP
(`stop`) itself the N-th time (default 1st) it passes POINT; unset, every point is a
no-op. The points sit in the windows where settlement can go wrong: a random kill
rarely lands in a window a few milliseconds wide, so the chaos test aims at them.

Points: buyer-model-upload, buyer-after-result (verified, nothing written yet),
buyer-after-ack (ledger written and ack sent, journal not yet), provider-before-result
(receipt and result durable, not yet sent), provider-before-ack (result sent, ack not yet
received), provider-after-ack (ack applied, not confirmed).
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("IDLEMESH_FAULT", "")
_ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}
_passes: dict[str, int] = {}


def _parse(spec: str) -> tuple[str, int, int] | None:
    if not spec:
        return None
    point, _, rest = spec.partition(":")
    action, _, nth = rest.partition("@")
    if action not in _ACTIONS:
        raise SystemExit(f"idlemesh: IDLEMESH_FAULT={spec!r}: the action must be kill or stop")
    return point, _ACTIONS[action], int(nth or 1)


_FAULT = _parse(_SPEC)


def fault_point(name: str) -> None:
    if _FAULT is None or _FAULT[0] != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == _FAULT[2]:
        print(f'{{"event": "fault", "point": "{name}", "pid": {os.getpid()}}}', flush=True)
        os.kill(os.getpid(), _FAULT[1])
