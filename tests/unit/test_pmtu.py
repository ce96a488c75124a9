"""Path MTU by padded disco pings: two real Traversal objects over a simulated link that
drops datagrams above its MTU, the way a DF packet dies at a narrow link."""

from __future__ import annotations

import os
import time

import pytest

from wgmesh import disco, pmtu
from wgmesh.keys import PrivateKey
from wgmesh.traversal import (
    Action,
    PathState,
    SendDisco,
    SendViaRelay,
    Traversal,
    TraversalConfig,
)

pytestmark = pytest.mark.unit

A_ADDR, B_ADDR = ("198.51.100.1", 41641), ("198.51.100.2", 41641)
IP_UDP = 28  # an IPv4 and a UDP header around each datagram


class Link:
    """A and B over a direct link of ``mtu`` (IPv4 packet bytes) and a relay that carries
    anything. ``drop`` decides about single datagrams (loss, old peers)."""

    def __init__(self, mtu: int, *, ceiling: int = 1420) -> None:
        self.mtu = mtu
        self.drop = lambda data, to_b: False
        cfg = TraversalConfig(active_timeout=None, mtu_interval=100.0)
        ka, kb = PrivateKey.generate(), PrivateKey.generate()
        self.a = Traversal(PrivateKey.generate(), ka.public, cfg, wall=time.time,
                           random_bytes=os.urandom)
        self.b = Traversal(PrivateKey.generate(), kb.public, cfg, wall=time.time,
                           random_bytes=os.urandom)
        self.a.local.mtu = self.b.local.mtu = ceiling
        self.ka, self.kb = ka.public, kb.public
        self.now = 0.0
        self.carry(self.a.upsert_peer(kb.public, self.b.disco_public, [B_ADDR], 0.0), True)
        self.carry(self.b.upsert_peer(ka.public, self.a.disco_public, [A_ADDR], 0.0), False)

    def carry(self, actions: list[Action], to_b: bool) -> None:
        """Deliver what one side sent, and the answers, until nothing is left."""
        queue = [(a, to_b) for a in actions]
        while queue:
            act, fwd = queue.pop(0)
            dst, src, src_key = (self.b, A_ADDR, self.ka) if fwd else (self.a, B_ADDR, self.kb)
            if isinstance(act, SendDisco):
                if len(act.data) + IP_UDP > self.mtu or self.drop(act.data, fwd):
                    continue
                out = dst.on_udp(act.data, src, self.now)
            elif isinstance(act, SendViaRelay):
                if self.drop(act.data, fwd):
                    continue
                out = dst.on_relay(src_key, act.data, self.now)
            else:
                continue
            queue += [(a, not fwd) for a in out]

    def run(self, until: float) -> None:
        while self.now < until:
            self.now = round(self.now + 0.05, 3)
            self.carry(self.a.tick(self.now), True)
            self.carry(self.b.tick(self.now), False)


def _padded(data: bytes) -> bool:
    return len(data) > disco.PING_LEN


@pytest.mark.parametrize(("link", "want"), [(1500, 1420), (1400, 1340), (1460, 1400),
                                            (1350, 1280), (1300, None)])
def test_direct_path_mtu_is_the_largest_rung_the_link_carries(link: int, want: int | None
                                                               ) -> None:
    """A 1500 link carries the 1420 default; a 1400 link leaves 1340 (1400 - 20 IP - 8 UDP
    - 32 WireGuard); below a 1340 link even the 1280 floor dies: unknown, not lowered.
    The relay carries everything, measured apart."""
    lk = Link(link)
    lk.run(8.0)
    for side, peer in ((lk.a, lk.kb), (lk.b, lk.ka)):
        info = side.path(peer)
        assert info is not None and info.state is PathState.DIRECT
        assert (info.mtu_direct, info.mtu_relay, info.mtu) == (want, 1420, want)


def test_a_ceiling_below_the_ladder_top_caps_the_probes() -> None:
    lk = Link(1500, ceiling=1380)
    lk.run(8.0)
    info = lk.a.path(lk.kb)
    assert info is not None and (info.mtu_direct, info.mtu_relay) == (1380, 1380)
    assert pmtu.probe_mtus(1380)[-1] == 1380 and pmtu.probe_mtus(1000) == (1280,)


def test_one_lost_copy_does_not_lower_the_result() -> None:
    lk = Link(1500)
    lost: list[int] = []

    def drop(data: bytes, to_b: bool) -> bool:
        if to_b and len(data) == disco.PING_LEN + pmtu.padding_for(1420) and not lost:
            lost.append(len(data))
            return True
        return False

    lk.drop = drop
    lk.run(8.0)
    assert lost and lk.a.path(lk.kb).mtu_direct == 1420  # type: ignore[union-attr]


def test_an_old_peer_that_drops_padded_pings_leaves_the_path_unknown() -> None:
    """An old node drops a padded ping as malformed: its path still works (plain pings),
    and its MTU stays unknown rather than pretending to be small."""
    lk = Link(1500)
    lk.drop = lambda data, to_b: to_b and _padded(data)
    lk.run(8.0)
    info = lk.a.path(lk.kb)
    assert info is not None and info.state is PathState.DIRECT
    assert (info.mtu_direct, info.mtu_relay, info.mtu) == (None, None, None)


def test_a_narrower_link_is_found_at_the_next_round_and_silence_keeps_the_value() -> None:
    lk = Link(1500)
    lk.run(8.0)
    assert lk.a.path(lk.kb).mtu_direct == 1420  # type: ignore[union-attr]
    lk.mtu = 1400
    lk.run(110.0)  # mtu_interval is 100 s
    assert lk.a.path(lk.kb).mtu_direct == 1340  # type: ignore[union-attr]
    lk.drop = lambda data, to_b: to_b and _padded(data)  # a round without any answer
    lk.run(215.0)
    assert lk.a.path(lk.kb).mtu_direct == 1340  # type: ignore[union-attr]


def test_a_pong_must_confirm_the_size_the_probe_had() -> None:
    m = pmtu.PathMtu(interval=60.0)
    probes = m.start(0.0, 1420, lambda: os.urandom(12))
    by_mtu = {disco.PING_LEN + pad: txid for txid, pad in probes}
    big = by_mtu[1420 + pmtu.WG_OVERHEAD]
    assert m.on_pong(big, 1300) and m.on_pong(b"x" * 12, 1452) is False
    assert m.on_pong(by_mtu[1280 + pmtu.WG_OVERHEAD], 1280 + pmtu.WG_OVERHEAD)
    m.tick(2.0)
    assert m.mtu == 1280 and m.rounds == 1 and m.next_wakeup() == 60.0
