"""A devnet on separate network stacks: one Linux network namespace per node, joined by
the user-space router of devnet/wire.py, with NAT routers in front of nodes at "home".

Topology:
- the "internet": every public node (bootstrap, buyer, provider without NAT) and every
  NAT router has one address in 100.64.0.0/16 (RFC 6598 shared space: the carrier side,
  never a home LAN) on a TUN device the wire process holds; the wire adds each link's
  delay, jitter, loss and rate;
- a home: the node's namespace has 192.168.1.2 on a veth to its router namespace
  (192.168.1.1); every home uses the same LAN, as real homes do. The router masquerades
  (nftables): `cone` keeps the source port (endpoint-independent mapping),
  `symmetric` picks a random port per destination, `forwarded` is a cone NAT with the
  node's port forwarded (UPnP or a manual rule). Unsolicited inbound traffic is dropped.

Namespaces are named im<launcher pid>-<node>; namespaces whose launcher is gone are
removed at the next start and by `idlemesh devnet clean`. Only addresses inside these
namespaces are used: the machine's own interfaces and routes are never touched.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from .fleet import NAT_KINDS

PREFIX = "im"
PUBLIC_NET = "100.64"
HOME_ADDRESS = "192.168.1.2"
HOME_GATEWAY = "192.168.1.1"
NODE_PORT = 4001  # every node has its own stack, so all listen on the same port
MTU = 9000
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class LinkShape:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    rate_mbit: float = 0.0  # 0: unlimited


@dataclass(frozen=True)
class Spot:
    """Where one node sits: its namespace, the address it listens on, and the address
    the internet sees (its own, or its NAT router's)."""
    name: str
    ns: str
    listen_address: str
    public_address: str
    nat: str = "none"
    link: LinkShape = LinkShape()

    @property
    def router_ns(self) -> str | None:
        return f"{self.ns}r" if self.nat != "none" else None

    def listen(self, port: int = NODE_PORT) -> str:
        return f"/ip4/{self.listen_address}/tcp/{port}"


def unavailable() -> str | None:
    """Why a namespace devnet cannot run here, or None when it can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, or use the loopback devnet)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (the wire between namespaces is a TUN device)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def nat_unavailable() -> str | None:
    return None if shutil.which("nft") else "NAT routers need nftables (`apt install nftables`)"


def plan(names: list[str], nats: list[str] | None = None, links: list[LinkShape] | None = None,
         tag: str | None = None) -> list[Spot]:
    """Each node's place: pure, so the addresses are the same every run."""
    tag = tag or str(os.getpid())
    spots = []
    for i, name in enumerate(names):
        nat = (nats or [])[i] if nats and i < len(nats) else "none"
        if nat not in NAT_KINDS:
            raise ValueError(f"nat {nat!r} for {name}: expected one of {', '.join(NAT_KINDS)}")
        public = f"{PUBLIC_NET}.{i // 250}.{i % 250 + 2}"
        shape = (links or [])[i] if links and i < len(links) else LinkShape()
        spots.append(Spot(name, f"{PREFIX}{tag}-{name}", HOME_ADDRESS if nat != "none" else public, public, nat,
                          shape))
    return spots


def _ip(*args: str, ns: str | None = None) -> None:
    command = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")


def _run_in(ns: str, *command: str, stdin: str | None = None) -> None:
    done = subprocess.run(["ip", "netns", "exec", ns, *command], input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} in {ns}: {done.stderr.strip()}")


def nat_rules(kind: str, node_port: int = NODE_PORT) -> str:
    """The router's nftables ruleset for a NAT of `kind`."""
    masquerade = "masquerade random" if kind == "symmetric" else "masquerade"
    forward = (f'        iifname "wan0" tcp dport {node_port} dnat to {HOME_ADDRESS}:{node_port}\n'
               if kind == "forwarded" else "")
    return f"""table ip idlemesh_nat {{
    chain prerouting {{
        type nat hook prerouting priority dstnat;
{forward}    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat;
        oifname "wan0" {masquerade}
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan0" accept
        ct status dnat accept
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "wan0" ct state new drop
    }}
}}
"""


def create(spots: list[Spot]) -> None:
    """Namespaces, home LANs and NAT rules; the wire (devnet/wire.py) adds the WAN links."""
    for spot in spots:
        for ns in filter(None, (spot.ns, spot.router_ns)):
            _ip("netns", "add", ns)
            _ip("link", "set", "lo", "up", ns=ns)
        if spot.nat == "none":
            continue
        router = spot.router_ns
        _ip("link", "add", "lan0", "mtu", str(MTU), "type", "veth", "peer", "name", "lan0", "mtu", str(MTU),
            "netns", spot.ns, ns=router)
        _ip("addr", "add", f"{HOME_GATEWAY}/24", "dev", "lan0", ns=router)
        _ip("link", "set", "lan0", "up", ns=router)
        _ip("addr", "add", f"{HOME_ADDRESS}/24", "dev", "lan0", ns=spot.ns)
        _ip("link", "set", "lan0", "up", ns=spot.ns)
        _ip("route", "add", "default", "via", HOME_GATEWAY, ns=spot.ns)
        _run_in(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _run_in(router, "nft", "-f", "-", stdin=nat_rules(spot.nat))


def wire_plan(spots: list[Spot]) -> dict:
    """The wire's links: one per public node or NAT router, shaped as the node's link."""
    return {"mtu": MTU, "links": [{"ns": spot.router_ns or spot.ns, "address": spot.public_address,
                                   **asdict(spot.link)} for spot in spots]}


def all_namespaces(spots) -> list[str]:
    """Every namespace the spots use: the nodes' and their routers'."""
    return [ns for spot in spots for ns in (spot.ns, spot.router_ns) if ns]


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its parent counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def remove(namespaces: list[str], wait_s: float = 5.0) -> None:
    """Stop every process left in these namespaces, then delete them."""
    killed = []
    for ns in namespaces:
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
            except (ProcessLookupError, ValueError):
                pass
    deadline = time.monotonic() + wait_s
    while killed and time.monotonic() < deadline:  # SIGKILL lands within milliseconds
        killed = [pid for pid in killed if not gone(pid)]
        if killed:
            time.sleep(0.01)
    for ns in namespaces:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def ours() -> dict[int, list[str]]:
    """Every devnet namespace on this machine, by the pid of the launcher that made it."""
    found: dict[int, list[str]] = {}
    netns_dir = Path("/var/run/netns")
    for entry in sorted(netns_dir.iterdir()) if netns_dir.exists() else []:
        head, _, _ = entry.name.partition("-")
        if entry.name.startswith(PREFIX) and head[len(PREFIX):].isdigit():
            found.setdefault(int(head[len(PREFIX):]), []).append(entry.name)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def clean(everything: bool = False) -> list[str]:
    """Remove the namespaces of devnets whose launcher has exited (all of them with
    `everything`); returns their names."""
    removed = []
    for pid, namespaces in ours().items():
        if everything or not _alive(pid) or pid == os.getpid():
            remove(namespaces)
            removed += namespaces
    return removed


_libc = ctypes.CDLL(None, use_errno=True)


def _fresh_worker_threads() -> None:
    """A thread starts in the network namespace of the thread that made it, and trio
    keeps its worker threads (for subprocesses, among others) across calls and across
    trio.run. Without this, a worker made inside the buyer's namespace outlived the
    devnet: a later devnet's nodes, spawned from it, started in a deleted namespace
    that nothing else could reach ("connection refused" on 127.0.0.1). A new cache
    gets new workers; the old idle ones exit after trio's idle timeout."""
    from trio._core import _thread_cache

    _thread_cache.THREAD_CACHE = _thread_cache.ThreadCache()


@contextmanager
def entered(ns: str) -> Iterator[None]:
    """Run the calling thread inside namespace `ns`: sockets it opens meanwhile live
    there (the devnet's buyer is the launcher itself), and so do trio's worker threads
    made meanwhile. Restored on exit, worker threads included."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"cannot enter namespace {ns}")
        _fresh_worker_threads()
        yield
    finally:
        _libc.setns(home, CLONE_NEWNET)
        _fresh_worker_threads()
        os.close(home)
        os.close(target)


def exec_prefix(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


def describe(spots: list[Spot]) -> list[dict]:
    return [{"name": s.name, "ns": s.ns, "address": s.listen_address, "public_address": s.public_address,
             "nat": s.nat, **asdict(s.link)} for s in spots]


if __name__ == "__main__":  # `python -m devnet.netns` prints the devnet namespaces on this machine
    print(json.dumps(ours()))
