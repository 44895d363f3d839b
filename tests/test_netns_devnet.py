"""The devnet on separate network stacks (devnet/netns.py): every node in its own
network namespace, providers behind NAT routers (nftables), links through the user-space
wire. Root only: skipped, with the reason, where namespaces cannot be made.

What it shows: a provider behind each NAT kind sells (through the bootstrap's relay, or
directly through a port forward) and says how it is reached; the relay killed while a
job is in flight loses nothing, and NATed providers sell through it again once it is back.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys

import numpy as np
import pytest
import trio

from devnet import netns
from devnet.invariants import violations
from devnet.launcher import open_devnet
from node.buyer import Buyer, SubmitSpec
from node.calibrate import reference_model_path
from node.p2p import open_p2p_node
from libp2p.peer.id import ID

MODEL = reference_model_path("squeezenet")
GUARD_S = 120.0  # a hang guard, not a measurement
pytestmark = pytest.mark.skipif((netns.unavailable() or netns.nat_unavailable()) is not None,
                                reason=f"no namespace devnet here: {netns.unavailable() or netns.nat_unavailable()}")


def _status(child) -> dict:
    return json.loads((child.home / "status.json").read_text())


def _spec(net, tmp_path, name: str, count: int, solver: str, seed: int) -> SubmitSpec:
    x = np.random.default_rng(seed).random((1, 3, 224, 224), dtype=np.float32)
    return SubmitSpec(model_path=MODEL, inputs={"data_0": x}, count=count, bootstrap=[net.bootstrap_addr],
                      home=tmp_path / name, out_dir=tmp_path / f"{name}-out", solver=solver)


async def test_a_provider_behind_each_nat_sells_and_says_how_it_is_reached(tmp_path):
    nats = {0: "none", 1: "cone", 2: "symmetric", 3: "forwarded"}
    async with open_devnet(4, root=tmp_path / "net", netns=True, nats=nats) as net:
        relay = net.bootstrap_addr
        how = {i: _status(c)["reachability"] for i, c in enumerate(net.providers)}
        public = {s.name: s.public_address for s in net.spots}
        assert how[0]["state"] == "public" and how[3]["state"] == "public"
        assert how[3]["observed_ip"] == public["provider-3"]  # its router's address, forwarded to it
        for i in (1, 2):
            assert how[i]["state"] == "private" and how[i]["observed_ip"] == public[f"provider-{i}"]
            assert how[i]["how"].startswith(f"behind NAT ({public[f'provider-{i}']} as seen from outside), "
                                            f"selling through relay {relay}")
            assert _status(net.providers[i])["addrs"] == [
                f"{relay}/p2p-circuit/p2p/{net.providers[i].ready['peer_id']}"]
        with trio.fail_after(GUARD_S):
            outcomes, _ = await Buyer(_spec(net, tmp_path, "buyer", 8, "round-robin", 1)).run()
        assert [o.state for o in outcomes] == ["settled"] * 8, [o.error for o in outcomes]
        assert {o.provider for o in outcomes} == {c.ready["peer_id"] for c in net.providers}
        provider_homes = [c.home for c in net.providers]

        # A buyer on the internet reaches the provider behind the cone NAT through the
        # relay, then directly by hole punching (bench/links.py reports each NAT pair).
        await _punched_through(net.providers[1], net.bootstrap_addr)
    assert violations([tmp_path / "buyer"], provider_homes) == []


async def _punched_through(provider, bootstrap: str) -> None:
    peer_id = provider.ready["peer_id"]
    async with open_p2p_node(secrets.token_bytes(32), ["/ip4/0.0.0.0/tcp/0"]) as buyer:
        with trio.fail_after(GUARD_S):
            buyer.keep_connected([bootstrap])  # as a Client does: identify tells it its public address
            await buyer.first_dials([bootstrap])
            await buyer.connect(peer_id, _status(provider)["addrs"])
            assert buyer.counters["relayed-dials"] == 1
            async for event in provider.events:
                if event.get("event") == "hole-punched" and event["peer"] == buyer.peer_id:
                    break
        kinds = {str(c.get_connection_type()).rsplit(".", 1)[-1]
                 for c in buyer.host.get_network().get_connections(ID.from_base58(peer_id))}
        assert "DIRECT" in kinds, kinds


async def test_devnet_clean_removes_what_a_killed_launcher_left(tmp_path):
    launcher = await trio.lowlevel.open_process(
        [sys.executable, "-m", "node.cli", "devnet", "up", "-n", "1", "--netns", "--root", str(tmp_path / "net")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(GUARD_S):
            line = b""
            while b"\n" not in line:
                line += await launcher.stdout.receive_some(4096)
    finally:
        launcher.kill()  # SIGKILL: no cleanup of its own
        await launcher.wait()
    left = netns.ours().get(launcher.pid, [])
    assert len(left) == 3  # bootstrap, buyer, provider: the wire went down with the launcher
    pids = [int(p) for ns in left for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                                          text=True).stdout.split()]
    assert pids  # the nodes outlived it
    assert set(left) <= set(netns.clean())
    assert launcher.pid not in netns.ours()
    assert all(netns.gone(pid) for pid in pids)


async def test_the_relay_killed_mid_job_loses_nothing_and_relayed_jobs_resume_when_it_is_back(tmp_path):
    # Provider 0 sits behind a cone NAT and is the cheapest; it stops itself once its
    # first result is durable but not yet sent, so the job is in flight through the relay.
    fault = {0: {"IDLEMESH_FAULT": "provider-before-result:stop"}}
    pricey = {1: ["--price-per-s", "0.01"]}
    async with open_devnet(2, root=tmp_path / "net", netns=True, nats={0: "cone"}, extra_env=fault,
                           extra_args=pricey) as net:
        nated, public = net.providers
        results = {}

        async def buy() -> None:
            results["first"], _ = await Buyer(_spec(net, tmp_path, "buyer", 1, "greedy-price", 2)).run()

        with trio.fail_after(GUARD_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(buy)
                async for event in nated.events:
                    if event.get("event") == "fault":
                        break
                net.bootstrap.process.kill()  # the relay dies with the job's circuit on it
                await net.bootstrap.process.wait()
                nated.process.send_signal(signal.SIGCONT)
        (first,) = results["first"]
        assert first.state == "settled", first.error
        assert first.provider == public.ready["peer_id"] and len(first.attempts) > 1  # re-placed

        # The relay comes back on its address; the NATed provider reserves again and
        # sells through it (greedy-price puts the jobs on it once its offer is back).
        await net.restart(net.bootstrap)
        with trio.fail_after(GUARD_S):
            async for event in nated.events:
                if event.get("event") == "reachability" and any("/p2p-circuit" in a for a in event["addrs"]):
                    break
            second, _ = await Buyer(_spec(net, tmp_path, "buyer", 3, "greedy-price", 3)).run()
        assert [o.state for o in second] == ["settled"] * 3, [o.error for o in second]
        assert {o.provider for o in second} == {nated.ready["peer_id"]}
        provider_homes = [c.home for c in net.providers]
    assert violations([tmp_path / "buyer"], provider_homes) == []


async def test_worker_threads_made_inside_the_buyers_namespace_do_not_outlive_it():
    """trio keeps its worker threads, and a thread starts in its maker's namespace: a
    worker made while the launcher was the buyer once spawned a later devnet's nodes
    in a deleted namespace, unreachable from here."""
    def where() -> str:
        return os.readlink("/proc/thread-self/ns/net")

    home = where()
    await trio.to_thread.run_sync(where)  # an idle worker of the home namespace
    (spot,) = netns.plan(["probe"], tag=f"{os.getpid()}t")
    netns.create([spot])
    try:
        with netns.entered(spot.ns):
            inside = where()
            assert inside != home and await trio.to_thread.run_sync(where) == inside
        assert where() == home and await trio.to_thread.run_sync(where) == home
    finally:
        netns.remove([spot.ns])
