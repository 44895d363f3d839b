"""Prometheus metrics for the provider and bootstrap daemons, off by default.

prometheus-client gives the standard text format and a small, well-tested HTTP server
on its own thread, so a scrape never waits on the trio loop. Each node has its own
registry (no process-global state: tests run several nodes in one process). Values that
already live in the node (slots busy, peers, offer age) are read when scraped, never
copied; events (jobs, energy, refusals) are counted as they happen.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


def parse_listen(addr: str) -> tuple[str, int]:
    """'127.0.0.1:9464' -> ('127.0.0.1', 9464); ValueError with a one-line reason."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"metrics address {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host, int(port)


class NodeMetrics:
    """The series every node exports; providers fill the job series too."""

    def __init__(self, role: str):
        r = self.registry = CollectorRegistry()
        self.role = role
        self.refused = Counter("idlemesh_refused_inputs", "Inputs refused from peers, by reason", ["reason"],
                               registry=r)
        self.connected_peers = Gauge("idlemesh_connected_peers", "Peers with an open connection", registry=r)
        self.offers_held = Gauge("idlemesh_offers_held", "Unexpired offers in this node's book", registry=r)
        self.started_at = Gauge("idlemesh_start_time_seconds", "When this node started (Unix time)", registry=r)
        self.started_at.set(time.time())
        if role == "provider":
            self._provider_series(r)

    def _provider_series(self, r: CollectorRegistry) -> None:
        self.jobs = Counter("idlemesh_jobs", "Jobs by outcome: completed (result sent), settled, rejected, unacked",
                            ["outcome"], registry=r)
        self.compute_seconds = Counter("idlemesh_compute_seconds", "Compute time of completed jobs, s", registry=r)
        self.energy_joules = Counter("idlemesh_energy_joules",
                                     "Energy of completed jobs, J, by how it was obtained "
                                     "(measured-nvml, measured-rapl, declared, estimated, simulated)",
                                     ["source"], registry=r)
        self.earnings = Counter("idlemesh_earnings", "Price of receipts the buyer accepted, in price units",
                                registry=r)
        self.slots_busy = Gauge("idlemesh_slots_busy", "Jobs running now", registry=r)
        self.slots = Gauge("idlemesh_slots", "Jobs this provider runs at once", registry=r)
        self.offer_age = Gauge("idlemesh_offer_age_seconds", "Age of the offer now being gossiped", registry=r)
        self.offer_visible = Gauge("idlemesh_offer_visible",
                                   "1 when every connected bootstrap held a fresh copy of our offer at its last "
                                   "check, 0 when one did not, NaN before the first check", registry=r)

    def serve(self, addr: str) -> None:
        from .p2p import ListenError

        host, port = parse_listen(addr)
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ListenError(f"cannot serve metrics on {addr}: {exc.strerror or exc}") from None
