"""First kernel-tier proof: two namespaces, in-kernel WireGuard configured over netlink
(pyroute2), ping and a 10 MB TCP transfer, handshake visible in the peer stats."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from flows import transfer

from wgmesh.keys import PrivateKey
from wgmesh.lab.network import Lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]


def _wg_netlink(ns: str, ifname: str, key: PrivateKey, port: int, peer: PrivateKey,
                peer_ep: str, peer_port: int, tunnel_ip: str, peer_ip: str) -> None:
    from pyroute2 import NetNS, WireGuard

    with NetNS(ns) as ipr:
        ipr.link("add", ifname=ifname, kind="wireguard")
        idx = ipr.link_lookup(ifname=ifname)[0]
        ipr.addr("add", index=idx, address=tunnel_ip, prefixlen=24)
        ipr.link("set", index=idx, state="up", mtu=1420)
    with WireGuard(netns=ns) as wg:
        wg.set(ifname, private_key=key.b64(), listen_port=port)
        wg.set(ifname, peer={"public_key": peer.public.b64(), "endpoint_addr": peer_ep,
                             "endpoint_port": peer_port,
                             "allowed_ips": [f"{peer_ip}/32"], "persistent_keepalive": 0})


def _handshake_time(ns: str, ifname: str) -> int:
    from pyroute2 import WireGuard

    with WireGuard(netns=ns) as wg:
        info = wg.info(ifname)[0]
        peers = info.get_attr("WGDEVICE_A_PEERS")
        return peers[0].get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")["tv_sec"]


def test_kernel_wireguard_ping_and_10mb(lab: Lab, tmp_path: Path) -> None:
    a = lab.add_public_host("a")
    b = lab.add_public_host("b")
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    _wg_netlink(a.ns, "wg0", ka, 51820, kb, b.ip, 51821, "100.64.0.1", "100.64.0.2")
    _wg_netlink(b.ns, "wg0", kb, 51821, ka, a.ip, 51820, "100.64.0.2", "100.64.0.1")
    assert _handshake_time(a.ns, "wg0") == 0
    lab.run(a, ["ping", "-c", "2", "-W", "5", "100.64.0.2"])
    assert _handshake_time(a.ns, "wg0") > 0
    assert _handshake_time(b.ns, "wg0") > 0

    payload = tmp_path / "ten.bin"
    payload.write_bytes(os.urandom(10 * 1024 * 1024))
    transfer(lab, a, b, "100.64.0.2", payload)
