"""The userspace device where hosts and namespaces get complicated (issue 14, items 14
and 15): multi-address hosts, a TUN interface in another namespace than its UDP socket,
and devices of one name in two namespaces."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from polling import wait_for
from wgsides import PORT, Side, two_sides

from wgmesh.lab.network import Host, Lab
from wgmesh.wireguard.uapi import format_endpoint

pytestmark = pytest.mark.netns


def _route_src(lab: Lab, host: Host, dst: str) -> str:
    """The source address the routing table picks in ``host`` towards ``dst``."""
    out = lab.run(host, ["ip", "route", "get", dst]).stdout
    m = re.search(r"\bsrc (\S+)", out)
    assert m, out
    return m.group(1)


def _reached_at(a: Side, b: Side, addr: str) -> str:
    """b (wireguard-go) sends to a at ``addr``; returns where b then sees a's packets
    come from (wireguard-go roams to the source of every authenticated packet)."""
    host = f"[{addr}]" if ":" in addr else addr
    b.wg("set", b.ifname, "peer", a.key.public.b64(), "endpoint", f"{host}:{PORT}")
    b.ping(a)
    a.ping(b)
    return b.endpoint()


def test_replies_leave_from_the_address_the_peer_reached(lab: Lab, tmp_path: Path) -> None:
    """On a host with two IPv4 and two IPv6 addresses, a peer that reaches the device at
    the address routing would not pick gets every reply from that address (IPv4 and
    IPv6), as from the kernel module; the endpoint a NAT or firewall sees never flips."""
    with two_sides(lab, tmp_path) as (a, b):
        assert a.host.ip6 and b.host.ip6
        # second addresses in the subnets b's own addresses are in, so b's packets to
        # either come from the same address of b and only a's choice of source differs
        second4 = re.sub(r"\.\d+$", ".200", a.host.ip)
        second6 = re.sub(r"::[0-9a-f]+$", "::f00d", a.host.ip6)
        lab.run(a.host, ["ip", "addr", "add", f"{second4}/24", "dev", "eth0"])
        lab.run(a.host, ["ip", "-6", "addr", "add", f"{second6}/64", "dev", "eth0", "nodad"])
        a.add_peer(b, endpoint=False)  # a learns b's endpoint from b's handshake
        b.add_peer(a, endpoint=False)
        v4 = second4 if _route_src(lab, a.host, b.host.ip) != second4 else a.host.ip
        assert _reached_at(a, b, v4) == f"{v4}:{PORT}"
        v6 = second6 if _route_src(lab, a.host, b.host.ip6) != second6 else a.host.ip6
        assert _reached_at(a, b, v6) == f"[{v6}]:{PORT}"
        # and back to the address routing picks: the source follows again
        assert _reached_at(a, b, a.host.ip) == f"{a.host.ip}:{PORT}"
        # The address b reached a at goes away, with no rebind (a roam, a lease lost):
        # a's next packets leave from an address it still has. Sending from the gone one
        # failed (ENETUNREACH for IPv4, EINVAL for IPv6) and, for IPv4, dropped every
        # packet to b until b's packets arrived elsewhere, which they could not.
        for second, b_ip, prefix in ((second4, b.host.ip, 24), (second6, b.host.ip6, 64)):
            assert _reached_at(a, b, second) == format_endpoint((second, PORT))
            lab.run(a.host, ["ip", "addr", "del", f"{second}/{prefix}", "dev", "eth0"])
            a.ping(b)
            src = _route_src(lab, a.host, b_ip)
            assert b.endpoint() == format_endpoint((src, PORT))


def test_tun_moved_to_another_namespace_keeps_working(lab: Lab, tmp_path: Path) -> None:
    """WireGuard's own selftests create the interface in one namespace and move it to
    another; its UDP socket stays where it was made. The userspace device too."""
    with two_sides(lab, tmp_path) as (a, b):
        a.add_peer(b, endpoint=True)
        b.add_peer(a, endpoint=False)
        a.ping(b)
        inner = lab.add_public_host("inner")
        lab.run(a.host, ["ip", "link", "set", a.ifname, "netns", inner.ns])
        lab.run(inner, ["ip", "addr", "add", f"{a.addr}/24", "dev", a.ifname])
        lab.run(inner, ["ip", "link", "set", a.ifname, "up"])
        assert a.ifname not in lab.run(a.host, ["ip", "-o", "link"]).stdout
        for _ in range(2):
            r = lab.run(inner, ["ping", "-c", "3", "-i", "0.2", "-W", "3", b.addr],
                        check=False, timeout=30)
            assert r.returncode == 0, r.stdout + r.stderr
            b.ping(a)  # to the TUN in `inner`, through the socket in a's namespace
        assert a.proc is not None and a.proc.poll() is None
        assert a.key.public.b64() in b.wg("show", b.ifname, "peers") + a.wg("show", a.ifname)
        # deleting the moved interface still stops the device, as wireguard-go stops
        lab.run(inner, ["ip", "link", "del", a.ifname])
        wait_for(lambda: a.proc is not None and a.proc.poll() is not None, 10,
                 "the device to stop once its interface is deleted")


TWO_NAMESPACES = r"""
import ctypes, json, os, subprocess, sys
from wgmesh.keys import PrivateKey
from wgmesh.wireguard.backend import BackendError, InterfaceConfig, PeerConfig
from wgmesh.wireguard.userspace import UserspaceBackend

ns_a, ns_b, ns_c, ip_a, name = sys.argv[1:6]
libc = ctypes.CDLL(None, use_errno=True)

def enter(ns):
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    assert libc.setns(fd, 0x40000000) == 0, ctypes.get_errno()
    os.close(fd)

ka, kb = PrivateKey.generate(), PrivateKey.generate()
out = {}
enter(ns_a)
A = UserspaceBackend(name)  # what a node makes: serves UAPI when it can
A.up(InterfaceConfig(name, ka, listen_port=51820, addresses=["10.81.0.1/24"]))
enter(ns_b)
B = UserspaceBackend(name)  # same default name, another namespace
B.up(InterfaceConfig(name, kb, listen_port=0, addresses=["10.81.0.2/24"]))
A.set_peers([PeerConfig(kb.public, allowed_ips=["10.81.0.2/32"])])
B.set_peers([PeerConfig(ka.public, allowed_ips=["10.81.0.1/32"], endpoint=(ip_a, 51820))])
out["ping"] = subprocess.run(["ping", "-c", "3", "-i", "0.2", "-W", "3", "10.81.0.1"],
                             capture_output=True).returncode == 0
enter(ns_a)
out["wg_sees_a"] = subprocess.run(["wg", "show", name, "public-key"], capture_output=True,
                                  text=True).stdout.strip() == ka.public.b64()
enter(ns_c)
try:
    UserspaceBackend(name, uapi=True).start()  # a daemon that exists to serve UAPI
    out["required"] = "started"
except BackendError as e:
    out["required"] = str(e)
enter(ns_a)  # where the holder of the socket lives, for the CLI daemon's message
d = subprocess.run(["ip", "netns", "exec", ns_c, sys.executable, "-m", "wgmesh", "userspace",
                    "--foreground", name], capture_output=True, text=True, timeout=60,
                   env={**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"})
out["daemon"] = [d.returncode, d.stderr]
A.down(); B.down()
print(json.dumps(out), flush=True)
"""


def test_two_devices_of_one_name_in_two_namespaces(lab: Lab) -> None:
    """Two agents with default names in two namespaces: UAPI sockets share one directory
    for all namespaces, so the second node's device runs without one (it needs none);
    a daemon that exists for UAPI fails with one line that says why."""
    a, b, c = (lab.add_public_host(n) for n in "abc")
    name = f"{lab.prefix}s"
    p = lab.spawn(a, [sys.executable, "-c", TWO_NAMESPACES, a.ns, b.ns, c.ns, a.ip, name])
    assert p.wait(120) == 0, p.stderr
    out = json.loads(p.stdout.splitlines()[-1])
    assert out["ping"] and out["wg_sees_a"]
    assert "give this interface another name" in out["required"]
    assert "Traceback" not in p.stderr and "serving no UAPI" in p.stderr
    # and the daemon that exists to serve UAPI says why in one line
    rc, err = out["daemon"]
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert "another network namespace" in err and "another name" in err
