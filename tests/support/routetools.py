"""Subnet-router and exit-node helpers for the tests and ``benchmarks/routes.py``: the lab's
LAN ranges, a policy, reachability, the dumps that prove a host's routing was left as it
was, and a LAN behind two routers whose primary can be killed and timed."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from polling import wait_for

from wgmesh.lab.mesh import MeshLab, MeshNode
from wgmesh.lab.network import Host, Lab

# The lab's internet and NAT WANs use all three IPv4 documentation ranges, so the LANs
# here come from the benchmarking range (RFC 2544), which nothing else in the lab uses.
LAN = "198.18.0.0/24"
FAR = "198.19.0"  # "the internet" that only the exit node's uplink reaches
POLICY = {"tags": ["tag:router", "tag:client", "tag:exit"],
          "rules": [{"src": ["tag:client"], "dst": [f"{LAN}:*", "0.0.0.0/0:*"]},
                    {"src": ["*"], "dst": ["tag:router:*", "tag:exit:*"]}],
          "autoApprovers": {"exitNode": ["tag:exit"]}}
#: POLICY with the LAN auto-approved for routers, so two routers carry it unattended.
FAILOVER_POLICY = {**POLICY, "autoApprovers": {"routes": {LAN: ["tag:router"]}}}


def reaches(lab: Lab, host: Host, ip: str, timeout: int = 1) -> bool:
    return lab.run(host, ["ping", "-c1", "-W", str(timeout), ip], check=False).returncode == 0


def routes(lab: Lab, host: Host) -> str:
    return lab.run(host, ["ip", "route", "show", "table", "all"]).stdout


def host_dump(lab: Lab, host: Host) -> tuple[str, str, str]:
    return (routes(lab, host), lab.run(host, ["ip", "rule"]).stdout,
            lab.run(host, ["ip", "-6", "rule"]).stdout)


def routes_json(mesh: MeshLab) -> list[dict[str, Any]]:
    """``wgmesh control routes list --json``: one row per node that advertises routes."""
    return json.loads(mesh.admin("routes", "list", "--json"))["nodes"]  # type: ignore[no-any-return]


def primaries(mesh: MeshLab) -> dict[str, list[str]]:
    """Node name -> the prefixes control made it primary for."""
    return {n["name"]: n["primary"] for n in routes_json(mesh)}


@dataclass
class RouterPair:
    """Routers ``r`` and ``r2`` on one LAN with a ``plain`` host (no wgmesh), and client
    ``c`` that accepts routes."""

    mesh: MeshLab
    r: MeshNode
    r2: MeshNode
    plain: Host
    c: MeshNode

    def primary(self) -> MeshNode:
        """The router control made primary for the LAN."""
        now = primaries(self.mesh)
        return self.r if now.get(self.r.name) else self.r2


def router_pair(lab: Lab, *, backend: str = "userspace",
                router_args: Callable[[str], Sequence[str]] | None = None,
                timeout: float = 40) -> RouterPair:
    """A :class:`RouterPair`, returned once C pings the plain host. Control's stream
    keepalive is 2 s here (15 s by default): a killed agent's kernel closes its netmap
    stream, so control sees it go at once, but a router that vanishes silently is noticed
    only when a write to its stream fails. ``router_args``: more ``wgmesh up`` flags for
    the router of that name."""
    mesh = MeshLab(lab, relays=1, backend=backend, policy=FAILOVER_POLICY,
                   control_args=["--keepalive", "2"])
    r, r2 = (mesh.add_node(name, "eim", tags=("tag:router",),
                           args=["--advertise-routes", LAN,
                                 *(router_args(name) if router_args else ())])
             for name in ("r", "r2"))
    plain = lab.add_subnet_host("plain", [r.host, r2.host], prefix="198.18.0")
    c = mesh.add_node("c", "eim", tags=("tag:client",), args=["--accept-routes"])
    mesh.wait_connected(timeout)
    wait_for(lambda: reaches(lab, c.host, plain.ip), timeout, "c pings the plain host")
    return RouterPair(mesh, r, r2, plain, c)


#: ``ping -D`` reply lines: [wall-clock receive time] ... time=RTT ms
_REPLY = re.compile(r"^\[(\d+\.\d+)\] .* time=([\d.]+) ms$", re.M)


def fail_over(pair: RouterPair, timeout: float = 30, *,
              uplink: bool = False) -> tuple[MeshNode, float]:
    """kill -9 the primary router (``uplink``: take its host's uplink down instead, as if
    the host were lost); returns it and the seconds from then until the first of C's pings
    sent *after the router was gone* is answered (C pings the plain host every 50 ms; a
    reply's send time is its ``ping -D`` timestamp less its round trip). Pings sent
    between the kill and the process's end can still pass the dying router."""
    lab = pair.mesh.lab
    ping = lab.spawn(pair.c.host, ["ping", "-D", "-n", "-i", "0.05", pair.plain.ip])
    try:
        ping.wait_for_output(" time=", timeout=10)
        first = pair.primary()
        killed = time.time()  # ping -D prints wall-clock time
        if uplink:
            lab.run(first.host, ["ip", "link", "set", "eth0", "down"])
        else:
            os.kill(first.proc.pid, signal.SIGKILL)
            first.proc.wait(10)
        gone = time.time()

        def resumed() -> float | None:
            return next((float(t) for t, rtt in _REPLY.findall(ping.stdout)
                         if float(t) - float(rtt) / 1000 > gone), None)

        answered = wait_for(resumed, timeout, "pings resume through the other router")
    finally:
        ping.stop()
    return first, answered - killed


def rejoin(pair: RouterPair, node: MeshNode, timeout: float = 40) -> None:
    """Restart a killed router; wait until control sees it online and C reaches it through
    the tunnel, so it stands by as it did before the kill."""
    node.restart()
    wait_for(lambda: {n["name"]: n["online"] for n in routes_json(pair.mesh)}[node.name],
             timeout, f"{node.name} online again")
    ip = node.ipv4
    wait_for(lambda: reaches(pair.mesh.lab, pair.c.host, ip), timeout,
             f"c reaches {node.name} through the tunnel")
