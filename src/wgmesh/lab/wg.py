"""Static WireGuard tunnels between lab hosts, configured with ``wg`` and ``ip``.

Data-plane users (the file drop's peer API, benchmarks) need real WireGuard
tunnels before the Node exists, and independently of its traversal logic. This
builds the tunnels a node would: one interface per host, a /32 (and /128)
tunnel address, one peer per other host with exactly that peer's addresses as
allowed IPs, so WireGuard's cryptokey routing is what ties a source address to
a key. Hosts behind NAT dial the public ones and keep the mapping open; public
hosts learn the NATed endpoint from the authenticated packets (WireGuard
roaming), so NATed-to-public works without traversal. The device is
wireguard-go, or the kernel module where it exists (the VM tier).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Literal

import attrs

from wgmesh.keys import Key, PrivateKey
from wgmesh.lab.network import Host, Lab, LabError, Process

__all__ = ["TUNNEL_NET4", "TUNNEL_NET6", "WgNode", "wg_mesh"]

TUNNEL_NET4 = "100.64.0"
TUNNEL_NET6 = "fd7a:115c:a1e0::"
WG_PORT = 51820
_UAPI_DIR = "/var/run/wireguard"
#: wireguard-go refuses to run on Linux without this acknowledgement.
_WG_GO_ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}


@attrs.define(eq=False)
class WgNode:
    """One host's end of the mesh."""

    host: Host
    ifname: str
    ip: str
    ip6: str
    key: PrivateKey = attrs.field(repr=False)
    process: Process | None = attrs.field(repr=False)  # wireguard-go; None for the kernel

    @property
    def public_key(self) -> Key:
        return self.key.public

    @property
    def addresses(self) -> list[str]:
        return [self.ip, self.ip6]


def _wait_uapi(node_ifname: str, proc: Process, timeout: float = 10.0) -> None:
    sock = f"{_UAPI_DIR}/{node_ifname}.sock"
    deadline = time.monotonic() + timeout
    while not os.path.exists(sock):
        if proc.poll() is not None:
            raise LabError(f"wireguard-go {node_ifname} exited: {proc.stderr[-500:]}")
        if time.monotonic() > deadline:
            raise LabError(f"wireguard-go {node_ifname}: no UAPI socket after {timeout}s")
        time.sleep(0.02)


def wg_mesh(lab: Lab, hosts: Sequence[Host], *, mtu: int = 1420,
            device: Literal["wireguard-go", "kernel"] = "wireguard-go") -> list[WgNode]:
    """A full mesh of WireGuard interfaces over ``hosts``; handshakes are confirmed.

    Interface names carry the lab prefix because wireguard-go's UAPI sockets
    share one directory across namespaces. The processes belong to the lab and
    die with it; deleting the namespace deletes the interfaces. At most one
    host may be behind NAT per pair: nothing here punches holes.
    """
    nodes: list[WgNode] = []
    for i, host in enumerate(hosts, start=1):
        ifname = f"{lab.prefix}{i}"
        proc = None
        if device == "kernel":
            lab.run(host, ["ip", "link", "add", ifname, "type", "wireguard"])
        else:
            proc = lab.spawn(host, ["wireguard-go", "-f", ifname], env=_WG_GO_ENV)
            _wait_uapi(ifname, proc)
        node = WgNode(host, ifname, f"{TUNNEL_NET4}.{i}", f"{TUNNEL_NET6}{i:x}",
                      PrivateKey.generate(), proc)
        lab.run(host, ["wg", "set", ifname, "private-key", "/dev/stdin",
                       "listen-port", str(WG_PORT)], input=node.key.b64() + "\n")
        lab.run(host, ["ip", "addr", "add", f"{node.ip}/32", "dev", ifname])
        lab.run(host, ["ip", "-6", "addr", "add", f"{node.ip6}/128", "dev", ifname, "nodad"])
        lab.run(host, ["ip", "link", "set", ifname, "mtu", str(mtu), "up"])
        nodes.append(node)
    for a in nodes:
        for b in nodes:
            if a is b:
                continue
            if not (a.host.public or b.host.public):
                raise LabError(f"{a.host.name} and {b.host.name} are both behind NAT")
            argv = ["wg", "set", a.ifname, "peer", b.public_key.b64(),
                    "allowed-ips", f"{b.ip}/32,{b.ip6}/128"]
            if b.host.public:
                argv += ["endpoint", f"{b.host.ip}:{WG_PORT}"]
            if not a.host.public:
                argv += ["persistent-keepalive", "5"]
            lab.run(a.host, argv)
            lab.run(a.host, ["ip", "route", "add", f"{b.ip}/32", "dev", a.ifname])
            lab.run(a.host, ["ip", "-6", "route", "add", f"{b.ip6}/128", "dev", a.ifname])
    for a in nodes:
        for b in nodes:
            # A NATed host can only be reached after it dialled; ping from its side.
            if a is not b and (b.host.public or not a.host.public):
                _ping(a, b)
    return nodes


def _ping(a: WgNode, b: WgNode, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        cp = a.host.run(["ping", "-c1", "-W1", b.ip], check=False)
        if cp.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise LabError(f"no tunnel {a.host.name} -> {b.host.name}: {cp.stdout[-300:]}")
