"""The job lifecycle as one transition table (pure; no I/O here).

requested -> accepted -> running -> delivered -> settled | rejected,
with failed and expired reachable from every state before delivery.
"""

from __future__ import annotations

from .errors import LocalProtocolError

TERMINAL = frozenset({"settled", "rejected", "failed", "expired"})

# (state, event) -> next state. Every legal move of a job is in this table.
TRANSITIONS: dict[tuple[str, str], str] = {
    ("requested", "accept"): "accepted",
    ("requested", "fail"): "failed",
    ("requested", "expire"): "expired",
    ("accepted", "start"): "running",
    ("accepted", "fail"): "failed",
    ("accepted", "expire"): "expired",
    ("running", "deliver"): "delivered",
    ("running", "fail"): "failed",
    ("running", "expire"): "expired",
    ("delivered", "settle"): "settled",
    ("delivered", "reject"): "rejected",
}


def next_state(state: str, event: str, *, role: str = "node") -> str:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise LocalProtocolError(f"{role}: no move from state {state!r} on event {event!r}") from None
