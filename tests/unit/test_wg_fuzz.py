"""Hypothesis fuzzing of every parser: hostile bytes are dropped and counted, never raised,
and never change an established session."""

from __future__ import annotations

import pytest
from budget import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_wg_device import ADDR_A, Pair, ip_packet

from wgmesh.wireguard.noise import COOKIE_LEN, INITIATION_LEN, RESPONSE_LEN, message_type
from wgmesh.wireguard.uapi import UapiError, parse_endpoint, parse_set

pytestmark = pytest.mark.unit
FUZZ = settings(max_examples=examples(300), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pair() -> Pair:
    p = Pair()
    p.a_to_b()
    p.b_to_a()
    return p


def _wire_messages(p: Pair) -> list[bytes]:
    return [d for _, d in p.wire]


def shaped(t: int, n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n - 4, max_size=n - 4).map(lambda b: bytes([t, 0, 0, 0]) + b)


hostile = st.one_of(
    st.binary(max_size=200),
    shaped(1, INITIATION_LEN), shaped(2, RESPONSE_LEN), shaped(3, COOKIE_LEN),
    st.integers(32, 200).flatmap(lambda n: shaped(4, n)),
)


def _assert_session_intact(p: Pair, before: tuple[object, object]) -> None:
    assert (p.pa.current, p.pb.current) == before
    n = len(p.tun_b)
    p.a_to_b(b"still")
    assert len(p.tun_b) == n + 1


@FUZZ
@given(data=hostile)
def test_device_survives_hostile_datagrams(pair: Pair, data: bytes) -> None:
    before = (pair.pa.current, pair.pb.current)
    drops = sum(pair.b.drops.values())
    pair.b.receive(data, ("198.51.100.99", 4444), pair.now)
    udp, tun = pair.b.drain()
    assert tun == [] and all(d[0] == 3 for d, _ in udp)  # at most a cookie reply
    assert sum(pair.b.drops.values()) == drops + 1
    _assert_session_intact(pair, before)


@FUZZ
@given(idx=st.integers(0, 1000), pos=st.integers(0, 2000), flip=st.integers(1, 255))
def test_bit_flipped_real_messages_are_dropped(pair: Pair, idx: int, pos: int, flip: int) -> None:
    msgs = _wire_messages(pair)
    msg = bytearray(msgs[idx % len(msgs)])
    msg[pos % len(msg)] ^= flip
    before = (pair.pa.current, pair.pb.current)
    pair.b.receive(bytes(msg), ADDR_A, pair.now)
    pair.a.receive(bytes(msg), ADDR_A, pair.now)
    for dev in (pair.a, pair.b):
        udp, tun = dev.drain()
        assert tun == [] and all(d[0] == 3 for d, _ in udp)
    _assert_session_intact(pair, before)


@FUZZ
@given(data=st.binary(max_size=64))
def test_message_type_classifies_without_error(data: bytes) -> None:
    t = message_type(data)
    assert t in (0, 1, 2, 3, 4)
    if t:
        assert data[1:4] == b"\0\0\0"


@FUZZ
@given(payload=st.binary(max_size=100))
def test_decrypted_non_ip_or_truncated_is_dropped(pair: Pair, payload: bytes) -> None:
    kp = pair.pa.current
    assert kp is not None
    pair.b.receive(kp.encrypt(payload), ADDR_A, pair.now)
    _, tun = pair.b.drain()
    assert all(pkt == ip_packet("10.0.0.1", "10.0.0.2", pkt[20:]) for pkt in tun)


uapi_line = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["private_key", "listen_port", "fwmark", "replace_peers", "public_key",
                     "remove", "update_only", "preshared_key", "endpoint",
                     "persistent_keepalive_interval", "replace_allowed_ips", "allowed_ip",
                     "protocol_version"]).flatmap(
        lambda k: st.one_of(st.text(max_size=70), st.just("ab" * 32), st.just("true"),
                            st.just("1.2.3.4:5"), st.just("10.0.0.0/8"), st.just("65536"))
        .map(lambda v: f"{k}={v}")),
)


@FUZZ
@given(lines=st.lists(uapi_line, max_size=12))
def test_uapi_set_parser_raises_only_uapierror(lines: list[str]) -> None:
    try:
        parse_set(lines)
    except UapiError as e:
        assert e.errno > 0


@FUZZ
@given(text=st.text(max_size=60))
def test_uapi_endpoint_parser(text: str) -> None:
    try:
        host, port = parse_endpoint(text)
    except UapiError:
        return
    assert 0 < port < 65536 and host


def test_uapi_set_parses_wg_output() -> None:
    k = "ab" * 32
    ds = parse_set([f"private_key={k}", "listen_port=51820", "replace_peers=true",
                    f"public_key={k}", "replace_allowed_ips=true", "allowed_ip=10.0.0.2/32",
                    "allowed_ip=fd00::/64", "endpoint=[2001:db8::1]:51820",
                    "persistent_keepalive_interval=25", f"preshared_key={'00' * 32}",
                    "protocol_version=1"])
    assert ds.listen_port == 51820 and ds.replace_peers
    (peer,) = ds.peers
    assert peer.endpoint == ("2001:db8::1", 51820) and peer.persistent_keepalive == 25
    assert [str(n) for n in peer.allowed_ips] == ["10.0.0.2/32", "fd00::/64"]
    with pytest.raises(UapiError):
        parse_set(["bogus=1"])
