"""A node's wall clock jumps forward and back (issue 14, Faults): the userspace WireGuard
device keeps rekeying and never accepts a replayed handshake.

WireGuard puts the initiator's wall clock (TAI64N) in every initiation and the
responder refuses one whose stamp is not newer than the last it accepted. Timers run
on the monotonic clock, which a wall-clock jump does not move. What is correct here:

- a jump of the wall clock alone fires no timer (no rekey, no key expiry);
- across a forward jump, rekeying goes on (stamps only grow);
- across a backward jump, a *running* device goes on rekeying: it never stamps an
  initiation at or below one it already sent (it counts up from the last), so the peer
  accepts it. The kernel module would stall here until the clock caught up;
- a device *restarted* with its clock still behind cannot initiate (the peer refuses
  its stamps, as the protocol requires: they look like replays) until its clock passes
  the last accepted stamp; the peer's own initiation (its clock is fine) brings the
  session back instead, within the kernel's "no answer" timeout;
- no captured initiation is ever accepted again, from before or after either jump.

A real clock jump in the lab would move the host's clock under every test on the
machine (time namespaces offset only the monotonic clocks), so the device is driven
here with injected clocks: ``now`` monotonic and ``wall`` per device.
"""

from __future__ import annotations

import random

import pytest
from test_wg_device import ADDR_A, ADDR_B, Pair, T, ip_packet, sent_types

from wgmesh.wireguard.crypto import dh_public
from wgmesh.wireguard.device import Device
from wgmesh.wireguard.noise import MSG_INITIATION
from wgmesh.wireguard.timers import INITIATIONS_PER_SECOND

pytestmark = pytest.mark.unit

DAY = 86400.0


class Skewed:
    """A's wall clock: the pair's clock plus a jump the test sets."""

    def __init__(self, p: Pair) -> None:
        self.p, self.offset = p, 0.0

    def __call__(self) -> float:
        return self.p.clock.wall() + self.offset


def _initiations(p: Pair, side: str) -> list[bytes]:
    return [d for s, d in p.wire if s == side and d[0] == MSG_INITIATION]


def _rekey(p: Pair) -> None:
    """Let a's key age past REKEY_AFTER_TIME, then send: a rekeys and the data goes."""
    done, delivered = p.pa.handshakes_completed, len(p.tun_b)
    p.advance(T.rekey_after_time + 1, step=1)
    p.a_to_b()
    p.b_to_a()
    assert p.pa.handshakes_completed == done + 1
    assert p.pb.current is not None and p.pb.current.birth == p.now
    assert len(p.tun_b) == delivered + 1


def test_wall_clock_jumps_fire_no_timer_and_rekeying_goes_on() -> None:
    p = Pair()
    wall = Skewed(p)
    p.a.wall = wall
    p.a_to_b()
    sent = len(p.wire)
    key = p.pa.current
    for jump in (+DAY, -2 * DAY, +DAY):  # no monotonic time passes
        wall.offset += jump
        p.advance(1, step=0.5)
        assert len(p.wire) == sent and p.pa.current is key  # nothing fired
    wall.offset = DAY
    _rekey(p)  # forward: the stamp is a day ahead, and newer
    wall.offset = -DAY
    _rekey(p)  # back two days: a running device still stamps above its last
    _rekey(p)
    assert p.pb.handshakes_completed == 4 and not p.b.drops


def test_no_initiation_is_accepted_twice_across_clock_jumps() -> None:
    p = Pair()
    wall = Skewed(p)
    p.a.wall = wall
    p.a_to_b()
    for offset in (DAY, -DAY):
        wall.offset = offset
        _rekey(p)
    captured = _initiations(p, "a")
    assert len(captured) == 3
    key, answers = p.pb.current, len([s for s, _ in p.wire if s == "b"])
    for msg in captured:
        p.clock.now += 2 / INITIATIONS_PER_SECOND  # never the flood limit: the stamp decides
        p.b.receive(msg, ADDR_A, p.now)
    assert p.b.drops["replayed_initiation"] == 3
    udp, _ = p.b.drain()
    assert udp == [] and p.pb.current is key
    assert len([s for s, _ in p.wire if s == "b"]) == answers
    p.a_to_b()
    assert p.tun_b[-1] == ip_packet("10.0.0.1", "10.0.0.2")


def test_a_node_restarted_with_its_clock_behind_is_refused_until_the_peer_initiates() -> None:
    """After a forward jump that b accepted, a restarts with the clock set right (a day
    behind its last stamp): its initiations look like replays to b and are refused; b's
    data then gets no answer, so b initiates itself and the session is back."""
    p = Pair()
    wall = Skewed(p)
    p.a.wall = wall
    wall.offset = DAY
    p.a_to_b()
    wall.offset = 0.0
    restarted = Device(p.a_priv, timing=T, wall=wall, rng=random.Random(3))
    peer = restarted.add_peer(dh_public(p.b_priv))
    restarted.allowed.insert("10.0.0.2/32", peer)
    restarted.set_endpoint(peer, ADDR_B)
    p.a, p.pa = restarted, peer
    delivered = len(p.tun_b)
    n_b_inits = len(_initiations(p, "b"))
    p.a_to_b(b"after restart")
    assert p.b.drops["replayed_initiation"] == 1 and len(p.tun_b) == delivered
    p.b_to_a(b"to the old a")  # on the old session: the new a cannot read it
    p.advance(T.new_handshake_after + T.rekey_timeout + 1, step=0.5)
    assert len(_initiations(p, "b")) > n_b_inits
    assert peer.current is not None and not peer.current.initiator  # a answered b
    p.a_to_b(b"again")
    p.b_to_a(b"back")
    assert p.tun_b[-1] == ip_packet("10.0.0.1", "10.0.0.2", b"again")
    assert p.tun_a[-1] == ip_packet("10.0.0.2", "10.0.0.1", b"back")
    assert sent_types(p, "a").count(MSG_INITIATION) >= 1
