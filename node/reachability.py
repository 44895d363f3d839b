"""How a node is reached, as Petals decides it: a peer opens a fresh TCP connection to
the address we would advertise (never the connection we already have: AutoNAT v1 in
py-libp2p 0.8.1 reuses it and answers wrongly); if none connects we are behind NAT and
sell through relays. Pure: the dialing lives in node/p2p, the decisions here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

RECHECK_S = 600.0  # a home router's port forward or a new address is noticed within this


def _ip_port(addr: str) -> tuple[str, int] | None:
    parts = addr.split("/")
    try:
        if parts[1] in ("ip4", "ip6") and parts[3] == "tcp":
            return parts[2], int(parts[4])
    except (IndexError, ValueError):
        pass
    return None


def is_wildcard(ip: str) -> bool:
    return ip in ("0.0.0.0", "::")


def is_lan(ip: str) -> bool:
    """Addresses nobody outside this machine or its LAN can dial: loopback, private,
    link-local. (100.64.0.0/10, the carrier side of a carrier-grade NAT, is not a LAN.)"""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return address.is_loopback or address.is_link_local or (address.is_private and not (
        address.version == 4 and address in ipaddress.ip_network("100.64.0.0/10")))


def interface_ips() -> list[str]:
    """This machine's IPv4 addresses, loopback last (psutil reads the interfaces)."""
    import psutil

    ips = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
           if a.family.name == "AF_INET"]
    return sorted(set(ips), key=lambda ip: (ip.startswith("127."), ip))


def expand_wildcards(listen_addrs: list[str], ips: list[str]) -> list[str]:
    """Listen addresses with /ip4/0.0.0.0 replaced by each of `ips` (0.0.0.0 is nobody's
    address: printed, a peer on another machine would dial itself)."""
    out = []
    for addr in listen_addrs:
        ip_port = _ip_port(addr)
        if ip_port and ip_port[0] == "0.0.0.0":
            out += [addr.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/", 1) for ip in ips]
        else:
            out.append(addr)
    return out


def announce_problem(addr: str) -> str | None:
    """Why `addr` cannot be announced (None if it can): it must name a host and a TCP
    port, and no peer id (the node adds its own)."""
    ip_port = _ip_port(addr)
    if addr.startswith("/dns") and "/tcp/" in addr and "/p2p" not in addr:
        return None
    if ip_port is None or "/p2p" in addr or is_wildcard(ip_port[0]) or not 0 < ip_port[1] < 65536:
        return f"--announce {addr!r}: expected e.g. /ip4/203.0.113.5/tcp/4001 (a host and port others dial, no /p2p/)"
    return None


def listen_ports(listen_addrs: list[str]) -> list[int]:
    """The TCP ports we listen on, for a dial-back to check."""
    return sorted({ip_port[1] for a in listen_addrs if (ip_port := _ip_port(a)) and ip_port[1]})


@dataclass
class Reachability:
    """What this node knows about how others reach it."""
    state: str = "unknown"  # unknown | public | private
    observed_ip: str | None = None  # our address as a bootstrap saw it
    reachable_ports: list[int] = field(default_factory=list)
    checked_by: str | None = None
    checked_at_ms: int | None = None
    error: str | None = None

    def update(self, observed_ip: str | None, reachable_ports: list[int], checked_by: str, now_ms: int) -> bool:
        """A dial-back's answer; True if how we are reached changed."""
        before = (self.state, self.observed_ip, self.reachable_ports)
        self.observed_ip, self.reachable_ports = observed_ip, sorted(reachable_ports)
        self.state = "public" if reachable_ports else "private"
        self.checked_by, self.checked_at_ms, self.error = checked_by, now_ms, None
        return before != (self.state, self.observed_ip, self.reachable_ports)

    def to_json(self) -> dict:
        return {"state": self.state, "observed_ip": self.observed_ip, "reachable_ports": self.reachable_ports,
                "checked_by": self.checked_by, "checked_at_ms": self.checked_at_ms, "error": self.error}


def direct_addrs(listen_addrs: list[str], announce: list[str], reach: Reachability) -> list[str]:
    """The addresses a buyer may dial us at directly, best first.

    - `announce` (an operator's port forward or public name) always comes first;
    - once a dial-back reached a port at our observed address, that address;
    - listen addresses that are specific (not 0.0.0.0) and, once we know we are behind
      NAT, not on a LAN nobody else can reach;
    - before any check, the listen addresses as they are (a node with no bootstrap,
      or a loopback devnet, behaves as before)."""
    out = list(announce)
    if reach.state == "public" and reach.observed_ip:
        out += [f"/ip4/{reach.observed_ip}/tcp/{port}" for port in reach.reachable_ports
                if ":" not in reach.observed_ip]
    for addr in listen_addrs:
        ip_port = _ip_port(addr)
        if ip_port is None or is_wildcard(ip_port[0]):
            continue
        if reach.state == "private" and is_lan(ip_port[0]):
            continue
        if reach.state == "public" and is_lan(ip_port[0]) and not is_lan(reach.observed_ip or ""):
            continue  # a public node's 192.168.x address only misleads buyers elsewhere
        out.append(addr)
    return list(dict.fromkeys(_without_peer_id(a) for a in out))


def _without_peer_id(addr: str) -> str:
    """A direct address without its trailing /p2p/<id> (the offer names the peer)."""
    return addr.split("/p2p/")[0] if "/p2p-circuit" not in addr else addr


def offer_addrs(listen_addrs: list[str], announce: list[str], reach: Reachability, relayed: list[str]) -> list[str]:
    """Every address our offer carries: direct ones first, then relayed ones (a buyer
    tries them in order, so a job never fails only because the first path did)."""
    direct = direct_addrs(listen_addrs, announce, reach)
    return list(dict.fromkeys([*direct, *(relayed if reach.state != "public" or not direct else [])]))


def how_reached(reach: Reachability, relays: list[str], announce: list[str], listen_addrs: list[str]) -> str:
    """One line for `provider status`: how buyers reach us, and the fix when they cannot
    directly."""
    ports = listen_ports(listen_addrs)
    port = ports[0] if ports else 4001
    if reach.state == "unknown":
        if announce:
            return f"announced at {', '.join(announce)} (not checked yet: no bootstrap has answered a dial-back)"
        return "not checked yet: no bootstrap has answered a dial-back"
    if reach.state == "public":
        where = ", ".join(f"{reach.observed_ip}:{p}" for p in reach.reachable_ports)
        return f"publicly reachable at {where} (a bootstrap opened a fresh TCP connection to it)"
    through = (f"selling through relay {', '.join(relays)}" if relays
               else "no relay slot yet: buyers cannot reach this provider")
    return (f"behind NAT ({reach.observed_ip or 'address unknown'} as seen from outside), {through}; "
            f"open TCP port {port} (or enable UPnP) and pass --announce /ip4/<public ip>/tcp/{port} for direct jobs")
