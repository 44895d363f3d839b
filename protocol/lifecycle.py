"""The job lifecycle as one transition table (pure; no I/O here).

One vocabulary for the buyer, the provider, the buyer's journal and the CLI:

    pending -> requested -> accepted -> running -> delivered -> settled | rejected

`pending` is a job the buyer has journalled but not yet sent; `failed` and `expired`
are reachable from every state before delivery. A result that arrives without an
`accepted` first (the provider kept it from before the buyer's restart) moves a
requested job straight to delivered.
"""

from __future__ import annotations

from .errors import LocalProtocolError

STATES = ("pending", "requested", "accepted", "running", "delivered", "settled", "rejected", "failed", "expired")
TERMINAL = frozenset({"settled", "rejected", "failed", "expired"})

# (state, event) -> next state. Every legal move of a job is in this table.
TRANSITIONS: dict[tuple[str, str], str] = {
    ("pending", "send"): "requested",
    ("pending", "fail"): "failed",
    ("requested", "accept"): "accepted",
    ("requested", "redeliver"): "delivered",
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
