"""The sans-I/O WireGuard core, driven with a fake clock: handshakes, PSK, replay,
keypair rotation, every kernel timer, cookies under load, cryptokey routing, roaming."""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Callable

import pytest
from budget import examples

from wgmesh.wireguard.allowedips import AllowedIPs
from wgmesh.wireguard.crypto import dh_generate, dh_public
from wgmesh.wireguard.device import Device, RelaySource
from wgmesh.wireguard.session import ReplayWindow, padded_len
from wgmesh.wireguard.timers import COUNTER_WINDOW_SIZE, MAX_TIMER_HANDSHAKES, Timing

pytestmark = pytest.mark.unit

T = Timing()
ADDR_A = ("192.0.2.1", 51820)
ADDR_B = ("192.0.2.2", 51820)


def ip_packet(src: str, dst: str, payload: bytes = b"hello") -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        h = bytearray(20)
        h[0] = 0x45
        struct.pack_into(">H", h, 2, 20 + len(payload))
        h[9] = 17
        h[12:16], h[16:20] = s.packed, d.packed
    else:
        h = bytearray(40)
        h[0] = 0x60
        struct.pack_into(">H", h, 4, len(payload))
        h[6] = 17
        h[8:24], h[24:40] = s.packed, d.packed
    return bytes(h) + payload


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def wall(self) -> float:
        return 1.7e9 + self.now


class Pair:
    """Two devices on a perfect wire; ``loss`` can drop what one side sends."""

    def __init__(self, psk_a: bytes | None = None, psk_b: bytes | None = None,
                 timing: Timing = T) -> None:
        self.clock = Clock()
        self.a_priv, self.b_priv = dh_generate(), dh_generate()
        self.a = Device(self.a_priv, timing=timing, wall=self.clock.wall, rng=random.Random(1))
        self.b = Device(self.b_priv, timing=timing, wall=self.clock.wall, rng=random.Random(2))
        self.pa = self.a.add_peer(dh_public(self.b_priv))
        self.pb = self.b.add_peer(dh_public(self.a_priv))
        self.a.allowed.insert("10.0.0.2/32", self.pa)
        self.a.allowed.insert("fd00::2/128", self.pa)
        self.b.allowed.insert("10.0.0.1/32", self.pb)
        self.a.set_endpoint(self.pa, ADDR_B)
        self.b.set_endpoint(self.pb, ADDR_A)
        self.a.set_preshared_key(self.pa, psk_a)
        self.b.set_preshared_key(self.pb, psk_b)
        self.tun_a: list[bytes] = []
        self.tun_b: list[bytes] = []
        self.wire: list[tuple[str, bytes]] = []  # everything sent, for replay tests
        self.drop: Callable[[str, bytes], bool] = lambda side, data: False

    @property
    def now(self) -> float:
        return self.clock.now

    def pump(self) -> None:
        for _ in range(20):
            moved = False
            for side, x, y, src in (("a", self.a, self.b, ADDR_A), ("b", self.b, self.a, ADDR_B)):
                udp, tun = x.drain()
                (self.tun_a if side == "a" else self.tun_b).extend(tun)
                for data, _dst in udp:
                    self.wire.append((side, data))
                    moved = True
                    if not self.drop(side, data):
                        y.receive(data, src, self.now)
            if not moved:
                return

    def advance(self, seconds: float, step: float = 0.05) -> None:
        end = self.now + seconds
        while self.now < end:
            self.clock.now = min(end, self.now + step)
            self.a.tick(self.now)
            self.b.tick(self.now)
            self.pump()

    def a_to_b(self, payload: bytes = b"hello") -> None:
        self.a.send(ip_packet("10.0.0.1", "10.0.0.2", payload), self.now)
        self.pump()

    def b_to_a(self, payload: bytes = b"hello") -> None:
        self.b.send(ip_packet("10.0.0.2", "10.0.0.1", payload), self.now)
        self.pump()


def sent_types(p: Pair, side: str) -> list[int]:
    return [d[0] for s, d in p.wire if s == side]


def test_handshake_and_data_both_ways() -> None:
    p = Pair()
    p.a_to_b(b"ping")
    assert p.tun_b == [ip_packet("10.0.0.1", "10.0.0.2", b"ping")]
    # a initiated: its key is current; b holds it as next until a's first data arrived.
    assert p.pa.current is not None and p.pa.current.initiator
    assert p.pb.current is not None and p.pb.next is None
    p.b_to_a(b"pong")
    assert p.tun_a == [ip_packet("10.0.0.2", "10.0.0.1", b"pong")]
    assert sent_types(p, "a")[:2] == [1, 4] and sent_types(p, "b")[0] == 2
    assert not p.a.drops and not p.b.drops
    assert p.pa.last_handshake_wall is not None and p.pb.handshakes_completed == 1


def test_transport_is_padded_to_16() -> None:
    p = Pair()
    p.a_to_b(b"x")  # 21-byte IP packet -> 32 bytes of plaintext
    data = next(d for s, d in p.wire if s == "a" and d[0] == 4)
    assert len(data) == 16 + 32 + 16
    assert padded_len(21, 1420) == 32 and padded_len(1419, 1420) == 1420
    assert padded_len(1500, 1420) == 1500


def test_responder_with_only_next_key_stages_until_confirmed() -> None:
    p = Pair()
    p.drop = lambda side, d: side == "a" and d[0] == 4  # lose a's keepalive after handshake
    p.a.send(ip_packet("10.0.0.1", "10.0.0.2"), p.now)
    p.pump()
    assert p.pb.next is not None and p.pb.current is None
    p.drop = lambda side, d: False
    p.b_to_a(b"early")  # b cannot use 'next' yet: it starts its own handshake
    assert p.tun_a == [ip_packet("10.0.0.2", "10.0.0.1", b"early")]


def test_preshared_key_must_match() -> None:
    psk = bytes(range(32))
    ok = Pair(psk, psk)
    ok.a_to_b()
    assert len(ok.tun_b) == 1
    bad = Pair(psk, bytes(32))
    bad.a_to_b()
    assert bad.tun_b == [] and bad.a.drops["bad_handshake"] == 1


def test_replayed_transport_and_initiation_are_dropped_and_counted() -> None:
    p = Pair()
    p.a_to_b(b"one")
    init = next(d for s, d in p.wire if s == "a" and d[0] == 1)
    data = [d for s, d in p.wire if s == "a" and d[0] == 4][-1]
    p.b.receive(data, ADDR_A, p.now)
    assert p.b.drops["bad_transport"] == 1
    p.clock.now += 1
    p.b.receive(init, ADDR_A, p.now)
    assert p.b.drops["replayed_initiation"] == 1
    p.b.drain()
    p.a_to_b(b"two")
    assert len(p.tun_b) == 2  # the session survived


def test_wrong_key_and_tampered_packets_are_dropped() -> None:
    p = Pair()
    stranger = Device(dh_generate())
    sp = stranger.add_peer(dh_public(p.b_priv))
    stranger.allowed.insert("10.0.0.2/32", sp)
    stranger.set_endpoint(sp, ADDR_B)
    stranger.send(ip_packet("10.0.0.9", "10.0.0.2"), p.now)
    (init, _), = stranger.drain()[0]
    p.b.receive(init, ("192.0.2.9", 1), p.now)
    assert p.b.drops["unknown_peer"] == 1 and not p.b.out_udp
    bad_mac = bytearray(init)
    bad_mac[120] ^= 1
    p.b.receive(bytes(bad_mac), ("192.0.2.9", 1), p.now)
    assert p.b.drops["bad_mac1"] == 1
    p.a_to_b()
    data = bytearray([d for s, d in p.wire if s == "a" and d[0] == 4][-1])
    data[-1] ^= 1
    p.b.receive(bytes(data), ADDR_A, p.now)
    assert p.b.drops["bad_transport"] == 1


def test_inner_source_must_be_allowed() -> None:
    p = Pair()
    p.a.send(ip_packet("10.0.0.66", "10.0.0.2"), p.now)  # a spoofs a source b never gave it
    p.pump()
    assert p.tun_b == [] and p.b.drops["source_not_allowed"] == 1


def test_replay_window_matches_reference_model() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=examples(200), deadline=None)
    @given(st.lists(st.integers(0, 3 * COUNTER_WINDOW_SIZE), max_size=300))
    def check(counters: list[int]) -> None:
        w, seen, top = ReplayWindow(), set(), -1
        for n in counters:
            # the kernel accepts n once, unless it is further than the window behind the top
            expected = n not in seen and n + COUNTER_WINDOW_SIZE >= top
            assert w.check_and_set(n) == expected, n
            if expected:
                seen.add(n)
                top = max(top, n)

    check()


def test_replay_window_edges() -> None:
    w = ReplayWindow()
    assert w.check_and_set(COUNTER_WINDOW_SIZE + 10)
    assert w.check_and_set(10)  # exactly a window behind
    assert not w.check_and_set(9)
    assert not w.check_and_set(10)
    assert not w.check_and_set(2**64 - 1)


def test_rekey_after_time_on_send_and_three_rekeys_keep_data_flowing() -> None:
    p = Pair()
    p.a_to_b()
    for i in range(3):
        p.advance(T.rekey_after_time - 1, step=1)
        p.a_to_b()  # fresh enough: no rekey yet
        assert p.pa.handshakes_completed == i + 1
        p.advance(1.5, step=0.5)
        p.a_to_b()  # now older than REKEY_AFTER_TIME: a initiates, and the packet still goes
        p.b_to_a()
    assert p.pa.handshakes_completed == 4
    assert len(p.tun_b) == 7 and len(p.tun_a) == 3
    assert p.pa.previous is not None  # the old key stays for packets in flight


def test_keys_die_after_reject_after_time_and_are_wiped_after_3x() -> None:
    p = Pair()
    p.a_to_b()
    kp = p.pa.current
    p.drop = lambda side, d: True  # the network is gone
    p.advance(T.reject_after_time + 1, step=1)
    assert p.a.valid_send_keypair(p.pa, p.now) is None
    p.advance(T.zero_keys_after - T.reject_after_time, step=5)
    assert p.pa.current is None and p.pb.current is None and p.pa.next is None
    assert kp.local_index not in p.a.index


def test_retransmit_with_jitter_then_give_up() -> None:
    p = Pair()
    p.drop = lambda side, d: side == "b"  # responses never arrive
    p.a.send(ip_packet("10.0.0.1", "10.0.0.2"), p.now)
    p.pump()
    times = []
    for _ in range(MAX_TIMER_HANDSHAKES + 3):
        before = len(sent_types(p, "a"))
        start = p.now
        while len(sent_types(p, "a")) == before and p.now - start < 10:
            p.advance(0.01, step=0.01)
        times.append(p.now - start)
    retries = [t for t in times[:MAX_TIMER_HANDSHAKES] if t < 10]
    assert len(retries) == MAX_TIMER_HANDSHAKES
    assert all(T.rekey_timeout <= t <= T.rekey_timeout + T.rekey_timeout_jitter + 0.02
               for t in retries)
    assert len({round(t, 2) for t in retries}) > 1  # jittered
    assert times[-1] >= 10  # gave up: no more initiations
    assert not p.pa.staged


def test_keepalive_after_receiving_data_without_reply() -> None:
    p = Pair()
    p.a_to_b()
    n = len(sent_types(p, "b"))
    p.advance(T.keepalive_timeout - 0.2)
    assert len(sent_types(p, "b")) == n
    p.advance(0.4)
    assert sent_types(p, "b")[n:] == [4]  # b confirms receipt with an empty packet
    ka = [d for s, d in p.wire if s == "b"][-1]
    assert len(ka) == 32


def test_new_handshake_when_sent_data_gets_no_answer() -> None:
    p = Pair()
    p.a_to_b()
    p.drop = lambda side, d: side == "b"
    p.a_to_b()
    n = sent_types(p, "a").count(1)
    p.advance(T.new_handshake_after + T.rekey_timeout_jitter + 0.1)
    assert sent_types(p, "a").count(1) == n + 1


def test_persistent_keepalive() -> None:
    p = Pair()
    p.a.set_persistent_keepalive(p.pa, 25, p.now)  # sends at once, as the kernel does
    p.pump()
    assert len(p.tun_b) == 0 and p.pb.next is None and p.pb.current is not None
    n = len(sent_types(p, "a"))
    p.advance(24.9, step=0.5)
    assert len(sent_types(p, "a")) == n
    p.advance(0.6, step=0.1)
    assert len(sent_types(p, "a")) == n + 1


def test_initiator_rekeys_on_receive_before_key_dies() -> None:
    p = Pair()
    p.a_to_b()
    p.clock.now += T.initiator_rekey_on_receive + 0.1
    p.b_to_a()  # b's keypair for a still valid (reject at 180 s); a rekeys now
    assert p.pa.handshakes_completed == 2


def test_roaming_moves_the_endpoint() -> None:
    p = Pair()
    p.a_to_b()
    p.a.send(ip_packet("10.0.0.1", "10.0.0.2"), p.now)
    (data, _), = p.a.drain()[0]
    p.b.receive(data, ("198.51.100.7", 40000), p.now)
    assert p.pb.endpoint == ("198.51.100.7", 40000)
    p.b.send(ip_packet("10.0.0.2", "10.0.0.1"), p.now)
    assert p.b.drain()[0][0][1] == ("198.51.100.7", 40000)


def test_flood_triggers_cookie_replies_and_session_keeps_working() -> None:
    p = Pair()
    p.a_to_b(b"before")
    a_pub = dh_public(p.a_priv)
    flooders = []
    for _i in range(40):
        d = Device(dh_generate())
        fp = d.add_peer(dh_public(p.b_priv))
        d.set_endpoint(fp, ADDR_B)
        flooders.append((d, fp))
    cookies = 0
    for i in range(5):
        for j, (d, fp) in enumerate(flooders):
            fp.last_sent_handshake = float("-inf")
            d._initiate(fp, p.now, retry=False)
            (init, _), = d.drain()[0]
            p.b.receive(init, (f"198.51.100.{j + 10}", 1000 + i), p.now)
            for reply, _dst in p.b.drain()[0]:
                cookies += reply[0] == 3
                d.receive(reply, ADDR_B, p.now)
        p.clock.now += 0.01
    assert cookies > 0 and p.b.drops["cookie_reply_sent"] == cookies
    assert p.b.drops["unknown_peer"] > 0  # the first ones were processed before the load
    # A flooder that got a cookie retries with MAC2 and passes the cookie check.
    d, fp = flooders[-1]
    assert fp.cookies.cookie
    fp.last_sent_handshake = float("-inf")
    d._initiate(fp, p.now, retry=False)
    (init, _), = d.drain()[0]
    before = p.b.drops["cookie_reply_sent"]
    p.b.receive(init, ("198.51.100.49", 1004), p.now)
    assert p.b.drops["cookie_reply_sent"] == before
    # The established session never noticed.
    p.a_to_b(b"during")
    assert p.tun_b[-1].endswith(b"during") and p.b.peers[a_pub].handshakes_completed == 1


def test_rate_limit_per_source_under_load() -> None:
    from wgmesh.wireguard.device import RateLimiter
    rl = RateLimiter()
    src = ("198.51.100.1", 1)
    assert sum(rl.allow(src, 0.0) for _ in range(10)) == RateLimiter.BURST
    assert rl.allow(("198.51.100.2", 1), 0.0)
    assert rl.allow(src, 1 / RateLimiter.PER_SECOND + 1e-9)
    assert rl.allow(("2001:db8::1", 1), 0.0) and rl.allow(("2001:db8::2", 1), 0.0)
    rl.gc(5.0)
    assert not rl._buckets


def test_initiator_handles_cookie_reply() -> None:
    p = Pair()
    p.b.under_load_rate = 0  # b is under load from the first handshake on
    p.a_to_b()
    assert p.tun_b == [] and p.b.drops["cookie_reply_sent"] == 1
    assert p.pa.cookies.cookie
    p.advance(T.rekey_timeout + T.rekey_timeout_jitter + 0.1)  # the retry carries MAC2
    assert len(p.tun_b) == 1


def test_allowed_ips_longest_prefix_v4_v6() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("0.0.0.0/0", "default")
    t.insert("10.0.0.0/8", "ten")
    t.insert("10.1.0.0/16", "ten-one")
    t.insert("10.1.2.3/32", "host")
    t.insert("::/0", "v6default")
    t.insert("2001:db8::/32", "doc")
    t.insert("2001:db8:1::/48", "doc1")
    assert t.lookup("10.1.2.3") == "host"
    assert t.lookup("10.1.2.4") == "ten-one"
    assert t.lookup("10.2.0.1") == "ten"
    assert t.lookup("192.0.2.1") == "default"
    assert t.lookup("2001:db8:1::5") == "doc1"
    assert t.lookup("2001:db8:2::5") == "doc"
    assert t.lookup("fe80::1") == "v6default"
    assert t.lookup_packet_dst(ip_packet("fd00::1", "2001:db8:1::9")) == "doc1"
    t.replace("ten", ["10.9.0.0/16"])
    assert t.lookup("10.2.0.1") == "default" and t.lookup("10.9.1.1") == "ten"
    assert [str(n) for n in t.networks("ten")] == ["10.9.0.0/16"]
    t.insert("10.9.0.0/16", "moved")  # a network belongs to the last peer given it
    assert t.lookup("10.9.1.1") == "moved" and t.networks("ten") == []
    assert t.lookup_packet_dst(b"") is None and t.lookup_packet_dst(b"\x45" * 5) is None


def test_v6_inner_packets() -> None:
    p = Pair()
    p.b.allowed.insert("fd00::1/128", p.pb)
    p.b.send(ip_packet("fd00::2", "fd00::1", b"six"), p.now)
    p.pump()
    p.a.send(ip_packet("fd00::1", "fd00::2", b"six"), p.now)
    p.pump()
    assert p.tun_b == [ip_packet("fd00::1", "fd00::2", b"six")]


def test_relay_hook_and_other_traffic_hook() -> None:
    p = Pair()
    relayed: list[bytes] = []
    p.a.set_relay(p.pa, relayed.append)
    p.a.send(ip_packet("10.0.0.1", "10.0.0.2"), p.now)
    udp, _ = p.a.drain()
    assert [dst for _, dst in udp] == [relayed.append]
    init = udp[0][0]
    p.b.set_relay(p.pb, relayed.append)
    p.b.receive(init, RelaySource(dh_public(p.a_priv)), p.now)
    assert p.pb.endpoint == ADDR_A  # relayed packets do not move the endpoint
    (resp, dst), = p.b.drain()[0]
    assert dst == relayed.append and resp[0] == 2
    p.b.set_relay(p.pb, None)
    got: list[tuple[bytes, tuple[str, int]]] = []
    p.b.on_other = lambda d, a: got.append((d, a))
    stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)
    p.b.receive(stun, ("203.0.113.5", 3478), p.now)
    p.b.receive(b"\x01\x00\x00\x00short", ("203.0.113.5", 3478), p.now)  # wrong length: other
    assert got == [(stun, ("203.0.113.5", 3478)),
                   (b"\x01\x00\x00\x00short", ("203.0.113.5", 3478))]


def test_changing_private_key_restarts_sessions() -> None:
    p = Pair()
    p.a_to_b()
    p.b.set_private_key(p.a_priv)  # b now has a's key: its peer 'a' is itself and goes away
    assert p.b.peers == {}
    p.a.set_private_key(dh_generate())
    assert p.pa.current is None and not [k for k, v in p.a.index.items() if v[0] is p.pa]


def test_message_count_limits() -> None:
    from wgmesh.wireguard.timers import REJECT_AFTER_MESSAGES, REKEY_AFTER_MESSAGES
    p = Pair()
    p.a_to_b()
    kp = p.pa.current
    assert kp is not None
    kp.send_counter = REKEY_AFTER_MESSAGES + 1
    p.clock.now += T.rekey_timeout  # past the initiation rate limit
    n = sent_types(p, "a").count(1)
    p.a_to_b()  # still sent under the old key, and a rekey starts
    assert sent_types(p, "a").count(1) == n + 1 and p.pa.current is not kp
    old = p.pa.current
    assert old is not None
    old.send_counter = REJECT_AFTER_MESSAGES
    assert p.a.valid_send_keypair(p.pa, p.now) is None  # never reuse a nonce past the limit


def test_allowed_ips_scale_and_reassignment() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    t: AllowedIPs[int] = AllowedIPs()
    for i in range(2000):
        t.insert(f"10.{i >> 8}.{i & 255}.0/24", i)
        t.insert(f"fd00::{i:x}/128", i)
    assert t.lookup("10.3.7.9") == 3 * 256 + 7 and t.lookup("fd00::7cf") == 0x7CF
    t.remove_value(5)
    assert t.lookup("10.0.5.1") is None and t.networks(5) == []
    assert [str(n) for n in t.networks(6)] == ["10.0.6.0/24", "fd00::6/128"]

    @settings(max_examples=examples(100), deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 255), st.integers(0, 32), st.integers(0, 3)),
                    max_size=40), st.integers(0, 2**32 - 1))
    def matches_model(ops: list[tuple[int, int, int]], probe: int) -> None:
        table: AllowedIPs[int] = AllowedIPs()
        model: dict[ipaddress.IPv4Network, int] = {}
        for b, plen, owner in ops:
            net = ipaddress.IPv4Network((b << 24, plen), strict=False)
            table.insert(net, owner)
            model[net] = owner
        addr = ipaddress.IPv4Address(probe)
        best = max((n for n in model if addr in n), key=lambda n: n.prefixlen, default=None)
        assert table.lookup(addr) == (model[best] if best is not None else None)
        for owner in range(4):
            assert set(table.networks(owner)) == {n for n, o in model.items() if o == owner}

    matches_model()


def test_seal_many_seals_a_drain_as_packet_by_packet_would() -> None:
    """A TUN drain mixing destinations: each routable packet sealed back to back and
    readable at the peer, the others dropped and counted, the send timers armed once."""
    p = Pair()
    p.b.allowed.insert("fd00::1/128", p.pb)
    p.a_to_b(b"hello")  # a handshake, so a holds a fresh key
    packets = [ip_packet("10.0.0.1", "10.0.0.2", b"one"),
               ip_packet("fd00::1", "fd00::2", b"v6"),
               ip_packet("10.0.0.1", "10.9.9.9", b"nowhere"),
               b"\x45\x00\x00",  # too short to be IPv4
               b"\x00" * 40,  # not IP at all: its bytes 24..40 are no v6 address
               ip_packet("10.0.0.1", "10.0.0.2", b"x" * 100)]
    bufs = [bytearray(pkt) + bytearray(16) for pkt in packets]
    out = memoryview(bytearray(4096))
    p.pa.t_new_handshake = None
    sealed = p.a.seal_many(bufs, [len(x) for x in packets], out, p.now)
    assert [d for _, _, d in sealed] == [ADDR_B] * 3
    assert [o for o, _, _ in sealed] == [0, sealed[0][1], sealed[0][1] + sealed[1][1]]
    assert p.a.drops["no_route"] == 3 and p.a.out_udp == []
    assert p.pa.t_new_handshake is not None  # data_sent ran: expect an answer
    tmv = memoryview(bytearray(4096))
    got: list[bytes] = []
    p.b.open_many((out[off:off + length] for off, length, _ in sealed), ADDR_A, p.now, tmv,
                  lambda plain, n: got.append(bytes(plain[:n])))
    assert got == [packets[0], packets[1], packets[5]]


def test_seal_many_stages_a_drain_with_no_key_and_starts_one_handshake() -> None:
    p = Pair()
    packets = [ip_packet("10.0.0.1", "10.0.0.2", bytes([i]) * 10) for i in range(3)]
    bufs = [bytearray(pkt) + bytearray(16) for pkt in packets]
    sealed = p.a.seal_many(bufs, [len(x) for x in packets], memoryview(bytearray(4096)),
                           p.now)
    assert sealed == [] and len(p.pa.staged) == 3
    assert [d[0] for d, _ in p.a.out_udp] == [1]  # one initiation
    p.pump()  # the handshake completes and the staged drain follows, in order
    assert p.tun_b == packets


def test_open_many_confirms_a_key_once_and_drops_a_replay_in_the_batch() -> None:
    """One GRO batch under the responder's unconfirmed key: the first message confirms it
    (once) and flushes what b had staged; every packet arrives, a replayed copy does not,
    and a message that is not transport inside the batch costs the next one nothing."""
    p = Pair()
    p.drop = lambda side, d: side == "a" and d[0] == 4  # b hears the initiation only
    p.a.send(ip_packet("10.0.0.1", "10.0.0.2", b"first"), p.now)
    p.pump()
    assert p.pb.next is not None and p.pb.current is None
    p.b.send(ip_packet("10.0.0.2", "10.0.0.1", b"staged"), p.now)  # b waits for a's data
    assert len(p.pb.staged) == 1
    p.b.drain()
    batch = []
    for i in range(3):
        p.a.send(ip_packet("10.0.0.1", "10.0.0.2", bytes([i]) * 30), p.now)
        batch += [d for d, _ in p.a.drain()[0]]
    batch.insert(2, batch[0])  # a replay inside the batch
    assert [d[0] for d in batch] == [4] * 4
    confirmed = p.pb.handshakes_completed
    got: list[bytes] = []
    tmv = memoryview(bytearray(2048))
    p.b.open_many((memoryview(d) for d in batch), ADDR_A, p.now, tmv,
                  lambda plain, n: got.append(bytes(plain[:n])))
    assert got == [ip_packet("10.0.0.1", "10.0.0.2", bytes([i]) * 30) for i in range(3)]
    assert p.pb.current is not None and p.pb.next is None
    assert p.pb.handshakes_completed == confirmed + 1 and not p.pb.staged
    assert p.b.drops["bad_transport"] == 1
    udp, _ = p.b.drain()
    assert [d[0] for d, _ in udp] == [4]  # the staged packet, now sent
    # A message that is not transport between two that are: both still arrive.
    p.a.send(ip_packet("10.0.0.1", "10.0.0.2", b"late"), p.now)
    late = p.a.drain()[0][0][0]
    got.clear()
    p.b.open_many((memoryview(d) for d in (b"\x01\x00\x00\x00junk", late)), ADDR_A, p.now,
                  tmv, lambda plain, n: got.append(bytes(plain[:n])))
    assert got == [ip_packet("10.0.0.1", "10.0.0.2", b"late")]
