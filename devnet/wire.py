"""The devnet's internet: a user-space IP router between network namespaces that holds
each packet for its links' delay.

This kernel has no `sch_netem` (`tc qdisc add ... netem` fails with "Specified qdisc kind
is unknown"), so delay, jitter, loss and rate are applied here, in one process: every
node namespace (or NAT router namespace) gets a TUN device `wan0` whose fd we hold;
a packet read from one is written to the TUN that owns its destination address once
its links allow. The TUN devices vanish with this process, so a crash of the devnet
takes its links down with it.

Run as `python -m devnet.wire PLAN.json` (root). PLAN.json: {"mtu": int, "links":
[{"ns", "address", "delay_ms", "jitter_ms", "loss", "rate_mbit"}, ...]}. It prints
one JSON line `{"event": "ready"}` once every link is up, then forwards until SIGTERM.

Each link is an access link between its namespace and a lossless core: a packet from A
to B serialises on A's uplink at A's rate, waits A's delay, serialises on B's downlink
at B's rate and waits B's delay. Jitter is uniform in [0, jitter_ms] and never
reorders a link's packets (release times only grow), as real access links behave.
"""

from __future__ import annotations

import ctypes
import fcntl
import heapq
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
QUEUE_LIMIT_S = 0.5  # a packet that would wait longer than this behind a slow link is dropped (a full buffer)
WAN_DEVICE = "wan0"
PARENT_CHECK_S = 1.0

_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns failed")


@dataclass
class Link:
    ns: str
    address: str  # the IPv4 address packets to this link are for
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    rate_mbit: float = 0.0  # 0: unlimited
    fd: int = -1
    up_free_s: float = 0.0    # when the uplink has sent everything queued on it
    down_free_s: float = 0.0
    last_release_s: float = 0.0  # latest delivery scheduled to this link: never reorder
    sent: int = 0
    dropped: int = 0

    def tx_s(self, size: int) -> float:
        return size * 8 / (self.rate_mbit * 1e6) if self.rate_mbit > 0 else 0.0

    def jitter_s(self, rng: random.Random) -> float:
        return rng.uniform(0, self.jitter_ms) / 1000 if self.jitter_ms > 0 else 0.0


@dataclass
class Router:
    links: list[Link]
    rng: random.Random = field(default_factory=lambda: random.Random(1))
    queue: list = field(default_factory=list)
    _seq: int = 0

    def __post_init__(self) -> None:
        self.by_address = {struct.unpack("!I", bytes(map(int, link.address.split("."))))[0]: link
                           for link in self.links}

    def route(self, source: Link, packet: bytes, now_s: float) -> None:
        """Schedule `packet`, read from `source`'s TUN, for delivery (or drop it)."""
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return  # IPv4 only: the devnet assigns no IPv6 addresses
        target = self.by_address.get(struct.unpack_from("!I", packet, 16)[0])
        if target is None or target is source:
            source.dropped += 1
            return
        if self.rng.random() < source.loss or self.rng.random() < target.loss:
            source.dropped += 1
            return
        size = len(packet)
        up_start = max(now_s, source.up_free_s)
        if up_start - now_s > QUEUE_LIMIT_S:
            source.dropped += 1
            return
        source.up_free_s = up_start + source.tx_s(size)
        at_core = source.up_free_s + source.delay_ms / 1000 + source.jitter_s(self.rng)
        down_start = max(at_core, target.down_free_s)
        if down_start - at_core > QUEUE_LIMIT_S:
            target.dropped += 1
            return
        target.down_free_s = down_start + target.tx_s(size)
        release = max(target.down_free_s + target.delay_ms / 1000 + target.jitter_s(self.rng),
                      target.last_release_s)
        target.last_release_s = release
        self._seq += 1
        heapq.heappush(self.queue, (release, self._seq, target, packet))

    def due(self, now_s: float):
        """The packets whose time has come, in order."""
        while self.queue and self.queue[0][0] <= now_s:
            _, _, target, packet = heapq.heappop(self.queue)
            yield target, packet

    def next_due_s(self, now_s: float) -> float | None:
        return max(0.0, self.queue[0][0] - now_s) if self.queue else None


def open_tun(ns: str, mtu: int) -> int:
    """A TUN device named wan0 inside namespace `ns`, held open by the returned fd."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        setns(target)
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", WAN_DEVICE.encode(), IFF_TUN | IFF_NO_PI))
    finally:
        setns(home)
        os.close(home)
        os.close(target)
    return fd


def bring_up(link: Link, mtu: int) -> None:
    """Address the link's TUN and send everything not local through it."""
    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", link.ns, *args], check=True, capture_output=True)
    ip("link", "set", WAN_DEVICE, "mtu", str(mtu), "up")
    ip("addr", "add", f"{link.address}/32", "dev", WAN_DEVICE)
    ip("route", "replace", "default", "dev", WAN_DEVICE)


def forward(router: Router) -> None:
    poller = select.epoll()
    by_fd = {}
    for link in router.links:
        poller.register(link.fd, select.EPOLLIN)
        by_fd[link.fd] = link
    parent = os.getppid()
    while True:
        now = time.monotonic()
        wait = router.next_due_s(now)
        if os.getppid() != parent:
            return  # the launcher is gone (a crash, a kill -9): take the links down with it
        for fd, _ in poller.poll(PARENT_CHECK_S if wait is None else min(wait, PARENT_CHECK_S)):
            source = by_fd[fd]
            while True:
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                router.route(source, packet, time.monotonic())
        for target, packet in router.due(time.monotonic()):
            try:
                os.write(target.fd, packet)
                target.sent += 1
            except OSError:
                target.dropped += 1  # a namespace going away, or a full TUN queue: the packet is lost


def main(argv: list[str]) -> int:
    plan = json.loads(open(argv[1]).read())
    mtu = int(plan.get("mtu", 9000))
    links = [Link(**{k: v for k, v in spec.items() if k in Link.__dataclass_fields__}) for spec in plan["links"]]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    for link in links:
        link.fd = open_tun(link.ns, mtu)
        bring_up(link, mtu)
    print(json.dumps({"event": "ready", "links": len(links)}), flush=True)
    forward(Router(links))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
