"""Port mapping end to end: real ``wgmesh up`` agents behind real miniupnpd routers.

One mesh holds a node behind a symmetric NAT offering each of PCP, NAT-PMP and
UPnP-IGD, and two behind plain symmetric NATs. Each mapped node goes direct
with a plain one (its published ``portmap`` endpoint is the way in); the two
plain ones stay relayed. Then, on the PCP node: a router reboot is survived
(re-mapped, direct again in bounded time), a ``kill -9`` leaves a mapping that
the next start deletes, and ``down`` leaves none.

IPv6: two nodes behind symmetric IPv4 NATs whose routers also give them global
IPv6 behind stateful firewalls go direct over IPv6; with IPv6 on one side only
the pair stays on the relay (both IPv4 NATs are symmetric).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for

from wgmesh.lab.mesh import MeshLab, MeshNode
from wgmesh.lab.network import Lab, NatRouter

pytestmark = pytest.mark.netns
METHODS = ["pcp", "natpmp", "upnp"]
DIRECT_BUDGET = 45.0  # s from the agents up to a direct path (UPnP discovery is slowest)
REBOOT_BUDGET = 30.0  # s from a router reboot to the mapping back and the path direct


def mesh_of(nodes: list[tuple[str, str, bool]]) -> Iterator[MeshLab]:
    """A mesh of (name, NAT kind, IPv6) nodes, all in each other's netmaps."""
    with Lab() as lab:
        m = MeshLab(lab, relays=1)
        for name, kind, ipv6 in nodes:
            m.add_node(name, kind, ipv6=ipv6)
        try:
            m.wait_connected(timeout=90)
            yield m
        finally:
            m.close()


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshLab]:
    yield from mesh_of([*((m, f"symmetric+{m}", False) for m in METHODS),
                        ("plain1", "symmetric", False), ("plain2", "symmetric", False)])


def peer(node: MeshNode, name: str) -> dict[str, Any]:
    p = node.peer(name)
    assert p is not None, f"{name} not in {node.name}'s netmap"
    return p


def direct(a: MeshNode, b: MeshNode) -> bool:
    return peer(a, b.name)["path"] == "direct" and peer(b, a.name)["path"] == "direct"


def nat(node: MeshNode) -> NatRouter:
    assert node.host.nat is not None
    return node.host.nat


def our_mappings(node: MeshNode) -> list[tuple[str, int, str, int]]:
    """The router's redirects to this node's host (its WireGuard port and any leftover)."""
    pmd = nat(node).portmapd
    assert pmd is not None
    return [m for m in pmd.mappings() if m[2] == node.host.ip]


def mapped_to_port(node: MeshNode) -> bool:
    """Exactly one mapping on the router, to the agent's current WireGuard port."""
    port = node.status()["listen_port"]
    return [(m[0], m[3]) for m in our_mappings(node)] == [("udp", port)]


@pytest.mark.parametrize("method", METHODS)
def test_mapped_symmetric_goes_direct_with_symmetric(mesh: MeshLab, method: str) -> None:
    a, b = mesh.nodes[method], mesh.nodes["plain1"]
    wait_for(lambda: direct(a, b), timeout=DIRECT_BUDGET, what=f"{method} x plain1 direct",
             interval=0.5)
    assert peer(b, a.name)["via_portmap"] and peer(a, b.name)["via_portmap"]
    assert mapped_to_port(a)
    pm = a.call("netcheck", timeout=60)["portmap"]
    assert pm["method"] == method and pm["protocols"][method]["ok"], pm
    assert pm["external"].startswith(nat(a).ip + ":")
    assert pm["external"] in a.status()["endpoints"]  # published like a STUN endpoint


def test_symmetric_pair_without_mapping_stays_relayed(mesh: MeshLab) -> None:
    a, b = mesh.nodes["plain1"], mesh.nodes["plain2"]
    # Both mapped pairs went direct in this time; this one has no way in.
    wait_for(lambda: direct(mesh.nodes["pcp"], a), timeout=DIRECT_BUDGET, what="pcp direct")
    assert peer(a, b.name)["path"] == "relay" and peer(b, a.name)["path"] == "relay"
    assert not peer(a, b.name)["via_portmap"]
    pm = a.call("netcheck", timeout=60)["portmap"]
    assert pm["external"] is None and not any(p["ok"] for p in pm["protocols"].values()), pm


def test_router_reboot_remaps_and_direct_again(mesh: MeshLab) -> None:
    a, b = mesh.nodes["pcp"], mesh.nodes["plain2"]
    wait_for(lambda: direct(a, b), timeout=DIRECT_BUDGET, what="pcp x plain2 direct")
    nat(a).reboot()
    assert our_mappings(a) == []  # the reboot really lost it
    # "direct" alone can be the pre-reboot path not yet timed out: the proof is the new
    # mapping, both sides direct, and a ping that crosses the tunnel on that path.
    wait_for(lambda: mapped_to_port(a) and direct(a, b)
             and (r := a.ping(b.name, timeout=2))["rtt_ms"] is not None
             and r["path"] == "direct",
             timeout=REBOOT_BUDGET, what="re-mapped and direct after the router reboot",
             interval=0.5)


def test_kill9_then_down_leave_no_mapping(mesh: MeshLab) -> None:
    a = mesh.nodes["pcp"]
    wait_for(lambda: mapped_to_port(a), timeout=DIRECT_BUDGET, what="pcp mapped")
    os.killpg(a.proc.pid, signal.SIGKILL)
    a.proc.wait(10)
    assert our_mappings(a), "the killed agent's mapping should still be on the router"
    a.restart()
    a.proc.wait_for_output("wgmesh up:", timeout=60)
    # The stale mapping is deleted first; only the new one, to the new port, remains.
    wait_for(lambda: mapped_to_port(a), timeout=REBOOT_BUDGET, what="stale mapping replaced")
    a.stop()  # SIGTERM: the agent goes down, deleting its mapping
    assert a.proc.poll() is not None
    assert our_mappings(a) == []


@pytest.fixture(scope="module")
def mesh6() -> Iterator[MeshLab]:
    yield from mesh_of([("v6a", "symmetric", True), ("v6b", "symmetric", True),
                        ("v4only", "symmetric", False)])


def test_symmetric_pair_with_ipv6_goes_direct_over_ipv6(mesh6: MeshLab) -> None:
    a, b = mesh6.nodes["v6a"], mesh6.nodes["v6b"]
    wait_for(lambda: direct(a, b), timeout=DIRECT_BUDGET, what="v6a x v6b direct",
             interval=0.5)
    assert b.host.ip6 is not None and a.host.ip6 is not None
    assert peer(a, b.name)["endpoint"].startswith(b.host.ip6 + ":")
    assert peer(b, a.name)["endpoint"].startswith(a.host.ip6 + ":")
    assert a.ping(b.name)["rtt_ms"] is not None


def test_ipv6_on_one_side_only_stays_relayed(mesh6: MeshLab) -> None:
    a, c = mesh6.nodes["v6a"], mesh6.nodes["v4only"]
    wait_for(lambda: direct(a, mesh6.nodes["v6b"]), timeout=DIRECT_BUDGET,
             what="v6a x v6b direct", interval=0.5)
    assert peer(a, c.name)["path"] == "relay" and peer(c, a.name)["path"] == "relay"
    assert a.ping(c.name)["rtt_ms"] is not None  # still reachable, over the relay


def test_netcheck_cli_reports_each_protocol(lab: Lab, tmp_path: Path) -> None:
    relay = lab.add_public_host("relay")
    lab.python(relay, "-m", "wgmesh", "relay", "serve", "--listen", f"{relay.ip}:3340",
               "--key-file", str(tmp_path / "relay.key")).wait_for_output('"listening"',
                                                                          timeout=30)
    mapped, plain = lab.add_node_host("m", "symmetric+pcp"), lab.add_node_host("p", "eim")
    stun = ["--stun", f"{relay.ip}:3478"]
    r = json.loads(lab.run(mapped, [sys.executable, "-m", "wgmesh", "netcheck", "--json",
                                    *stun], timeout=60).stdout)
    assert mapped.nat is not None and mapped.nat.portmapd is not None
    got = r["portmap"]["protocols"]
    assert got["pcp"]["ok"] and got["pcp"]["external"].startswith(mapped.nat.ip + ":"), got
    assert not got["natpmp"]["ok"] and got["natpmp"]["error"], got  # this router: PCP only
    assert not got["upnp"]["ok"] and got["upnp"]["error"], got
    assert mapped.nat.portmapd.mappings() == []  # the probe deleted its mapping
    text = lab.run(plain, [sys.executable, "-m", "wgmesh", "netcheck", *stun],
                   timeout=60).stdout
    assert "Port mapping:" in text and "pcp: no (" in text and "maps to" not in text
