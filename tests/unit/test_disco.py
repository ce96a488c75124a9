"""Disco codec: round trips, sealing, and silent drops for everything hostile."""

from __future__ import annotations

import os
import struct

import pytest
from budget import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from wgmesh import disco, stun
from wgmesh.disco import MAGIC, CallMeMaybe, Disco, Ping, Pong, is_disco
from wgmesh.keys import Key, PrivateKey

pytestmark = pytest.mark.unit

A, B, C = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()


class Wall:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def new_txid() -> bytes:
    return os.urandom(disco.TXID_LEN)


def pair(wall: Wall | None = None) -> tuple[Disco, Disco]:
    w = wall or Wall()
    return Disco(A, wall=w, random_bytes=os.urandom), Disco(B, wall=w, random_bytes=os.urandom)


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None).map(str)
addrs = st.tuples(st.one_of(ipv4, ipv6), st.integers(1, 65535))
txids = st.binary(min_size=12, max_size=12)
keys = st.binary(min_size=32, max_size=32).map(Key.from_raw)
paddings = st.one_of(st.integers(0, 1600), st.just(disco.MAX_PADDING))
sizes = st.integers(disco.PING_LEN + 1, disco.PING_LEN + disco.MAX_PADDING)
messages = st.one_of(
    st.builds(Ping, txids, keys, paddings),
    st.builds(Pong, txids, addrs),
    st.builds(Pong, txids, st.one_of(addrs, st.just(disco.NO_ADDR)), sizes),
    st.builds(CallMeMaybe, st.lists(addrs, max_size=disco.MAX_ENDPOINTS).map(tuple),
              st.integers(0, 255)),
)


@given(messages)
@settings(max_examples=examples(150), deadline=None)
def test_round_trip(msg: disco.Message) -> None:
    a, b = pair()
    wire = a.seal(B.public, msg)
    assert is_disco(wire)
    assert b.open(wire) == (A.public, msg)


@given(txids, keys, paddings, addrs)
@settings(max_examples=examples(150), deadline=None)
def test_a_pong_is_never_larger_than_the_ping_it_answers(txid: bytes, key: Key, padding: int,
                                                          src: disco.Addr) -> None:
    """Padding buys no amplification: the answer to any ping, padded or not, is smaller,
    and it reports the padded ping's length as it arrived."""
    a, b = pair()
    ping = a.seal(B.public, Ping(txid, key, padding))
    assert len(ping) == disco.PING_LEN + padding
    got = b.open(ping)
    assert got is not None and got[1] == Ping(txid, key, padding)
    pong = b.seal(A.public, Pong(txid, src, len(ping) if padding else 0))
    assert len(pong) < len(ping)
    assert a.open(pong) == (B.public, Pong(txid, src, len(ping) if padding else 0))


def test_unpadded_ping_and_its_pong_keep_the_old_wire_format() -> None:
    """An old node reads only exact lengths: an unpadded ping's body is txid + node key
    (44 bytes), a plain pong's txid + address (30): nothing was appended to either."""
    a, _ = pair()
    assert len(a.seal(B.public, Ping(new_txid(), A.public))) == disco.PING_LEN
    plain_pong = a.seal(B.public, Pong(new_txid(), ("192.0.2.1", 9)))
    assert len(plain_pong) == disco.PONG_LEN - 2
    overhead = disco.HEADER_LEN + disco.MAC_LEN + 10
    assert (disco.PING_LEN - overhead, len(plain_pong) - overhead) == (44, 30)


def test_padding_and_sizes_out_of_range_are_refused() -> None:
    a, b = pair()
    for bad in (Ping(new_txid(), A.public, disco.MAX_PADDING + 1), Ping(new_txid(), A.public, -1),
                Pong(new_txid(), ("192.0.2.1", 9), disco.PING_LEN),
                Pong(new_txid(), ("192.0.2.1", 9), 70000)):
        with pytest.raises(ValueError):
            a.seal(B.public, bad)
    box = a._box(B.public)
    for plain in (struct.pack("!BBQ", 1, 0, 0) + bytes(44 + disco.MAX_PADDING + 1),
                  struct.pack("!BBQ", 2, 0, 0) + bytes(30) + struct.pack("!H", 10),
                  struct.pack("!BBQ", 2, 0, 0) + bytes(31)):
        nonce = os.urandom(disco.NONCE_LEN)
        assert b.open(MAGIC + A.public.raw + nonce + box.encrypt(plain, nonce).ciphertext) \
            is None
    assert b.counters["drop_malformed"] == 3


def test_ipv4_mapped_addresses_come_back_as_ipv4() -> None:
    a, b = pair()
    got = b.open(a.seal(B.public, Pong(b"x" * 12, ("::ffff:10.0.0.1", 5))))
    assert got is not None and got[1] == Pong(b"x" * 12, ("10.0.0.1", 5))


def test_magic_never_collides_with_wireguard_or_stun() -> None:
    a, _ = pair()
    wire = a.seal(B.public, Ping(new_txid(), A.public))
    assert not stun.is_stun(wire)
    assert wire[0] not in (1, 2, 3, 4) and wire[4:8] != struct.pack("!I", stun.MAGIC_COOKIE)
    assert int.from_bytes(wire[:4], "big") == disco.BPF_WORD
    for wg_type in (1, 2, 3, 4):
        assert not is_disco(bytes([wg_type, 0, 0, 0]) + bytes(200))
    assert not is_disco(stun.encode_binding_request(new_txid()))


def test_wrong_recipient_is_dropped_and_counted() -> None:
    a, _ = pair()
    c = Disco(C, wall=Wall(), random_bytes=os.urandom)
    assert c.open(a.seal(B.public, Ping(new_txid(), A.public))) is None
    assert c.counters["drop_bad_box"] == 1


def test_forged_sender_key_is_dropped() -> None:
    a, b = pair()
    wire = bytearray(a.seal(B.public, Ping(new_txid(), A.public)))
    wire[len(MAGIC):len(MAGIC) + 32] = C.public.raw
    assert b.open(bytes(wire)) is None
    assert b.counters["drop_bad_box"] == 1


@pytest.mark.parametrize("cut", [0, 3, len(MAGIC), 40, disco.HEADER_LEN, disco.HEADER_LEN + 20])
def test_truncated_is_dropped(cut: int) -> None:
    a, b = pair()
    wire = a.seal(B.public, Pong(new_txid(), ("1.2.3.4", 9)))
    assert b.open(wire[:cut]) is None
    assert sum(v for k, v in b.counters.items() if k.startswith("drop_")) == 1


def test_every_flipped_bit_is_dropped() -> None:
    a, b = pair()
    wire = a.seal(B.public, Ping(new_txid(), A.public))
    for i in range(len(wire)):
        bad = bytearray(wire)
        bad[i] ^= 0x01
        assert b.open(bytes(bad)) is None
    assert b.counters["opened"] == 0


def test_replay_is_dropped_once_seen() -> None:
    a, b = pair()
    wire = a.seal(B.public, Ping(new_txid(), A.public))
    assert b.open(wire) is not None
    assert b.open(wire) is None
    assert b.counters["drop_replay"] == 1


def test_replay_older_than_the_window_is_dropped() -> None:
    wall = Wall()
    a, b = pair(wall)
    old = a.seal(B.public, Ping(new_txid(), A.public))
    wall.t += disco.REPLAY_WINDOW + 1
    assert b.open(a.seal(B.public, Ping(new_txid(), A.public))) is not None
    assert b.open(old) is None  # never seen, but older than the window
    assert b.counters["drop_replay"] == 1


def test_reordering_within_the_window_is_fine() -> None:
    wall = Wall()
    a, b = pair(wall)
    first = a.seal(B.public, Ping(new_txid(), A.public))
    wall.t += 5
    second = a.seal(B.public, Ping(new_txid(), A.public))
    assert b.open(second) is not None
    assert b.open(first) is not None


def test_flooding_sender_cannot_grow_state_without_bound() -> None:
    a, b = pair()
    wires = [a.seal(B.public, Ping(new_txid(), A.public))
             for _ in range(disco.MAX_NONCES_PER_SENDER + 50)]
    for w in wires:
        assert b.open(w) is not None
    win = b._senders[A.public]
    assert len(win.nonces) <= disco.MAX_NONCES_PER_SENDER
    for w in wires:  # replays, including the evicted ones, stay refused
        assert b.open(w) is None


def test_version_and_body_checks_after_a_valid_box() -> None:
    a, b = pair()
    box = a._box(B.public)
    bad_plains = [
        struct.pack("!BBQ", 1, 9, 0) + bytes(44),           # unknown version
        struct.pack("!BBQ", 9, 0, 0) + bytes(44),           # unknown type
        struct.pack("!BBQ", 1, 0, 0) + bytes(43),           # short ping
        struct.pack("!BBQ", 2, 0, 0) + bytes(30),           # pong with port 0
        struct.pack("!BBQ", 3, 0, 0) + bytes(18),           # cmm without flags byte
    ]
    for plain in bad_plains:
        nonce = os.urandom(disco.NONCE_LEN)
        wire = MAGIC + A.public.raw + nonce + box.encrypt(plain, nonce).ciphertext
        assert b.open(wire) is None
    assert b.counters["opened"] == 0
    assert b.counters["drop_version"] == 1 and b.counters["drop_malformed"] == 4


def test_time_and_randomness_come_from_the_owner() -> None:
    """No hidden clock or entropy: the same wall time and random bytes seal the same."""
    one, two = (Disco(A, wall=Wall(), random_bytes=bytes) for _ in range(2))
    assert one.new_txid() == bytes(disco.TXID_LEN)
    msg = Ping(one.new_txid(), A.public)
    wire = one.seal(B.public, msg)
    assert wire == two.seal(B.public, msg)
    assert Disco(B, wall=Wall(), random_bytes=bytes).open(wire) == (A.public, msg)


def test_own_messages_reflected_back_are_dropped() -> None:
    a, _ = pair()
    assert a.open(a.seal(B.public, Ping(new_txid(), A.public))) is None
    assert a.counters["drop_from_self"] == 1


def test_too_many_endpoints_is_refused_at_seal() -> None:
    a, _ = pair()
    with pytest.raises(ValueError):
        a.seal(B.public, CallMeMaybe(tuple(("1.1.1.1", p) for p in range(1, 70))))


@given(st.binary(max_size=300))
@settings(max_examples=examples(300), deadline=None)
def test_fuzz_open_never_raises(data: bytes) -> None:
    _, b = pair()
    assert b.open(data) is None
    assert b.open(MAGIC + data) is None


@given(st.one_of(st.binary(min_size=0, max_size=200),
                 st.binary(min_size=40, max_size=50).map(lambda b: b + bytes(1400))),
       st.one_of(st.integers(0, 255), st.sampled_from([1, 2])))
@settings(max_examples=examples(300), deadline=None)
def test_fuzz_authenticated_garbage_never_raises(body: bytes, mtype: int) -> None:
    """Even a peer holding a valid key cannot crash the parser."""
    a, b = pair()
    box = a._box(B.public)
    nonce = os.urandom(disco.NONCE_LEN)
    plain = struct.pack("!BBQ", mtype, 0, 1) + body
    wire = MAGIC + A.public.raw + nonce + box.encrypt(plain, nonce).ciphertext
    got = b.open(wire)
    assert got is None or got[0] == A.public


def test_sender_of_reads_the_claimed_key_without_crypto() -> None:
    a, _ = pair()
    assert disco.sender_of(a.seal(B.public, Ping(new_txid(), A.public))) == A.public
    assert disco.sender_of(b"wgm") is None and disco.sender_of(bytes(100)) is None
