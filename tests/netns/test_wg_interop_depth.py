"""Interop depth (issue 14): wireguard-go initiating rekeys against the userspace device.
Configured with the stock `wg` tool, as in test_wg_interop.py (where the userspace side
roaming is ``test_roaming_peer_endpoint[wgmesh]``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from polling import wait_for
from wgsides import PORT, Side, transfer, two_sides

from wgmesh.lab.network import Lab

pytestmark = pytest.mark.netns

#: An initiation is 148 bytes of UDP payload: 176 bytes of IPv4 packet.
INITIATION_LEN = 148 + 28


def _count_initiations_sent(side: Side) -> None:
    side.lab.run(side.host, ["iptables", "-I", "OUTPUT", "-p", "udp", "--sport", str(PORT),
                             "-m", "length", "--length", str(INITIATION_LEN), "-j", "ACCEPT"])


def _initiations_sent(side: Side) -> int:
    out = side.lab.run(side.host, ["iptables", "-L", "OUTPUT", "-vnx"]).stdout
    rows = [ln.split() for ln in out.splitlines() if f"length {INITIATION_LEN}" in ln]
    assert len(rows) == 1, out
    return int(rows[0][0])


@pytest.mark.slow
def test_wireguard_go_initiates_two_rekeys_against_the_userspace_device(
        lab: Lab, tmp_path: Path, payload: tuple[Path, str]) -> None:
    """wireguard-go rekeys a session it initiated after REKEY_AFTER_TIME (120 s, not
    scalable): two rekeys take about four minutes of real time. The userspace device
    only answers: it sends no initiation at all."""
    with two_sides(lab, tmp_path) as (a, b):
        a.add_peer(b, endpoint=False)  # only wireguard-go knows where the other is
        b.add_peer(a, endpoint=True)
        _count_initiations_sent(a)
        _count_initiations_sent(b)
        b.ping(a)
        seen = {a.handshake_time()}
        pinger = lab.spawn(b.host, ["ping", "-i", "0.5", "-W", "2", a.addr])
        wait_for(lambda: seen.add(a.handshake_time()) or len(seen - {0}) >= 3, 330,
                 "two rekeys by wireguard-go", interval=1)
        pinger.stop()
        assert _initiations_sent(a) == 0
        assert _initiations_sent(b) >= 3
        a.ping(b)
        b.ping(a)
        transfer(a, b, payload)
        transfer(b, a, payload)

