"""Subnet routes and an exit node on the kernel backend, in the VM: the route goes into the
kernel (pyroute2) as the peer's allowed IP, the router forwards and masquerades, its nft
table's ``forward`` chain enforces the policy, and the exit node's policy routing leaves
the client's routes and rules as they were after ``down``. One lab for the VM's budget."""

from __future__ import annotations

import sys

import pytest
from flows import SERVER, connect
from polling import wait_for
from routetools import FAR, LAN, POLICY, host_dump, reaches, routes

from wgmesh.lab.mesh import MeshLab
from wgmesh.lab.network import Lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]
#: Estimated seconds in the emulated VM (tests/support/vmtier.py balances its VMs by it).
VM_COST_S = 500


def test_kernel_subnet_router_and_exit_node(lab: Lab) -> None:
    mesh = MeshLab(lab, relays=1, backend="kernel", policy={
        **POLICY, "autoApprovers": {"routes": {LAN: ["tag:router"]}, "exitNode": ["tag:exit"]}})
    r = mesh.add_node("r", "eim", tags=("tag:router", "tag:exit"),
                      args=["--advertise-routes", LAN, "--advertise-exit-node"])
    plain = lab.add_subnet_host("plain", [r.host])
    far = lab.add_subnet_host("far", [r.host], prefix=FAR)
    lab.python(plain, "-c", SERVER, "80").wait_for_output("ready", timeout=120)
    c_host = lab.add_node_host("c", "eim")
    before = host_dump(lab, c_host)
    c = mesh.add_node("c", "eim", tags=("tag:client",), host=c_host, verbose=True,
                      args=["--accept-routes", "--exit-node", "r"])
    d = mesh.add_node("d", "eim", args=["--accept-routes"])
    mesh.wait_up(240)
    assert c.status()["backend"] == "kernel"
    wait_for(lambda: f"{LAN} dev wgc" in routes(lab, c_host), 240,
             lambda: f"kernel route on c: {routes(lab, c_host)}\n{c.proc.stderr[-4000:]}")
    wait_for(lambda: reaches(lab, c_host, plain.ip, timeout=3), 120, "c reaches the LAN")
    assert connect(lab, c_host, plain.ip, 80) == "hello"
    assert "chain forward" in lab.run(r.host, ["nft", "list", "ruleset"]).stdout
    wait_for(lambda: f"{LAN} dev wgd" in routes(lab, d.host), 120, "route on d")
    assert connect(lab, d.host, plain.ip, 80).startswith("refused")  # r's forward chain
    wait_for(lambda: reaches(lab, c_host, far.ip, timeout=3), 120, "c exits through r")
    lab.run(c_host, [sys.executable, "-m", "wgmesh", "down", "--socket", c.socket])
    c.proc.wait(120)
    # the kernel interface goes with down; routes and rules are as before the agent
    assert host_dump(lab, c_host) == before
    mesh.close()
