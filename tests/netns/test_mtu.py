"""Path MTU in the lab (userspace backend): a node behind a 1400-byte uplink. Padded disco
pings find each path's MTU, the interface MTU drops to fit, bulk TCP crosses the tunnel
both ways with no outer packet fragmented, and the node, as a subnet router, clamps the
MSS of SYNs it forwards into the tunnel."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from flows import SERVER, connect, transfer
from polling import wait_for
from routetools import LAN, POLICY
from systools import need

from wgmesh.lab.mesh import MeshLab, MeshNode
from wgmesh.lab.network import Host, Lab

pytestmark = pytest.mark.netns

LINK = 1400
#: A WireGuard data packet carries the tunnel packet plus 32 bytes (header and tag), in
#: UDP (8) in IPv4 (20) or IPv6 (40): what a 1400 link leaves for the tunnel.
TUNNEL_MTU = {4: LINK - 60, 6: LINK - 80}


def _frag_creates(lab: Lab, host: Host) -> int:
    """Fragments this namespace cut (its own packets, or bridged ones), IPv4 and IPv6."""
    snmp = lab.run(host, ["cat", "/proc/net/snmp", "/proc/net/snmp6"]).stdout.splitlines()
    v4 = [ln.split() for ln in snmp if ln.startswith("Ip:")]
    v6 = dict(ln.split() for ln in snmp if ln.startswith("Ip6FragCreates"))
    return int(dict(zip(v4[0], v4[1], strict=True))["FragCreates"]) + int(v6["Ip6FragCreates"])


def _measured(node: MeshNode, peer: str) -> bool:
    """Direct, and both of its paths measured."""
    p = node.peer(peer)
    return bool(p and p["path"] == "direct" and None not in p["path_mtu"].values())


def _family(endpoint: str) -> int:
    """4 or 6, from status's ``ip:port`` (an IPv6 address has colons of its own)."""
    return 6 if endpoint.count(":") > 1 else 4


def test_narrow_uplink_path_mtu_interface_mtu_and_bulk_tcp(lab: Lab, tmp_path: Path) -> None:
    need("nft")
    need("tcpdump")
    policy = {**POLICY, "rules": [*POLICY["rules"],
                                  {"src": ["tag:router"], "dst": ["tag:client:*"]}],
              "autoApprovers": {"routes": {LAN: ["tag:router"]}}}
    mesh = MeshLab(lab, relays=1, policy=policy)
    a_host = lab.add_node_host("a", "none")
    lab.set_link_mtu(a_host, LINK)
    a = mesh.add_node("a", "none", host=a_host, tags=("tag:router",),
                      args=["--advertise-routes", LAN])
    plain = lab.add_subnet_host("plain", [a_host], prefix="198.18.0")
    lab.python(plain, "-c", SERVER, "80").wait_for_output("ready")
    b = mesh.add_node("b", "none", tags=("tag:client",), args=["--accept-routes"])
    mesh.wait_connected()
    for node, peer in ((a, "b"), (b, "a")):
        wait_for(lambda node=node, peer=peer: _measured(node, peer), 40,
                 f"{node.name}: a direct path to {peer}, both paths' MTU measured")
    measured = {}
    for node, peer in ((a, "b"), (b, "a")):
        p = node.peer(peer)
        assert p is not None
        measured[node.name] = want = TUNNEL_MTU[_family(p["endpoint"])]
        # the relay (TCP) carries whole packets: its path is as wide as the asked MTU
        assert p["path_mtu"] == {"direct": want, "relay": 1420}, p
        st = node.status()
        assert (st["mtu"], st["interface_mtu"]) == (1420, want)
        assert f"mtu {want} " in lab.run(node.host, ["ip", "link", "show",
                                                     f"wg{node.name}"]).stdout
    text = lab.run(b.host, [sys.executable, "-m", "wgmesh", "status", "--socket",
                            b.socket]).stdout
    assert f"mtu {measured['b']} (asked 1420" in text

    # bulk TCP both ways: completes, and no outer packet is fragmented anywhere
    payload = tmp_path / "payload"
    payload.write_bytes(bytes(range(256)) * (4 << 12))  # 4 MiB
    hosts = [a.host, b.host, lab.internet]
    before = [_frag_creates(lab, h) for h in hosts]
    transfer(lab, a.host, b.host, b.ipv4, payload, port=9001, timeout=120)
    transfer(lab, b.host, a.host, a.ipv4, payload, port=9002, timeout=120)
    assert [_frag_creates(lab, h) for h in hosts] == before

    # a as a subnet router: the plain host's SYN-ACK into the tunnel gets an MSS that
    # fits a's tunnel (its interface MTU less 40 bytes of IPv4 and TCP), not its own 1460
    wait_for(lambda: connect(lab, b.host, plain.ip, 80) == "hello", 30,
             "b reaches the plain host through a")
    dump = lab.spawn(b.host, ["tcpdump", "-l", "-n", "-v", "-c", "1", "-i", "wgb",
                              "tcp[tcpflags] & (tcp-syn|tcp-ack) == (tcp-syn|tcp-ack)"])
    wait_for(lambda: "listening" in dump.stderr, 20, "tcpdump ready")
    assert connect(lab, b.host, plain.ip, 80) == "hello"
    assert dump.wait(20) == 0
    mss = re.search(r"mss (\d+)", dump.stdout)
    assert mss is not None and int(mss.group(1)) == measured["a"] - 40, dump.stdout
    mesh.close()
