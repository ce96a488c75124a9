"""Faults in a running mesh (issue 14, Faults), userspace backend, real processes in a lab.

- ``kill -9`` of the control service: tunnels keep carrying traffic while it is down,
  and the agents resume their streams when it returns (the store side, mid-write, is
  ``tests/service/test_control_faults.py``);
- ``kill -9`` of a relay: relayed peers move to the region's other relay, direct peers
  never leave their direct path;
- roaming: a node's LAN address changes under the running agent; the path comes back,
  direct where it was direct.

NAT flush and NAT reboot with new external ports are the grid's ``recovered_after_flush``
(``tests/netns/test_grid.py``) and ``tests/unit/test_traversal_sim.py``; a node's clock
jumping is ``tests/unit/test_faults_clock.py``. The kernel backend runs only in the VM
tier and is not faulted here.
"""

from __future__ import annotations

import signal

import pytest
from polling import wait_for

from wgmesh.lab.mesh import RELAY_PORT, MeshLab, MeshNode
from wgmesh.lab.network import Host, Lab

pytestmark = pytest.mark.netns


def _pings(a: MeshNode, peer: str) -> bool:
    """One ping through the tunnel answered (the path is whatever the node uses)."""
    return a.ping(peer, timeout=2)["rtt_ms"] is not None


def _path(a: MeshNode, peer: str) -> str | None:
    p = a.peer(peer)
    return p["path"] if p else None


def test_control_killed_tunnels_carry_on_and_streams_resume(lab: Lab) -> None:
    mesh = MeshLab(lab, relays=1)
    a, b = mesh.add_node("a", "eim"), mesh.add_node("b", "eim")
    mesh.wait_connected()
    wait_for(lambda: _path(a, "b") == "direct", 30, "a-b direct")
    assert mesh.control_proc.kill() == -signal.SIGKILL
    wait_for(lambda: not a.status()["control_online"], 10, "a to notice control is gone")
    for _ in range(3):  # control down: the tunnel carries traffic both ways
        assert _pings(a, "b") and _pings(b, "a")
    assert a.peer("b") and b.peer("a")  # nobody forgot a peer for want of control
    mesh.restart_control()
    wait_for(lambda: a.status()["control_online"] and b.status()["control_online"], 30,
             "both agents back on control's stream")
    mesh.admin("nodes", "rename", "b", "bee")  # a change made after the restart
    wait_for(lambda: a.peer("bee") is not None, 20, "the change to reach a")
    wait_for(lambda: b.status()["name"] == "bee", 20, "the change to reach b")
    assert _pings(a, "bee")
    assert a.proc.poll() is None and b.proc.poll() is None  # no agent restarted
    mesh.close()


def _relay_conns(host: Host, relay: Host) -> int:
    """Established TCP connections from ``host`` to ``relay``'s relay port."""
    out = host.run(["ss", "-Htn", "state", "established", "dst",
                    f"{relay.ip}:{RELAY_PORT}"]).stdout
    return len(out.splitlines())


def test_relay_killed_relayed_peers_move_direct_peers_stay(lab: Lab) -> None:
    mesh = MeshLab(lab, relays=2)
    a, b = mesh.add_node("a", "eim"), mesh.add_node("b", "eim")
    u = mesh.add_node("u", "udp-blocked")  # every path to u is relayed
    mesh.wait_connected()
    first, second = mesh.relay_hosts
    wait_for(lambda: _path(a, "b") == "direct", 30, "a-b direct")
    wait_for(lambda: _pings(u, "a") and _pings(u, "b"), 30, "u reaches a and b")
    assert _relay_conns(u.host, first) == 1  # the region's first relay is everyone's home
    assert mesh.relay_procs[0].kill() == -signal.SIGKILL

    def u_moved() -> bool:
        # The direct pair never notices: direct and answering all the while u moves.
        assert _path(a, "b") == "direct" and _path(b, "a") == "direct"
        assert _pings(a, "b")
        return _relay_conns(u.host, second) == 1

    wait_for(u_moved, 30, "u on the region's second relay")
    wait_for(lambda: _pings(u, "a") and _pings(a, "u") and _pings(u, "b"), 30,
             "u reaches a and b through the second relay")
    assert _path(u, "a") == "relay" and _path(a, "b") == "direct"
    assert all(n.proc.poll() is None for n in (a, b, u))
    mesh.close()


def test_roaming_node_gets_its_direct_path_back(lab: Lab) -> None:
    """b's LAN address changes under its running agent: its NAT gives the new address a new
    external port, so a's packets to the old mapping go nowhere. b must notice, learn its
    new mapping and tell a; the pair is direct again on the new mapping."""
    mesh = MeshLab(lab, relays=1)
    a, b = mesh.add_node("a", "eim"), mesh.add_node("b", "eim")
    mesh.wait_connected()
    wait_for(lambda: _path(a, "b") == "direct" and _path(b, "a") == "direct", 30,
             "a-b direct")
    before = a.peer("b")["endpoint"]  # type: ignore[index]
    old = b.host.ip
    assert lab.renumber(b.host, 77) != old

    def direct_on_the_new_mapping() -> bool:
        pa = a.peer("b")
        return bool(pa and pa["path"] == "direct" and pa["endpoint"] != before
                    and _path(b, "a") == "direct")

    wait_for(direct_on_the_new_mapping, 30,
             lambda: f"direct again: a sees {a.peer('b')}, b sees {b.peer('a')}")
    assert _pings(a, "b") and _pings(b, "a")
    assert b.status()["control_online"]
    mesh.close()
