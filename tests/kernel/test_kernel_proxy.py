"""Kernel tier: two kernel WireGuard peers whose only path is the relay bridge.

UDP between the hosts is dropped by iptables, so the tunnel can only run over
the loopback bridge endpoints and the TCP pipe between the bridges. Ping works,
then the peers switch to direct (one endpoint change each) and back, with no
new handshake and no restart, and 10 MB cross the bridged tunnel intact.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bridgetools import BridgePair
from flows import transfer

from wgmesh.keys import PrivateKey
from wgmesh.lab.network import Host, Lab
from wgmesh.wireguard.backend import InterfaceConfig, PeerConfig

pytestmark = [pytest.mark.kernel, pytest.mark.netns]


def _udp_blocked(lab: Lab, a: Host, b: Host, on: bool) -> None:
    op = "-I" if on else "-D"
    lab.run(a, ["iptables", "-w", op, "OUTPUT", "-p", "udp", "-d", b.ip, "-j", "DROP"])
    lab.run(a, ["iptables", "-w", op, "INPUT", "-p", "udp", "-s", b.ip, "-j", "DROP"])


def test_relay_bridge_ping_switch_and_10mb(lab: Lab, tmp_path: Path) -> None:
    from wgmesh.wireguard.kernel import KernelBackend

    a, b = lab.add_public_host("a"), lab.add_public_host("b")
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    wa, wb = KernelBackend("wg0", netns=a.ns), KernelBackend("wg0", netns=b.ns)
    try:
        wa.up(InterfaceConfig("wg0", ka, listen_port=51820, addresses=["100.64.0.1/24"]))
        wb.up(InterfaceConfig("wg0", kb, listen_port=51821, addresses=["100.64.0.2/24"]))
        _udp_blocked(lab, a, b, True)
        with BridgePair(a.ns, 51820, ka.public, b.ns, 51821, kb.public, b.ip) as pair:
            ep_b, ep_a = pair.a.add(kb.public), pair.b.add(ka.public)
            wa.set_peers([PeerConfig(kb.public, ["100.64.0.2/32"], ep_b)])
            wb.set_peers([PeerConfig(ka.public, ["100.64.0.1/32"], ep_a)])
            lab.run(a, ["ping", "-c", "2", "-W", "10", "100.64.0.2"])
            h0, hb0 = wa.stats()[kb.public].last_handshake, wb.stats()[ka.public].last_handshake
            assert h0 is not None and hb0 is not None and wb.stats()[ka.public].endpoint == ep_a
            relayed = pair.a.counters(kb.public).to_relay
            assert relayed >= 3 and pair.a.counters(kb.public).from_relay >= 3

            # direct: one endpoint change per side, same session
            _udp_blocked(lab, a, b, False)
            pair.a.use_direct(wa, kb.public, (b.ip, 51821))
            pair.b.use_direct(wb, ka.public, (a.ip, 51820))
            lab.run(a, ["ping", "-c", "3", "-i", "0.2", "-W", "5", "100.64.0.2"])
            assert wa.stats()[kb.public].endpoint == (b.ip, 51821)
            assert wb.stats()[ka.public].endpoint == (a.ip, 51820)
            assert pair.a.counters(kb.public).to_relay == relayed  # nothing went via relay
            assert wa.stats()[kb.public].last_handshake == h0

            # and back to the relay
            _udp_blocked(lab, a, b, True)
            assert pair.a.use_relay(wa, kb.public) == ep_b
            assert pair.b.use_relay(wb, ka.public) == ep_a
            lab.run(a, ["ping", "-c", "3", "-i", "0.2", "-W", "5", "100.64.0.2"])
            assert pair.a.counters(kb.public).to_relay >= relayed + 3
            assert wa.stats()[kb.public].endpoint == ep_b
            assert wa.stats()[kb.public].last_handshake == h0
            assert wb.stats()[ka.public].last_handshake == hb0

            # 10 MB through the bridged tunnel, checked end to end
            payload = tmp_path / "ten.bin"
            payload.write_bytes(os.urandom(10 * 1024 * 1024))
            transfer(lab, a, b, "100.64.0.2", payload)
            assert pair.a.counters(kb.public).to_relay > 7000  # it really went via the bridge
    finally:
        wa.down()
        wb.down()
