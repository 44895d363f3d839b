"""Pure logic of reaching nodes across NAT: which addresses an offer carries, what
`provider status` tells the operator, and the devnet's topology and wire (delay, order,
loss, rate) without any namespace."""

from __future__ import annotations

import pytest

from devnet.netns import LinkShape, nat_rules, plan, wire_plan
from devnet.wire import Link, Router
from node.reachability import Reachability, direct_addrs, how_reached, is_lan, listen_ports, offer_addrs

ME = "12D3KooWKcRNs48qbY8E1YbYi5jAQ3Qmiwra9w4x8sRKzCpQVRTW"
RELAY = "/ip4/100.64.0.2/tcp/4001/p2p/12D3KooWPjAT5XstSRcqPSwtvfkKaGRRbcqJDxDoiaE7Fs4CJFfU"
RELAYED = f"{RELAY}/p2p-circuit/p2p/{ME}"


def test_lan_addresses_are_told_apart_from_carrier_and_public_ones():
    assert is_lan("127.0.0.1") and is_lan("192.168.1.2") and is_lan("10.0.0.5") and is_lan("169.254.1.1")
    assert not is_lan("100.64.0.5")  # the carrier side of a carrier-grade NAT
    assert not is_lan("8.8.8.8") and not is_lan("not an ip")
    assert listen_ports(["/ip4/0.0.0.0/tcp/4001", "/ip4/127.0.0.1/tcp/0", f"/ip4/1.2.3.4/tcp/4001/p2p/{ME}"]) == [4001]


def test_before_any_check_the_listen_addresses_go_out_as_they_are():
    reach = Reachability()
    listen = [f"/ip4/127.0.0.1/tcp/5000/p2p/{ME}"]
    assert offer_addrs(listen, [], reach, []) == ["/ip4/127.0.0.1/tcp/5000"]
    assert offer_addrs(["/ip4/0.0.0.0/tcp/4001"], [], reach, []) == []  # a wildcard is nobody's address
    assert "not checked yet" in how_reached(reach, [], [], listen)


def test_a_public_node_offers_the_address_a_dial_back_reached():
    reach = Reachability()
    assert reach.update("93.184.216.34", [4001], "boot", now_ms=1) is True
    assert reach.update("93.184.216.34", [4001], "boot", now_ms=2) is False  # nothing changed
    listen = ["/ip4/0.0.0.0/tcp/4001", "/ip4/192.168.1.2/tcp/4001"]
    assert offer_addrs(listen, [], reach, [RELAYED]) == ["/ip4/93.184.216.34/tcp/4001"]  # no relay when direct works
    assert "publicly reachable at 93.184.216.34:4001" in how_reached(reach, [], [], listen)


def test_behind_nat_the_offer_carries_the_relayed_address_and_status_says_how_to_fix_it():
    reach = Reachability()
    assert reach.update("100.64.0.5", [], "boot", now_ms=1) is True and reach.state == "private"
    listen = ["/ip4/192.168.1.2/tcp/4001"]
    assert direct_addrs(listen, [], reach) == []  # a home LAN address misleads buyers elsewhere
    assert offer_addrs(listen, [], reach, [RELAYED]) == [RELAYED]
    line = how_reached(reach, [RELAY], [], listen)
    assert line.startswith("behind NAT (100.64.0.5 as seen from outside), selling through relay " + RELAY)
    assert "open TCP port 4001 (or enable UPnP)" in line and "--announce" in line
    assert "buyers cannot reach this provider" in how_reached(reach, [], [], listen)
    # An operator's port forward comes first, the relay stays as the second path.
    assert offer_addrs(listen, ["/ip4/100.64.0.5/tcp/4001"], reach, [RELAYED]) == ["/ip4/100.64.0.5/tcp/4001",
                                                                                RELAYED]


def test_devnet_plan_puts_homes_behind_routers_on_one_lan_and_everyone_else_on_the_carrier_net():
    spots = plan(["bootstrap", "buyer", "p0", "p1"], ["none", "none", "cone", "symmetric"],
                 [LinkShape(), LinkShape(), LinkShape(20.0, 2.0, 0.01, 50.0), LinkShape()], tag="7")
    assert [s.ns for s in spots] == ["im7-bootstrap", "im7-buyer", "im7-p0", "im7-p1"]
    assert [s.listen_address for s in spots] == ["100.64.0.2", "100.64.0.3", "192.168.1.2", "192.168.1.2"]
    assert [s.public_address for s in spots] == ["100.64.0.2", "100.64.0.3", "100.64.0.4", "100.64.0.5"]
    assert spots[2].router_ns == "im7-p0r" and spots[0].router_ns is None
    links = wire_plan(spots)["links"]
    assert links[2] == {"ns": "im7-p0r", "address": "100.64.0.4", "delay_ms": 20.0, "jitter_ms": 2.0,
                        "loss": 0.01, "rate_mbit": 50.0}
    with pytest.raises(ValueError, match="nat 'full-cone'"):
        plan(["p"], ["full-cone"])


def test_nat_rules_differ_only_where_the_nat_kinds_do():
    cone, symmetric, forwarded = nat_rules("cone"), nat_rules("symmetric"), nat_rules("forwarded")
    assert 'oifname "wan0" masquerade\n' in cone and "random" not in cone and "dnat to" not in cone
    assert "masquerade random" in symmetric
    assert "dnat to 192.168.1.2:4001" in forwarded
    for rules in (cone, symmetric, forwarded):
        assert 'iifname "wan0" ct state new drop' in rules  # unsolicited inbound never reaches the router


def _packet(src: str, dst: str, size: int = 100) -> bytes:
    head = bytes([0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0]) + bytes(map(int, src.split("."))) + \
        bytes(map(int, dst.split(".")))
    return head + bytes(size - len(head))


def test_the_wire_holds_packets_for_both_links_keeps_their_order_and_serialises_at_the_rate():
    a = Link("a", "100.64.0.2", delay_ms=10.0)
    b = Link("b", "100.64.0.3", delay_ms=30.0, rate_mbit=8.0)  # 1 ms per 1,000-byte packet
    router = Router([a, b])
    for i in range(3):
        router.route(a, _packet("100.64.0.2", "100.64.0.3", 1000), now_s=0.0)
    assert list(router.due(0.0399)) == []
    times = [entry[0] for entry in router.queue]
    assert sorted(times) == pytest.approx([0.041, 0.042, 0.043])
    assert [t for t, _ in [(e[0], e) for e in sorted(router.queue)]] == sorted(times)
    assert len(list(router.due(0.05))) == 3 and router.next_due_s(0.05) is None
    # Unknown destinations, packets to oneself and non-IPv4 are dropped, never looped.
    router.route(a, _packet("100.64.0.2", "100.64.9.9"), now_s=1.0)
    router.route(a, _packet("100.64.0.2", "100.64.0.2"), now_s=1.0)
    router.route(a, b"\x60" + bytes(60), now_s=1.0)
    assert router.queue == [] and a.dropped == 2


def test_the_wire_drops_about_the_loss_it_is_told_and_jitter_never_reorders():
    a = Link("a", "100.64.0.2", loss=0.2, jitter_ms=20.0)
    b = Link("b", "100.64.0.3", delay_ms=5.0)
    router = Router([a, b])
    for i in range(2000):
        router.route(a, _packet("100.64.0.2", "100.64.0.3"), now_s=i * 0.001)
    kept = len(router.queue)
    assert 1500 < kept < 1700  # seeded: 20% loss
    releases = [entry[0] for entry in sorted(router.queue, key=lambda e: e[1])]  # in the order sent
    assert releases == sorted(releases)


def test_a_wildcard_listen_address_is_printed_as_this_machines_addresses_and_announce_is_checked():
    from node.reachability import announce_problem, expand_wildcards

    assert expand_wildcards(["/ip4/0.0.0.0/tcp/4000", "/ip4/127.0.0.1/tcp/5"], ["10.0.0.7", "127.0.0.1"]) == [
        "/ip4/10.0.0.7/tcp/4000", "/ip4/127.0.0.1/tcp/4000", "/ip4/127.0.0.1/tcp/5"]
    assert announce_problem("/ip4/93.184.216.34/tcp/4001") is None
    assert announce_problem("/dns4/gpu.example.org/tcp/4001") is None
    for bad in ("/ip4/0.0.0.0/tcp/4001", "/ip4/1.2.3.4/tcp/4001/p2p/" + ME, "1.2.3.4:4001", "/ip4/1.2.3.4/udp/4001"):
        assert announce_problem(bad).startswith("--announce"), bad
