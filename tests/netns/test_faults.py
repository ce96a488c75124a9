"""Faults in a running mesh (issue 14, Faults), userspace backend, real processes in a lab.

- ``kill -9`` of the control service: tunnels keep carrying traffic while it is down,
  and the agents resume their streams when it returns (the store side, mid-write, is
  ``tests/service/test_control_faults.py``);
- ``kill -9`` of a relay: relayed peers move to the region's other relay, direct peers
  never leave their direct path;
- NAT flush, NAT reboot with new external ports, and roaming (a node's LAN address
  changes under the running agent): the path comes back, direct where it was direct.

Every NAT pair's flush is also the grid's ``recovered_after_flush``
(``tests/netns/test_grid.py``), and ``tests/unit/test_traversal_sim.py``; a node's clock
jumping is ``tests/unit/test_faults_clock.py``. The kill checks live in
``tests/support/faulttools.py``; the kernel backend runs them in the VM, at the end of
``tests/kernel/test_node_kernel.py``.
"""

from __future__ import annotations

import pytest
from faulttools import (
    control_killed_tunnels_carry_on,
    nat_faults_direct_again,
    path,
    pings,
    relay_killed_relayed_peers_move,
)
from polling import wait_for

from wgmesh.lab.mesh import MeshLab
from wgmesh.lab.network import Lab

pytestmark = pytest.mark.netns


def test_control_killed_tunnels_carry_on_and_streams_resume(lab: Lab) -> None:
    mesh = MeshLab(lab, relays=1)
    a, b = mesh.add_node("a", "eim"), mesh.add_node("b", "eim")
    mesh.wait_connected()
    wait_for(lambda: path(a, "b") == "direct", 30, "a-b direct")
    control_killed_tunnels_carry_on(mesh, a, b)
    mesh.admin("nodes", "rename", "b", "bee")  # a change made after the restart
    wait_for(lambda: a.peer("bee") is not None, 20, "the change to reach a")
    wait_for(lambda: b.status()["name"] == "bee", 20, "the change to reach b")
    assert pings(a, "bee")
    mesh.close()


def test_relay_killed_relayed_peers_move_direct_peers_stay(lab: Lab) -> None:
    mesh = MeshLab(lab, relays=2)
    a, b = mesh.add_node("a", "eim"), mesh.add_node("b", "eim")
    u = mesh.add_node("u", "udp-blocked")  # every path to u is relayed
    mesh.wait_connected()
    wait_for(lambda: path(a, "b") == "direct", 30, "a-b direct")
    wait_for(lambda: pings(u, "a") and pings(u, "b"), 30, "u reaches a and b")
    relay_killed_relayed_peers_move(mesh, a, b, u)
    mesh.close()


def test_nat_flush_reboot_and_roaming_get_the_direct_path_back(lab: Lab) -> None:
    """NAT flush, NAT reboot with new external ports and a roam of b's host under the
    running agents: each time the pair is direct again, on the new mapping where there is
    one (the kernel backend runs the same check in tests/kernel/test_node_kernel.py)."""
    mesh = MeshLab(lab, relays=1)
    a, b = mesh.add_node("a", "eim"), mesh.add_node("b", "eim")
    mesh.wait_connected()
    nat_faults_direct_again(mesh, a, b)
    mesh.close()
