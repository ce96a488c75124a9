"""IPv6-only and IPv4-only nodes still reach every peer (issue 17).

One dual-stack mesh (control and relay serve both families; the relay map lists
the relay's IPv4 and IPv6 URL) holds three ``wgmesh up`` agents (userspace):

* ``v6only``: IPv6 only (its LAN has no IPv4 route off it), control over IPv6;
* ``v4only``: IPv4 only, behind an EIM NAT;
* ``dual``: behind a symmetric IPv4 NAT, with global IPv6 behind a stateful firewall.

``v6only`` and ``v4only`` share no family, so they meet on the relay, which
carries them over IPv6 and IPv4 respectively; ``v6only`` and ``dual`` go direct
over IPv6.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from polling import wait_for

from wgmesh.lab.mesh import RELAY_PORT, MeshLab, MeshNode
from wgmesh.lab.network import Lab

pytestmark = pytest.mark.netns
BUDGET = 45.0  # s from the agents up to the awaited path


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshLab]:
    with Lab() as lab:
        m = MeshLab(lab, relays=1, ipv6=True)
        m.add_node("v6only", "eim", ipv6=True, ipv4=False)
        m.add_node("v4only", "eim")
        m.add_node("dual", "symmetric", ipv6=True)
        try:
            m.wait_connected(timeout=90)
            yield m
        finally:
            m.close()


def peer(node: MeshNode, name: str) -> dict[str, Any]:
    p = node.peer(name)
    assert p is not None, f"{name} not in {node.name}'s netmap"
    return p


def relay_clients(mesh: MeshLab) -> list[str]:
    """The remote addresses of the relay's established node connections."""
    out = mesh.lab.run(mesh.relay_hosts[0], ["ss", "-Htn", "state", "established",
                                             f"( sport = :{RELAY_PORT} )"]).stdout
    return [line.split()[-1].rpartition(":")[0].strip("[]") for line in out.splitlines()]


def test_ipv6_only_host_has_no_ipv4_way_out(mesh: MeshLab) -> None:
    """The lab really is IPv6-only there: IPv4 to control fails, IPv6 works."""
    host = mesh.nodes["v6only"].host
    assert mesh.lab.run(host, ["ping", "-c1", "-W1", mesh.control.ip], check=False).returncode
    assert mesh.lab.run(host, ["ping", "-c1", "-W2", mesh.control.ip6 or ""]).returncode == 0


def test_ipv6_only_node_registers_and_uses_relay_and_stun_over_ipv6(mesh: MeshLab) -> None:
    n = mesh.nodes["v6only"]
    wait_for(lambda: n.host.ip6 in relay_clients(mesh), timeout=BUDGET,
             what=lambda: f"v6only's relay connection over IPv6: {relay_clients(mesh)}")
    st = n.status()
    assert st["ipv4"] and st["home_relay"] == 1  # registered (over IPv6), home relay chosen
    report = n.call("netcheck", timeout=60)
    assert report["ipv4"] is None
    assert report["ipv6"] is not None and report["ipv6"].startswith(f"[{n.host.ip6}]:")
    wait_for(lambda: report["ipv6"] in n.status()["endpoints"], timeout=BUDGET,
             what=lambda: f"an IPv6 candidate published: {n.status()['endpoints']}")


def test_ipv6_only_and_ipv4_only_meet_on_the_dual_stack_relay(mesh: MeshLab) -> None:
    a, b = mesh.nodes["v6only"], mesh.nodes["v4only"]
    wait_for(lambda: b.host.nat is not None and b.host.nat.ip in relay_clients(mesh),
             timeout=BUDGET, what="v4only's relay connection over IPv4")
    ab = wait_for(lambda: a.ping(b.name)["rtt_ms"] is not None, timeout=BUDGET,
                  what="v6only -> v4only ping")
    assert ab
    assert b.ping(a.name)["rtt_ms"] is not None
    assert peer(a, b.name)["path"] == "relay" and peer(b, a.name)["path"] == "relay"


def test_ipv6_only_and_dual_stack_go_direct_over_ipv6(mesh: MeshLab) -> None:
    a, b = mesh.nodes["v6only"], mesh.nodes["dual"]

    def direct() -> bool:
        return peer(a, b.name)["path"] == "direct" and peer(b, a.name)["path"] == "direct"

    wait_for(direct, timeout=BUDGET, what="v6only x dual direct", interval=0.5)
    assert a.host.ip6 is not None and b.host.ip6 is not None
    assert peer(a, b.name)["endpoint"].startswith(b.host.ip6 + ":")
    assert peer(b, a.name)["endpoint"].startswith(a.host.ip6 + ":")
    assert a.ping(b.name)["rtt_ms"] is not None
