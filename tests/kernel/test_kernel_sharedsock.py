"""Kernel tier: sharedsock next to the real WireGuard module, through a real NAT.

pc sits behind an endpoint-independent NAT and runs kernel WireGuard to srv.
A STUN request sent through sharedsock from pc's WireGuard port must come back
with the very ip:port srv's WireGuard sees for pc's handshake packets, i.e. the
mapping WireGuard uses; the tunnel must keep working while STUN traffic flows
over the same port; and IPv6 works from a public host's WireGuard port.
"""

from __future__ import annotations

import threading

import pytest
from polling import wait_for
from stuntools import stun_query, stun_server

from wgmesh.keys import PrivateKey
from wgmesh.lab.network import Lab
from wgmesh.wireguard.backend import InterfaceConfig, PeerConfig

pytestmark = [pytest.mark.kernel, pytest.mark.netns]


def test_stun_from_the_wireguard_port_sees_wireguards_mapping(lab: Lab) -> None:
    from wgmesh.wireguard.kernel import KernelBackend
    from wgmesh.wireguard.sharedsock import SharedSocket

    srv, other = lab.add_public_host("srv"), lab.add_public_host("other")
    nat = lab.add_nat("home", "eim")
    pc = lab.add_host("pc", nat=nat)
    kp, ks = PrivateKey.generate(), PrivateKey.generate()
    wp, ws = KernelBackend("wg0", netns=pc.ns), KernelBackend("wg0", netns=srv.ns)
    try:
        wp.up(InterfaceConfig("wg0", kp, listen_port=0, addresses=["100.64.0.1/24"]))
        ws.up(InterfaceConfig("wg0", ks, listen_port=51820, addresses=["100.64.0.2/24"]))
        wp.set_peers([PeerConfig(ks.public, ["100.64.0.2/32"], (srv.ip, 51820), 0)])
        ws.set_peers([PeerConfig(kp.public, ["100.64.0.1/32"])])  # learns pc's endpoint
        lab.run(pc, ["ping", "-c", "1", "-W", "10", "100.64.0.2"])
        wg_seen = ws.stats()[kp.public].endpoint
        assert wg_seen is not None and wg_seen[0] == nat.ip

        with stun_server(srv.ns), SharedSocket.for_backend(wp) as ss:
            mapped = stun_query(lambda d: ss.send(d, (srv.ip, 3478)), ss.recv)
            assert mapped == wg_seen

            # STUN keeps flowing on the WireGuard port while the tunnel carries pings.
            done, answers, errors = threading.Event(), [], []

            def probe() -> None:
                try:
                    while not done.is_set():
                        answers.append(stun_query(lambda d: ss.send(d, (srv.ip, 3478)),
                                                  ss.recv))
                except AssertionError as e:
                    errors.append(e)
            t = threading.Thread(target=probe)
            rx_before = ws.stats()[kp.public].rx_bytes
            t.start()
            try:
                wait_for(lambda: len(answers) >= 5, 60, "STUN answers while tunnelling")
                out = lab.run(pc, ["ping", "-c", "20", "-i", "0.05", "-W", "5",
                                   "100.64.0.2"]).stdout
            finally:
                done.set()
                t.join(30)
            assert " 0% packet loss" in out and not errors
            assert set(answers) == {wg_seen} and len(answers) >= 5
            assert ws.stats()[kp.public].rx_bytes > rx_before
            # only STUN replies reached Python: no WireGuard packet slipped through the filter
            assert ss.received == len(answers) + 1 and ss.dropped == 0

        # IPv6, from the public server's WireGuard port (the NAT lab is IPv4-only)
        with stun_server(other.ns), SharedSocket(51820, netns=srv.ns) as ss6:
            assert stun_query(lambda d: ss6.send(d, (other.ip6, 3478)), ss6.recv) == \
                (srv.ip6, 51820)
        lab.run(pc, ["ping", "-c", "1", "-W", "5", "100.64.0.2"])
    finally:
        wp.down()
        ws.down()
