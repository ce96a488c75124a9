"""sharedsock on the host (netns tier): a plain UDP socket bound to the port stands in
for kernel WireGuard's. Proves the hand-built UDP headers pass the kernel's own checksum
checks (v4 and v6), replies are copied to sharedsock *and* still reach the port's owner,
and the BPF filter keeps everything but STUN and disco away from Python."""

from __future__ import annotations

import re
import socket

import pytest
from polling import wait_for
from stuntools import stun_query, stun_server

from wgmesh.disco import MAGIC as DISCO_MAGIC
from wgmesh.lab.network import Lab
from wgmesh.wireguard.netns import socket_in
from wgmesh.wireguard.sharedsock import SharedSocket

pytestmark = pytest.mark.netns

PORT = 51820


def test_sharedsock_stun_copy_and_filter(lab: Lab) -> None:
    a, b = lab.add_public_host("a"), lab.add_public_host("b")
    owner = socket_in(a.ns, socket.AF_INET, socket.SOCK_DGRAM)  # "WireGuard"
    owner.bind(("0.0.0.0", PORT))
    owner.settimeout(10)
    with stun_server(b.ns) as served, SharedSocket(PORT, netns=a.ns) as ss:
        for dst, me in (((b.ip, 3478), (a.ip, PORT)), ((b.ip6, 3478), (a.ip6, PORT))):
            assert stun_query(lambda d, dst=dst: ss.send(d, dst), ss.recv) == me
        assert served["stun_replies"] == 2  # the kernel's UDP stack accepted our checksums
        data, _ = owner.recvfrom(2048)  # the owner of the port got the v4 reply as well
        assert data[4:8] == bytes.fromhex("2112a442")

        peer = socket_in(b.ns, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            peer.sendto(b"\x04\x00\x00\x00not stun, not disco", (a.ip, PORT))
            disco = DISCO_MAGIC + bytes(80)
            peer.sendto(disco, (a.ip, PORT))
            assert owner.recvfrom(2048)[0].startswith(b"\x04")
            assert owner.recvfrom(2048)[0] == disco
            got = wait_for(lambda: ss.recv(1.0), 10, "disco datagram")
            assert got == (disco, (b.ip, peer.getsockname()[1]))  # the junk never surfaced
        finally:
            peer.close()
    owner.close()
    assert ss.sent == 2 and ss.received == 3 and ss.dropped == 0


def test_sharedsock_follows_a_new_source_address(lab: Lab) -> None:
    """The host's address changes under a running shared socket (a roam): STUN must
    leave from the new address and report it. The socket that asks routing for the
    source kept the first one it chose, so every send after a roam failed."""
    a, b = lab.add_public_host("a"), lab.add_public_host("b")
    with stun_server(b.ns), SharedSocket(PORT, netns=a.ns) as ss:
        assert stun_query(lambda d: ss.send(d, (b.ip, 3478)), ss.recv) == (a.ip, PORT)
        cidr = lab.run(a, ["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout.split()[3]
        new = re.sub(r"\.\d+$", ".201", a.ip)
        lab.run(a, ["sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1"])
        lab.run(a, ["ip", "addr", "add", f"{new}/{cidr.split('/')[1]}", "dev", "eth0"])
        lab.run(a, ["ip", "addr", "del", cidr, "dev", "eth0"])
        assert stun_query(lambda d: ss.send(d, (b.ip, 3478)), ss.recv) == (new, PORT)

