"""PeerPath and Traversal one decision at a time, on a fake clock."""

from __future__ import annotations

import ipaddress
import os
import time

import pytest
from budget import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from wgmesh import disco
from wgmesh.keys import PrivateKey
from wgmesh.netmap import Endpoint
from wgmesh.traversal import (
    RELAY,
    Candidates,
    DiscoOut,
    LocalInfo,
    ObservedAddr,
    PathChanged,
    PathState,
    PeerPath,
    RelayIngress,
    RelayOut,
    SendDisco,
    SendViaRelay,
    SetEndpoint,
    Traversal,
    TraversalConfig,
    is_lan,
)

pytestmark = pytest.mark.unit

PEER = PrivateKey.generate().public
ME = PrivateKey.generate().public
PUB4 = ("198.51.100.7", 41641)
LAN4 = ("10.1.0.10", 41641)
PUB6 = ("2001:db8:203::7", 41641)


def new_txid() -> bytes:
    return os.urandom(disco.TXID_LEN)


def make(cfg: TraversalConfig | None = None, endpoints=(PUB4,)) -> PeerPath:
    p = PeerPath(PEER, LocalInfo(ME, (("203.0.113.5", 41641),)),
                 cfg or TraversalConfig(active_timeout=None), 0.0, new_txid=new_txid)
    p.set_endpoints(endpoints, 0.0)
    return p


def pings(out: list) -> dict[tuple[int, tuple[str, int]], bytes]:
    """Path pings (not the padded path MTU probes) by socket and address."""
    return {(o.sock, o.addr): o.msg.txid for o in out
            if isinstance(o, DiscoOut) and isinstance(o.msg, disco.Ping) and not o.msg.padding}


def answer(p: PeerPath, out: list, addr: tuple[str, int], at: float, sock: int = 0) -> list:
    txid = pings(out)[(sock, addr)]
    return p.on_pong(addr, sock, disco.Pong(txid, ("203.0.113.5", 41641)), at)


def test_first_round_pings_every_candidate_and_sends_call_me_maybe() -> None:
    p = PeerPath(PEER, LocalInfo(ME, (("203.0.113.5", 41641),)), TraversalConfig(), 0.0,
                 new_txid=new_txid)
    out = p.set_endpoints([PUB4, LAN4, PUB6], 0.0)
    assert set(pings(out)) == {(0, PUB4), (0, LAN4), (0, PUB6)}
    cmm = [o.msg for o in out if isinstance(o, RelayOut)]
    assert cmm == [disco.CallMeMaybe((("203.0.113.5", 41641),), disco.FLAG_MANY_PORTS)]
    assert p.state is PathState.RELAY


def test_unanswered_pings_repeat_every_probe_interval_then_stop() -> None:
    p = make()
    sent = [t for t in [x / 10 for x in range(0, 100)] if pings(p.tick(t))]
    assert sent == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]
    assert p.next_wakeup() == 60.0  # idle until the re-probe


def test_first_pong_commits_and_reports_the_observed_address() -> None:
    p = make()
    out = p.tick(0.0) or p.tick(0.5)
    res = answer(p, out, PUB4, 0.52)
    assert ObservedAddr(("203.0.113.5", 41641), 0) in res
    assert SetEndpoint(PEER, PUB4, 0, False) in res
    assert RelayIngress(PEER, False) in res
    assert any(isinstance(a, PathChanged) and a.path == "direct" for a in res)
    assert p.state is PathState.DIRECT and p.info().endpoint == PUB4


def test_stray_and_misdirected_pongs_are_dropped() -> None:
    p = make()
    out = p.tick(0.5)
    assert p.on_pong(PUB4, 0, disco.Pong(b"z" * 12, PUB4), 0.6) == []
    txid = pings(out)[(0, PUB4)]
    assert p.on_pong(("198.51.100.99", 1), 0, disco.Pong(txid, PUB4), 0.6) == []
    assert p.counters["drop_stray_pong"] == 1 and p.counters["drop_pong_wrong_source"] == 1
    assert p.state is PathState.RELAY


def test_lan_beats_a_faster_public_path_and_ipv6_gets_a_bonus() -> None:
    p = make(endpoints=(PUB4, LAN4))
    out = p.tick(0.5)
    answer(p, out, PUB4, 0.51)   # 10 ms public
    res = answer(p, out, LAN4, 0.515)  # 15 ms LAN: x0.5 = 7.5 < 10 * 0.8
    assert SetEndpoint(PEER, LAN4, 0, False) in res
    q = make(endpoints=(PUB4, PUB6))
    out = q.tick(0.5)
    answer(q, out, PUB4, 0.51)
    assert answer(q, out, PUB6, 0.5105) == [ObservedAddr(("203.0.113.5", 41641), 0)]
    assert q.info().endpoint == PUB4  # 10.5 ms x 0.9 is better, but not by the hysteresis


def test_an_advertised_path_beats_a_learnt_one_of_similar_latency() -> None:
    router = ("10.1.0.1", 30000)  # b's pings hairpinned through the router arrive from here
    p = make(endpoints=(LAN4,))
    out = p.on_ping(router, 0, b"h" * 12, 0.1)
    assert SetEndpoint(PEER, router, 0, False) in answer(p, out, router, 0.1011)
    out = p.tick(0.5)
    assert SetEndpoint(PEER, LAN4, 0, False) in answer(p, out, LAN4, 0.5012)


def test_a_noisy_sample_below_the_rtt_floor_does_not_beat_the_lan() -> None:
    """On a loaded host one LAN pong took 9 ms and the hairpin's 0.2 ms: both are under
    the floor (scheduling noise), so the advertised LAN path still wins."""
    router = ("10.1.0.1", 30000)
    p = make(endpoints=(LAN4,))
    out = p.on_ping(router, 0, b"h" * 12, 0.1)
    assert SetEndpoint(PEER, router, 0, False) in answer(p, out, router, 0.1002)
    out = p.tick(0.5)
    assert SetEndpoint(PEER, LAN4, 0, False) in answer(p, out, LAN4, 0.509)


def test_hysteresis_switches_only_for_a_clearly_better_path() -> None:
    other = ("198.51.100.8", 41641)
    p = make(endpoints=(PUB4, other))
    out = p.tick(0.5)
    answer(p, out, PUB4, 0.55)      # 50 ms
    answer(p, out, other, 0.545)    # 45 ms: only 10% better
    assert p.info().endpoint == PUB4
    out = p.tick(3.5)  # heartbeat to the best, nothing to the other (it ponged this round)
    assert set(pings(out)) == {(0, PUB4)}
    r = p.kick(4.0)
    res = answer(p, r, other, 4.01)  # 10 ms now: median(45, 10) = 27.5 < 40
    assert SetEndpoint(PEER, other, 0, False) in res


def test_heartbeats_keep_the_path_and_silence_returns_to_relay() -> None:
    p = make()
    out = p.tick(0.5)
    answer(p, out, PUB4, 0.51)
    t = 0.51
    for _ in range(5):  # a healthy minute of heartbeats
        t += 3.0
        hb = p.tick(t)
        assert set(pings(hb)) == {(0, PUB4)}
        answer(p, hb, PUB4, t + 0.01)
    last_pong = t + 0.01
    actions: list = []
    while p.state is PathState.DIRECT:
        t = p.next_wakeup()
        actions += p.tick(t)
    assert 6.0 <= t - last_pong <= 7.0
    assert SetEndpoint(PEER, RELAY) in actions and RelayIngress(PEER, True) in actions
    assert any(type(a).__name__ == "RefreshCandidates" for a in actions)
    assert pings(actions)  # and a new round started right away


def test_idle_peer_gets_no_heartbeats_and_is_not_dropped_for_it() -> None:
    p = make(TraversalConfig(active_timeout=45.0))
    answer(p, p.tick(0.5), PUB4, 0.51)
    beats = 0
    t = 0.51
    while t < 59:
        t = p.next_wakeup()
        if t >= 59:
            break
        out = p.tick(t)
        if pings(out):
            beats += 1
            answer(p, out, PUB4, t + 0.01)
    assert 13 <= beats <= 16  # ~45 s / 3 s, then quiet
    assert p.state is PathState.DIRECT
    p.on_traffic(70.0)
    assert pings(p.tick(70.0))  # activity resumes the heartbeats


def test_reprobe_every_minute_forever() -> None:
    p = make()
    rounds = 0
    t = 0.0
    while t < 3600:
        t = p.next_wakeup()
        out = p.tick(t)
        rounds += any(isinstance(o, RelayOut) and isinstance(o.msg, disco.CallMeMaybe)
                      for o in out)
    assert 59 <= rounds <= 61


def test_ping_from_an_unknown_address_is_answered_and_pinged_back() -> None:
    p = make(endpoints=())
    src = ("198.51.100.9", 5555)
    out = p.on_ping(src, 0, b"t" * 12, 1.0)
    assert DiscoOut(src, 0, disco.Pong(b"t" * 12, src)) in out
    assert (0, src) in pings(out)
    again = p.on_ping(src, 0, b"u" * 12, 1.01)  # not a second ping right away
    assert len(again) == 1


def test_call_me_maybe_starts_a_round_but_is_rate_limited() -> None:
    p = make(endpoints=())
    new = ("198.51.100.10", 4000)
    out = p.on_call_me_maybe(disco.CallMeMaybe((new,)), 1.0)
    assert (0, new) in pings(out) and any(isinstance(o, RelayOut) for o in out)
    assert p.on_call_me_maybe(disco.CallMeMaybe((new,)), 1.5) == []
    assert p.counters["cmm_rate_limited"] == 1


def test_call_me_maybe_is_answered_once_and_answers_are_not() -> None:
    p = make(endpoints=())
    out = p.on_call_me_maybe(disco.CallMeMaybe((PUB4,)), 1.0)
    replies = [o.msg for o in out if isinstance(o, RelayOut)]
    assert len(replies) == 1 and replies[0].flags & disco.FLAG_REPLY
    q = make(endpoints=())
    out = q.on_call_me_maybe(disco.CallMeMaybe((PUB4,), disco.FLAG_REPLY), 1.0)
    assert not [o for o in out if isinstance(o, RelayOut)] and (0, PUB4) in pings(out)


def test_candidate_count_is_bounded() -> None:
    p = make(TraversalConfig(max_candidates=8), endpoints=())
    for i in range(20):
        p.on_ping((f"198.51.100.{i + 1}", 1000), 0, bytes(12), float(i))
    assert len(p.candidates()) == 8 and p.counters["drop_too_many_candidates"] == 12


def test_kernel_commit_waits_for_a_handshake_on_the_path() -> None:
    p = make(TraversalConfig.kernel(active_timeout=None))
    p.on_wg_stats(0.2, RELAY, 100.0)
    res = answer(p, p.tick(0.5), PUB4, 0.51)
    assert SetEndpoint(PEER, PUB4, 0, True) in res and p.state is PathState.PENDING
    assert not any(isinstance(a, RelayIngress) for a in res)
    assert p.on_wg_stats(1.0, PUB4, 100.0) == []  # the old handshake does not count
    res = p.on_wg_stats(1.5, PUB4, 101.0)
    assert RelayIngress(PEER, False) in res and p.state is PathState.DIRECT


def test_kernel_moves_between_direct_paths_without_forcing_a_handshake() -> None:
    # A forced handshake re-adds the kernel peer: its session and counters start over.
    other = ("198.51.100.8", 41641)
    p = make(TraversalConfig.kernel(active_timeout=None), endpoints=(PUB4, other))
    p.on_wg_stats(0.2, RELAY, 100.0)
    out = p.tick(0.5)
    assert SetEndpoint(PEER, PUB4, 0, True) in answer(p, out, PUB4, 0.55)  # off the relay
    answer(p, out, other, 0.545)  # 45 ms against 50: not better enough
    p.on_wg_stats(1.0, PUB4, 101.0)
    assert p.state is PathState.DIRECT
    res = answer(p, p.kick(4.0), other, 4.01)  # 10 ms now: median(45, 10) = 27.5 < 40
    assert SetEndpoint(PEER, other, 0, False) in res and p.state is PathState.DIRECT
    assert any(isinstance(a, PathChanged) and a.reason == "better" for a in res)


def test_kernel_does_not_blame_the_path_for_its_own_slow_stats_read() -> None:
    """Committed at 0.51, the handshake is due by 5.51. A stats read that started at 1.0
    and, the node being busy (a 500-peer kernel dump takes seconds under emulation), ended
    at 6.0 shows none: it was taken before the deadline, so it is no evidence, and the next
    reading's handshake confirms the path. Without ``sampled`` the same reading rolls the
    peer back to the relay."""
    p = make(TraversalConfig.kernel(active_timeout=None))
    answer(p, p.tick(0.5), PUB4, 0.51)
    assert p.on_wg_stats(6.0, PUB4, None, sampled=1.0) == []
    assert SetEndpoint(PEER, RELAY) not in p.tick(6.0) and p.state is PathState.PENDING
    assert p.next_wakeup() > 6.0  # waiting for a reading, not spinning on the deadline
    res = p.on_wg_stats(6.5, PUB4, 101.0, sampled=6.0)
    assert p.state is PathState.DIRECT
    assert any(isinstance(a, PathChanged) and a.reason == "handshake" for a in res)

    q = make(TraversalConfig.kernel(active_timeout=None))
    answer(q, q.tick(0.5), PUB4, 0.51)
    q.on_wg_stats(6.0, PUB4, None)
    assert SetEndpoint(PEER, RELAY) in q.tick(6.0) and q.counters["no_handshake"] == 1


def test_kernel_gives_up_on_a_pending_path_when_stats_stop_coming() -> None:
    p = make(TraversalConfig.kernel(active_timeout=None, stats_grace=10.0))
    out = p.tick(0.5)
    t = 0.51
    answer(p, out, PUB4, t)
    while p.state is PathState.PENDING:  # pings answered, no stats reading at all
        t = p.next_wakeup()
        out = p.tick(t)
        if (0, PUB4) in pings(out):
            answer(p, out, PUB4, t + 0.01)
    assert t == pytest.approx(5.51 + 10.0) and p.counters["no_handshake"] == 1


def test_kernel_trusts_wireguard_traffic_that_stays_on_the_path() -> None:
    p = make(TraversalConfig.kernel(active_timeout=None))
    p.on_wg_stats(0.2, RELAY, 100.0, 1000, 1000)
    answer(p, p.tick(0.5), PUB4, 0.51)
    assert p.on_wg_stats(1.0, PUB4, 100.0, 1500, 1100) == []  # baseline, taken on the path
    assert p.on_wg_stats(2.0, RELAY, 100.0, 1600, 1200)       # relayed: flipped, re-assert
    assert p.state is PathState.PENDING
    p.on_wg_stats(3.0, PUB4, 100.0, 1600, 1300)  # back on the path: a new baseline
    assert p.state is PathState.PENDING
    res = p.on_wg_stats(4.0, PUB4, 100.0, 1700, 1400)
    assert RelayIngress(PEER, False) in res and p.state is PathState.DIRECT
    assert any(isinstance(a, PathChanged) and a.reason == "wireguard-rx" for a in res)
    q = make(TraversalConfig.kernel(active_timeout=None, confirm_by_rx=False))
    answer(q, q.tick(0.5), PUB4, 0.51)
    for t, rx in ((1.0, 10), (2.0, 20), (3.0, 30)):
        q.on_wg_stats(t, PUB4, None, rx, rx)
    assert q.state is PathState.PENDING  # strict: a handshake or nothing


def test_kernel_without_handshake_rolls_back_and_marks_the_path_bad() -> None:
    p = make(TraversalConfig.kernel(active_timeout=None))
    answer(p, p.tick(0.5), PUB4, 0.51)
    out: list = []
    t = 0.51
    while p.state is not PathState.RELAY:  # stats read every 0.25 s, none with a handshake
        t = round(t + 0.25, 2)
        out += p.on_wg_stats(t, PUB4, None) + p.tick(t)
    assert t == pytest.approx(5.51)
    assert SetEndpoint(PEER, RELAY) in out and p.counters["no_handshake"] == 1
    assert not pings(p.kick(6.0))  # bad until the next regular round (kick moved it to 66)
    assert pings(p.tick(66.0))


def test_wireguard_roam_to_a_direct_address_is_followed() -> None:
    p = make(TraversalConfig.kernel(active_timeout=None), endpoints=())
    src = ("198.51.100.11", 41641)
    out = p.on_wg_stats(1.0, src, 5.0, 10, 10)
    assert (0, src) in pings(out) and p.counters["follow_wg_roam"] == 1


def test_traffic_in_stats_marks_the_peer_active() -> None:
    p = make(TraversalConfig(active_timeout=10.0))
    answer(p, p.tick(0.5), PUB4, 0.51)
    p.on_wg_stats(20.0, PUB4, None, 1, 1)
    assert not pings(p.tick(20.0))
    p.on_wg_stats(21.0, PUB4, None, 2, 1)
    assert pings(p.tick(21.0))


def test_is_lan() -> None:
    assert is_lan("10.1.2.3") and is_lan("192.168.1.1") and is_lan("fe80::1")
    assert not is_lan("203.0.113.5") and not is_lan("198.51.100.1")  # documentation, "private"
    assert not is_lan("2001:db8::1")


# ---------------------------------------------------------------- Traversal routing


def nodes() -> tuple[Traversal, Traversal, PrivateKey, PrivateKey]:
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    a = Traversal(PrivateKey.generate(), ka.public, TraversalConfig(active_timeout=None),
                  wall=time.time, random_bytes=os.urandom)
    b = Traversal(PrivateKey.generate(), kb.public, TraversalConfig(active_timeout=None),
                  wall=time.time, random_bytes=os.urandom)
    return a, b, ka, kb


def test_traversal_seals_routes_and_verifies_senders() -> None:
    a, b, ka, kb = nodes()
    out_a = a.upsert_peer(kb.public, b.disco_public, [PUB4], 0.0)
    b.upsert_peer(ka.public, a.disco_public, [], 0.0)
    assert SetEndpoint(kb.public, RELAY) in out_a
    ping = next(x for x in out_a if isinstance(x, SendDisco))
    cmm = next(x for x in out_a if isinstance(x, SendViaRelay))
    res = b.on_udp(ping.data, ("198.51.100.1", 41641), 0.01)
    pong = next(x for x in res if isinstance(x, SendDisco) and x.addr == ("198.51.100.1", 41641))
    got = a.on_udp(pong.data, PUB4, 0.02)
    assert any(isinstance(x, PathChanged) and x.path == "direct" for x in got)
    # cmm via relay must come from the node the disco key belongs to
    c = Traversal(PrivateKey.generate(), PrivateKey.generate().public, wall=time.time,
                  random_bytes=os.urandom)
    c.upsert_peer(kb.public, PrivateKey.generate().public, [], 0.0)
    assert c.on_relay(kb.public, cmm.data, 0.0) == []
    assert b.on_relay(ME, cmm.data, 0.0) == []
    assert b.counters["drop_relay_sender_mismatch"] == 1
    again = next(x for x in a.network_changed(1.0) if isinstance(x, SendViaRelay))
    assert b.on_relay(ka.public, again.data, 1.0)
    assert b.on_udp(b"garbage", PUB4, 1.0) == [] and b.disco.counters["drop_not_disco"] == 1


def test_ping_claiming_another_node_key_is_dropped() -> None:
    a, b, ka, _kb = nodes()
    b.upsert_peer(ka.public, a.disco_public, [], 0.0)
    forged = a.disco.seal(b.disco_public, disco.Ping(b"x" * 12, ME))
    assert b.on_udp(forged, PUB4, 0.1) == []
    assert b.counters["drop_node_key_mismatch"] == 1


def test_unknown_sender_is_dropped() -> None:
    a, b, _ka, _kb = nodes()
    wire = a.disco.seal(b.disco_public, disco.Ping(b"x" * 12, ME))
    assert b.on_udp(wire, PUB4, 0.1) == [] and b.counters["drop_unknown_sender"] == 1
    assert not b.disco.counters  # dropped before any key agreement


def test_local_candidate_change_tells_every_peer() -> None:
    a, b, _ka, kb = nodes()
    a.upsert_peer(kb.public, b.disco_public, [], 0.0)
    assert a.set_local([PUB4], 1.0) != []
    assert a.set_local([PUB4], 1.5) == []  # unchanged: nothing to say
    out = a.set_local([Endpoint("198.51.100.3", 1, "stun")], 10.0, hard_nat=True)
    msg = b.disco.open(next(x for x in out if isinstance(x, SendViaRelay)).data)
    assert msg is not None and msg[1] == disco.CallMeMaybe(
        (("198.51.100.3", 1),), disco.FLAG_HARD_NAT | disco.FLAG_MANY_PORTS)


def test_remove_peer_closes_its_extra_ports() -> None:
    a, _b, _ka, kb = nodes()
    a.upsert_peer(kb.public, PrivateKey.generate().public, [PUB4], 0.0)
    a.local.hard_nat = True
    peer = a.peers[kb.public]
    peer.on_call_me_maybe(disco.CallMeMaybe((PUB4,), disco.FLAG_PORT_SEARCH), 3.0)
    assert len(peer._open_socks) == 256
    out = a.remove_peer(kb.public)
    assert len(out) == 1 and len(out[0].socks) == 256 and a.path(kb.public) is None


# ---------------------------------------------------------------- Candidates


def test_candidates_lan_stun_and_hard_nat_guess() -> None:
    c = Candidates(41641)
    assert c.update(lan=["10.1.0.10", "fe80::1", "127.0.0.1", "fd00::2"]) == (
        Endpoint("10.1.0.10", 41641, "local"), Endpoint("fd00::2", 41641, "local"))
    assert c.update(lan=["10.1.0.10", "fd00::2"]) is None  # link-local never published
    new = c.update(reflexive=[("198.51.100.4", 30001), ("2001:db8::4", 41641)], hard_nat=True)
    assert new is not None
    kinds = {(e.ip, e.port): e.kind for e in new}
    assert kinds[("198.51.100.4", 30001)] == "stun"
    assert kinds[("198.51.100.4", 41641)] == "guess"
    assert kinds[("2001:db8::4", 41641)] == "stun"  # the guess equals it: listed once
    assert c.update(hard_nat=False) is not None and len(c.endpoints) == 4
    assert ("198.51.100.4", 30001) in c.addrs


def test_candidates_port_mapping_comes_before_stun_and_can_be_withdrawn() -> None:
    c = Candidates(41641)
    c.update(lan=["10.1.0.10"], reflexive=[("198.51.100.4", 30001)], hard_nat=True)
    new = c.update(mapped=[("198.51.100.4", 41641)])
    assert new is not None
    assert [e.kind for e in new] == ["local", "portmap", "stun"]  # the guess equals it
    assert c.update(mapped=[("198.51.100.4", 41641)]) is None
    assert [e.kind for e in c.update(mapped=[]) or ()] == ["local", "stun", "guess"]


# ---------------------------------------------------------------- invariants under fuzz

_ADDRS = [PUB4, LAN4, PUB6, ("198.51.100.8", 41641), ("198.51.100.9", 1234)]
_events = st.lists(st.one_of(
    st.tuples(st.just("tick"), st.floats(0, 8)),
    st.tuples(st.just("ping"), st.sampled_from(_ADDRS), st.integers(0, 2)),
    st.tuples(st.just("pong"), st.sampled_from(_ADDRS), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("cmm"), st.lists(st.sampled_from(_ADDRS), max_size=4),
              st.integers(0, 15)),
    st.tuples(st.just("stats"), st.sampled_from([*_ADDRS, RELAY, None]),
              st.one_of(st.none(), st.floats(0, 50)), st.integers(0, 10**6)),
    st.tuples(st.just("netmap"), st.lists(st.sampled_from(_ADDRS), max_size=4)),
), max_size=60)


@pytest.mark.parametrize("kernel", [False, True])
@given(events=_events)
@settings(max_examples=examples(120), deadline=None)
def test_fuzzed_event_sequences_keep_the_invariants(kernel: bool, events: list) -> None:
    cfg = (TraversalConfig.kernel if kernel else TraversalConfig)(active_timeout=20.0)
    p = PeerPath(PEER, LocalInfo(ME, (PUB4,), hard_nat=kernel), cfg, 0.0, new_txid=new_txid)
    now = 0.0
    ingress = True
    sent: list = []
    for ev in events:
        kind = ev[0]
        if kind == "tick":
            now += ev[1]
            out = p.tick(now)
        elif kind == "ping":
            out = p.on_ping(ev[1], ev[2], new_txid(), now)
        elif kind == "pong":
            txids = [o.msg.txid for o in sent if isinstance(o, DiscoOut)
                     and isinstance(o.msg, disco.Ping) and o.addr == ev[1] and o.sock == ev[2]]
            txid = txids[-1] if txids and ev[3] else new_txid()
            out = p.on_pong(ev[1], ev[2], disco.Pong(txid, PUB4), now + 0.001)
        elif kind == "cmm":
            out = p.on_call_me_maybe(disco.CallMeMaybe(tuple(ev[1]), ev[2]), now)
        elif kind == "stats":
            out = p.on_wg_stats(now, ev[1], ev[2], ev[3], ev[3])
        else:
            out = p.set_endpoints(ev[1], now)
        sent += out
        for o in out:
            if isinstance(o, RelayIngress):
                assert o.enabled != ingress  # only real changes are announced
                ingress = o.enabled
        assert (p.state is PathState.RELAY) == (p.best is None)
        assert kernel or p.state is not PathState.PENDING
        assert ingress or p.state is not PathState.RELAY
        assert len(p.candidates()) <= cfg.max_candidates
        wake = p.next_wakeup()
        if wake <= now:  # something is due: ticking it must move the timers on
            p.tick(now)
            assert p.next_wakeup() > now


def test_addresses_our_routing_sends_into_the_tunnel_are_never_candidates() -> None:
    """A router's LAN address, once we route its LAN through it, or a peer's tunnel address:
    probing it would put disco (and then WireGuard) inside WireGuard."""
    a, b, _ka, kb = nodes()
    a.upsert_peer(kb.public, b.disco_public, [PUB4, ("198.18.0.1", 41641)], 0.0)
    assert {addr for _s, addr, _r in a.peers[kb.public].candidates()} == {
        PUB4, ("198.18.0.1", 41641)}
    a.set_tunneled([ipaddress.ip_network("198.18.0.0/24"), ipaddress.ip_network("100.64.0.2/32"),
                    ipaddress.ip_network("0.0.0.0/0")])  # an exit node's /0 is not "inside"
    assert [addr for _s, addr, _r in a.peers[kb.public].candidates()] == [PUB4]
    p = a.peers[kb.public]
    out = p.on_call_me_maybe(disco.CallMeMaybe((("198.18.0.1", 41641), PUB6)), 1.0)
    out += p.on_ping(("100.64.0.2", 41641), 0, new_txid(), 1.0)
    assert {addr for _s, addr, _r in p.candidates()} == {PUB4, PUB6}
    assert p.counters["drop_tunneled_candidate"] == 2
    assert ("198.18.0.1", 41641) not in {o.addr for o in out if isinstance(o, DiscoOut)
                                         and not isinstance(o.msg, disco.Pong)}
