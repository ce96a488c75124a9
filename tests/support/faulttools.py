"""The mesh faults of issue 14 as checks both backends run: ``kill -9`` of the control
service and of a relay in a running mesh; NAT flush, NAT reboot with new external ports
and host roaming under a direct pair. The userspace backend runs them in
``tests/netns/test_faults.py``, the kernel backend in the VM at the end of
``tests/kernel/test_node_kernel.py``'s mesh (an agent start costs tens of seconds there).
Timeouts are the host's, scaled by ``TIME_SCALE`` (the VM's emulation)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from polling import wait_for

from wgmesh.lab.mesh import CONTROL_PORT, RELAY_PORT, MeshLab, MeshNode
from wgmesh.lab.network import TIME_SCALE, Host


def pings(a: MeshNode, peer: str) -> bool:
    """One ping through the tunnel answered (the path is whatever the node uses)."""
    return a.ping(peer, timeout=2 * TIME_SCALE)["rtt_ms"] is not None


def path(a: MeshNode, peer: str) -> str | None:
    p = a.peer(peer)
    return p["path"] if p else None


def relay_conns(host: Host, relay: Host) -> int:
    """Established TCP connections from ``host`` to ``relay``'s relay port."""
    out = host.run(["ss", "-Htn", "state", "established", "dst",
                    f"{relay.ip}:{RELAY_PORT}"]).stdout
    return len(out.splitlines())


def control_sources(mesh: MeshLab, host: Host) -> set[str]:
    """The local addresses of ``host``'s established TCP connections to control."""
    out = host.run(["ss", "-Htn", "state", "established", "dst",
                    f"{mesh.control.ip}:{CONTROL_PORT}"]).stdout
    return {line.split()[2].rpartition(":")[0] for line in out.splitlines()}


def control_killed_tunnels_carry_on(mesh: MeshLab, a: MeshNode, *peers: MeshNode) -> None:
    """SIGKILL control: ``a`` notices, its tunnels to ``peers`` carry traffic both ways
    while control is down and nobody forgets a peer; once control is back every one of
    them is on its stream again. The agents are never restarted."""
    assert mesh.control_proc.kill() == -signal.SIGKILL
    wait_for(lambda: not a.status()["control_online"], 10 * TIME_SCALE,
             "a to notice control is gone")
    for _ in range(3):
        for p in peers:
            assert pings(a, p.name) and pings(p, a.name)
    for p in peers:  # nobody forgot a peer for want of control
        assert a.peer(p.name) and p.peer(a.name)
    mesh.restart_control()
    wait_for(lambda: all(n.status()["control_online"] for n in (a, *peers)), 30 * TIME_SCALE,
             "every agent back on control's stream")
    assert all(n.proc.poll() is None for n in (a, *peers))


def relay_killed_relayed_peers_move(mesh: MeshLab, a: MeshNode, b: MeshNode,
                                    u: MeshNode) -> None:
    """``a`` and ``b`` are direct, ``u`` reaches both through the region's first relay,
    where everyone is homed. SIGKILL that relay: ``u`` moves to the second and reaches
    ``a`` and ``b`` through it, while ``a``-``b`` stays direct and answering at every poll."""
    first, second = mesh.relay_hosts[:2]
    assert relay_conns(u.host, first) == 1
    assert mesh.relay_procs[0].kill() == -signal.SIGKILL

    def u_moved() -> bool:
        # The direct pair never notices: direct and answering all the while u moves.
        assert path(a, b.name) == "direct" and path(b, a.name) == "direct"
        assert pings(a, b.name)
        return relay_conns(u.host, second) == 1

    wait_for(u_moved, 30 * TIME_SCALE, "u on the region's second relay")
    wait_for(lambda: pings(u, a.name) and pings(a, u.name) and pings(u, b.name),
             30 * TIME_SCALE, "u reaches a and b through the second relay")
    assert path(u, a.name) == "relay" and path(a, b.name) == "direct"
    assert all(n.proc.poll() is None for n in (a, b, u))


def _direct_both_ways(a: MeshNode, b: MeshNode) -> bool:
    return path(a, b.name) == "direct" and path(b, a.name) == "direct"


def _endpoint(a: MeshNode, peer: MeshNode) -> str:
    p = a.peer(peer.name)
    return str(p["endpoint"]) if p else ""


def nat_faults_direct_again(mesh: MeshLab, a: MeshNode, b: MeshNode) -> dict[str, float]:
    """Three faults under the direct pair ``a``-``b`` (each behind its own NAT), one after
    the other, with the agents running throughout:

    - both routers flush their NAT state (``conntrack -F``), as a mapping timeout would;
    - ``b``'s host roams to a new LAN address, so its router gives it a new mapping:
      ``a`` must be direct again on it, and ``b``'s control stream must move to the new
      address within seconds (a netmap change would not reach ``b`` meanwhile);
    - ``a``'s router reboots and maps to other external ports (50000-50100) from then on:
      ``b`` must be direct again on ``a``'s new mapping. Last, because a port range makes
      the lab's router pick a port per destination: it is a symmetric NAT from then on.

    After each the pair is direct both ways and answers pings both ways. Returns the
    seconds each took (docs/reliability.md records them; bounded only by the deadline)."""
    assert a.host.nat is not None and b.host.nat is not None
    wait_for(lambda: _direct_both_ways(a, b), 30 * TIME_SCALE, "a-b direct before the faults")
    took: dict[str, float] = {}

    def back(fault: str, t0: float, moved: Callable[[], bool] = lambda: True) -> None:
        def direct_again() -> bool:
            return (_direct_both_ways(a, b) and moved() and pings(a, b.name)
                    and pings(b, a.name))
        wait_for(direct_again, 60 * TIME_SCALE,
                 lambda: f"direct and answering again after the {fault}: a sees "
                         f"{a.peer(b.name)}, b sees {b.peer(a.name)}")
        took[fault] = round(time.monotonic() - t0, 1)

    t0 = time.monotonic()
    a.host.nat.flush()
    b.host.nat.flush()
    back("NAT flush", t0)

    before = _endpoint(a, b)
    t0 = time.monotonic()
    new_ip = mesh.lab.renumber(b.host, 77)
    # b's netmap stream leaves the gone address at once, not at its 45 s read timeout
    wait_for(lambda: control_sources(mesh, b.host) == {new_ip}, 10 * TIME_SCALE,
             lambda: f"b's control connections from {new_ip} only: "
                     f"{control_sources(mesh, b.host)}")
    back("roam", t0, lambda: _endpoint(a, b) not in ("", before))

    nat = a.host.nat
    mesh.lab.run(nat, ["iptables", "-w", "-t", "nat", "-I", "POSTROUTING", "-o", "eth0", "-p",
                       "udp", "-j", "MASQUERADE", "--to-ports", "50000-50100"])
    t0 = time.monotonic()
    nat.reboot()

    def on_new_ports() -> bool:
        host, _, port = _endpoint(b, a).rpartition(":")
        return host == nat.ip and 50000 <= int(port or 0) <= 50100

    back("NAT reboot with new ports", t0, on_new_ports)
    assert all(n.status()["control_online"] for n in (a, b))
    assert all(n.proc.poll() is None for n in (a, b))
    print(f"NAT faults, seconds to direct again: {took}", flush=True)
    return took
