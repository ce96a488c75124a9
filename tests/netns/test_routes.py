"""Subnet routers and exit nodes in the lab (userspace backend): a LAN behind router node R with a plain host that runs no wgmesh; approval, policy,
failover to a second router, an exit node, and a host left exactly as it was."""

from __future__ import annotations

import json
import os
import signal

import pytest
from flows import SERVER, connect
from polling import wait_for
from routetools import (
    FAR,
    LAN,
    POLICY,
    fail_over,
    host_dump,
    primaries,
    reaches,
    rejoin,
    router_pair,
    routes,
    routes_json,
)
from systools import need

from wgmesh.lab.mesh import MeshLab
from wgmesh.lab.network import Lab

pytestmark = pytest.mark.netns

def test_subnet_router_approval_policy_and_snat(lab: Lab) -> None:
    """C reaches a plain host behind R (ping, TCP) only once the route is approved; D,
    which the policy does not let into the LAN, gets the route but R's filter drops it."""
    mesh = MeshLab(lab, relays=1, policy=POLICY)
    r = mesh.add_node("r", "eim", tags=("tag:router",), args=["--advertise-routes", LAN])
    plain = lab.add_subnet_host("plain", [r.host], prefix="198.18.0")
    lab.python(plain, "-c", SERVER, "80").wait_for_output("ready")
    c = mesh.add_node("c", "eim", tags=("tag:client",),
                      args=["--accept-routes", "--mtu", "1380"])
    d = mesh.add_node("d", "eim", args=["--accept-routes"])
    mesh.wait_up()
    for n in (c, d):  # c and d see r, not each other (no rule links them)
        wait_for(lambda n=n: n.peer("r"), 30, f"{n.name} sees r")
    wait_for(lambda: routes_json(mesh), 20, "r's advertisement at control")
    row = routes_json(mesh)[0]
    assert (row["name"], row["advertised"], row["enabled"]) == ("r", [LAN], [])
    # unapproved: installed nowhere, and nothing reaches the LAN
    for n in (c, d, r):
        assert f"{LAN} dev wg" not in routes(lab, n.host)
    assert not reaches(lab, c.host, plain.ip)
    mesh.admin("routes", "approve", "r", LAN)
    wait_for(lambda: f"{LAN} dev wgc" in routes(lab, c.host), 20, "route on c")
    wait_for(lambda: reaches(lab, c.host, plain.ip), 30, "c pings the plain host through r")
    assert connect(lab, c.host, plain.ip, 80) == "hello"
    # SNAT (the default): the plain host has no route to the mesh, yet TCP works
    assert "100.64.0.0/10" not in routes(lab, plain)
    # d installed the route (it accepts routes, and sees r) but r's filter refuses it
    wait_for(lambda: f"{LAN} dev wgd" in routes(lab, d.host), 20, "route on d")
    assert not reaches(lab, d.host, plain.ip, timeout=2)
    assert connect(lab, d.host, plain.ip, 80).startswith("refused")
    assert any(e["action"] == "routes.approve" for e in
               json.loads(mesh.admin("audit", "list", "--json", "--limit", "10000")))
    st = c.status()
    assert st["mtu"] == 1380 and "mtu 1380" in lab.run(c.host, ["ip", "link", "show",
                                                                "wgc"]).stdout
    assert st["routes"]["accept_routes"] is True
    mesh.admin("routes", "reject", "r", LAN)  # withdrawn: the route leaves c again
    wait_for(lambda: f"{LAN} dev wgc" not in routes(lab, c.host), 20, "route gone from c")
    mesh.close()


def test_router_failover_is_bounded(lab: Lab) -> None:
    """Two routers for one LAN: R is primary; kill -9 R and R2 carries the prefix; the
    time from the kill to the first answered ping is measured and bounded: at worst
    control's stream keepalive (2 s here) plus presence batching (1 s) and the delta's
    way to C (``routetools.router_pair``; ``benchmarks/routes.py`` measures it)."""
    pair = router_pair(lab)
    before = primaries(pair.mesh)
    assert before in ({"r": [LAN], "r2": []}, {"r": [], "r2": [LAN]})
    first, took = fail_over(pair)
    after = primaries(pair.mesh)
    assert after[first.name] == [] and after[({"r", "r2"} - {first.name}).pop()] == [LAN]
    print(f"router failover (kill -9 of the primary): {took:.2f} s to the first answered ping")
    assert took < 8
    rejoin(pair, first)  # the old primary returns: the prefix stays where it is (no flap)
    assert primaries(pair.mesh) == after
    assert reaches(lab, pair.c.host, pair.plain.ip)
    pair.mesh.close()


def test_router_whose_host_is_lost_fails_over(lab: Lab) -> None:
    """The primary router's host loses its uplink (no FIN, no RST reaches control): its
    netmap stream is aborted once a keepalive stays unacknowledged (TCP_USER_TIMEOUT, 5 s
    with the lab's 2 s keepalive), so it goes offline and R2 carries the prefix. Before,
    control kept the lost router primary for minutes (no failover within 30 s)."""
    pair = router_pair(lab)
    first, took = fail_over(pair, 40, uplink=True)
    after = primaries(pair.mesh)
    assert after[({"r", "r2"} - {first.name}).pop()] == [LAN]
    print(f"router failover (uplink of the primary lost): {took:.2f} s to the first "
          "answered ping")
    assert took < 20  # keepalive 2 s + unacked timeout 5 s + presence and delta; generous
    pair.mesh.close()


def test_exit_node_and_host_restored_after_down_and_kill(lab: Lab) -> None:
    """C sends its internet traffic through exit node E to a host only E's uplink reaches;
    control and relays stay on the underlay; ``down`` and ``kill -9`` + ``wgmesh down
    --state-dir`` leave C's routes and rules exactly as before."""
    need("nft")
    mesh = MeshLab(lab, relays=1, policy=POLICY)
    e = mesh.add_node("e", "eim", tags=("tag:exit",), args=["--advertise-exit-node"])
    far = lab.add_subnet_host("far", [e.host], prefix=FAR)
    c_host = lab.add_node_host("c", "eim")
    before = host_dump(lab, c_host)
    c = mesh.add_node("c", "eim", tags=("tag:client",), host=c_host,
                      args=["--exit-node", "e"])
    mesh.wait_connected()
    assert not reaches(lab, mesh.relay_hosts[0], far.ip)  # not on the lab internet
    wait_for(lambda: c.status()["routes"]["exit_active"] == "e", 30, "exit node in use")
    wait_for(lambda: reaches(lab, c_host, far.ip), 30, "c reaches the far host through e")
    # control and the relay stay on the underlay: the kernel routes them via eth0
    for ip in (mesh.control.ip, mesh.relay_hosts[0].ip):
        assert "dev eth0" in lab.run(c_host, ["ip", "route", "get", ip]).stdout
    assert "dev wgc" in lab.run(c_host, ["ip", "route", "get", far.ip]).stdout
    assert c.status()["control_online"]
    lab.run(c_host, [*_wgmesh(), "down", "--socket", c.socket])
    c.proc.wait(30)
    assert host_dump(lab, c_host) == before
    c.restart()  # same state dir: comes back with the exit node
    wait_for(lambda: reaches(lab, c_host, far.ip), 40, "exit node after a restart")
    os.kill(c.proc.pid, signal.SIGKILL)
    c.proc.wait(10)
    assert host_dump(lab, c_host) != before  # the rules outlive a killed agent...
    state = str(mesh.dir / "nodes" / "c")
    out = lab.run(c_host, [*_wgmesh(), "down", "--socket", c.socket, "--state-dir", state])
    assert "restored" in out.stdout
    assert host_dump(lab, c_host) == before  # ...until down (or the next start) undoes them
    mesh.close()


def _wgmesh() -> list[str]:
    import sys

    return [sys.executable, "-m", "wgmesh"]
