"""STUN codec: RFC 5769 known answers, round trips, the responder, fuzzing."""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from stuntools import query

from wgmesh import stun

pytestmark = pytest.mark.unit

# RFC 5769 section 2.2 / 2.3: sample responses (MESSAGE-INTEGRITY present but not
# checked here: this codec speaks unauthenticated Binding only).
TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
SOFTWARE = bytes.fromhex("8022000b" "74657374" "20766563" "746f7220")
RFC5769_V4 = bytes.fromhex(
    "0101003c" "2112a442") + TXID + SOFTWARE + bytes.fromhex(
    "00200008" "0001a147" "e112a643"
    "00080014" "2b91f599" "fd9e90c3" "8c7489f9" "2af9ba53" "f06be7d7"
    "80280004" "c07d4c96")
RFC5769_V6 = bytes.fromhex(
    "01010048" "2112a442") + TXID + SOFTWARE + bytes.fromhex(
    "00200014" "0002a147" "0113a9fa" "a5d3f179" "bc25f4b5" "bed2b9d9"
    "00080014" "a382954e" "4be67bf1" "1784c97c" "8292c275" "bfe3ed41"
    "80280004" "c8fb0b4c")


def new_txid() -> bytes:
    return os.urandom(stun.TXID_LEN)


def test_rfc5769_ipv4_response() -> None:
    msg = stun.parse(RFC5769_V4)
    assert msg.msg_type == stun.BINDING_SUCCESS and msg.txid == TXID
    assert msg.software == "test vector"
    assert msg.has_fingerprint
    assert stun.parse_binding_response(RFC5769_V4, TXID) == ("192.0.2.1", 32853)


def test_rfc5769_ipv6_response() -> None:
    assert stun.parse_binding_response(RFC5769_V6) == (
        "2001:db8:1234:5678:11:2233:4455:6677", 32853)


def test_fingerprint_is_checked() -> None:
    bad = bytearray(RFC5769_V4)
    bad[-1] ^= 1
    with pytest.raises(stun.StunError, match="FINGERPRINT"):
        stun.parse(bytes(bad))


@pytest.mark.parametrize("addr", [("203.0.113.7", 41641), ("2001:db8::1", 1), ("0.0.0.0", 0),
                                  ("::ffff:198.51.100.3", 65535)])
def test_success_round_trip(addr: tuple[str, int]) -> None:
    txid = new_txid()
    data = stun.encode_binding_success(txid, addr, software="wgmesh")
    assert stun.is_stun(data)
    msg = stun.parse(data)
    want = ("198.51.100.3", 65535) if addr[0].startswith("::ffff:") else addr
    assert msg.xor_mapped_address == msg.mapped_address == want
    assert msg.software == "wgmesh"
    assert stun.parse_binding_response(data, txid) == want
    with pytest.raises(stun.StunError, match="another transaction"):
        stun.parse_binding_response(data, new_txid())


def test_request_and_responder() -> None:
    req = stun.encode_binding_request(new_txid(), software="client")
    assert stun.is_stun(req) and len(req) % 4 == 0
    assert stun.parse(req).msg_type == stun.BINDING_REQUEST
    reply = stun.binding_response(req, ("198.51.100.9", 5000), software="relay")
    assert reply is not None
    assert stun.parse_binding_response(reply, req[8:20]) == ("198.51.100.9", 5000)
    # a request without FINGERPRINT is fine too
    plain = stun.encode_binding_request(new_txid(), fingerprint=False)
    assert stun.binding_response(plain, ("203.0.113.1", 1)) is not None


def test_responder_stays_silent_on_non_requests() -> None:
    txid = new_txid()
    success = stun.encode_binding_success(txid, ("192.0.2.1", 1))
    indication = stun.encode(stun.BINDING_INDICATION, txid)
    for data in (success, indication, b"", b"\x01\x00\x00\x00" + bytes(144), RFC5769_V4[:-1]):
        assert stun.binding_response(data, ("192.0.2.1", 1)) is None


def test_unknown_required_attribute_gets_420() -> None:
    req = stun.encode(stun.BINDING_REQUEST, new_txid(), [(0x0003, b"\x00\x00\x00\x04")])
    reply = stun.binding_response(req, ("192.0.2.1", 1))
    assert reply is not None
    msg = stun.parse(reply)
    assert msg.msg_type == stun.BINDING_ERROR
    assert msg.error == (420, "Unknown Attribute")
    assert msg.get(stun.ATTR_UNKNOWN_ATTRIBUTES) == b"\x00\x03"
    with pytest.raises(stun.StunError, match="420"):
        stun.parse_binding_response(reply)
    # comprehension-optional unknowns (>= 0x8000) are ignored
    opt = stun.encode(stun.BINDING_REQUEST, new_txid(), [(0x8055, b"x")])
    assert stun.parse(stun.binding_response(opt, ("192.0.2.1", 1)) or b"").msg_type == \
        stun.BINDING_SUCCESS


def test_wireguard_and_disco_are_not_stun() -> None:
    cookie = struct.pack("!I", stun.MAGIC_COOKIE)
    # WireGuard initiation whose sender index happens to equal the cookie
    assert not stun.is_stun(b"\x01\x00\x00\x00" + cookie + bytes(140))
    assert not stun.is_stun(b"\x04\x00\x00\x00" + cookie + bytes(24))
    assert not stun.is_stun("TS💬".encode() + bytes(40))
    assert not stun.is_stun(b"\x00\x01\x00\x00" + b"\x21\x12\xa4\x43" + bytes(12))


def test_transaction_retransmits_then_fails() -> None:
    tx = stun.BindingTransaction(0.0, new_txid(), rto=0.5, max_sends=7)
    sends = [0.0]
    now = 0.0
    while not tx.done:
        deadline = tx.next_deadline or now
        assert tx.on_timeout(deadline - 0.001) is None  # not due yet
        now = deadline
        if tx.on_timeout(now) is not None:
            sends.append(now)
    assert tx.failed and tx.result is None
    # RFC 8489 6.2.1: 0, 500, 1500, 3500, 7500, 15500, 31500 ms; fail at 39500 ms
    assert sends == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert now == pytest.approx(39.5)


def test_transaction_takes_only_its_reply() -> None:
    txid = new_txid()
    tx = stun.BindingTransaction(10.0, txid)
    assert tx.request[8:20] == txid
    other = stun.encode_binding_success(new_txid(), ("192.0.2.2", 2))
    assert tx.receive(other, 10.1) is None and not tx.done
    ok = stun.binding_response(tx.request, ("192.0.2.3", 3))
    assert ok is not None
    assert tx.receive(ok, 10.25) == ("192.0.2.3", 3)
    assert tx.done and tx.rtt == pytest.approx(0.25)
    assert tx.on_timeout(100.0) is None and not tx.failed


def test_query_over_loopback() -> None:
    """A transaction driven over a real socket retransmits, skips noise, and gives up."""
    import socket
    import threading

    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.settimeout(5)

    def serve() -> None:
        data, src = srv.recvfrom(2048)  # drop the first send: the client must retransmit
        data, src = srv.recvfrom(2048)
        srv.sendto(b"noise", src)
        srv.sendto(stun.binding_response(data, src) or b"", src)

    t = threading.Thread(target=serve)
    t.start()
    cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cli.bind(("127.0.0.1", 0))
    try:
        addr, rtt = query(srv.getsockname(), sock=cli, rto=0.05)
        assert addr == cli.getsockname() and rtt > 0
    finally:
        t.join()
        cli.close()
        srv.close()
    with pytest.raises(stun.StunError, match="no STUN reply"):
        dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dead.bind(("127.0.0.1", 0))
        try:
            query(dead.getsockname(), rto=0.01, max_sends=2)
        finally:
            dead.close()


# ---- fuzzing ------------------------------------------------------------------------
addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535)),
    st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 65535)))


@given(st.binary(max_size=200))
def test_fuzz_parse_raises_only_stun_error(data: bytes) -> None:
    try:
        msg = stun.parse(data)
    except stun.StunError:
        assert stun.binding_response(data, ("192.0.2.1", 1)) is None
        return
    assert stun.is_stun(data)
    for prop in ("xor_mapped_address", "mapped_address", "error"):
        with contextlib.suppress(stun.StunError):
            getattr(msg, prop)
    assert stun.binding_response(data, ("192.0.2.1", 1)) is None or msg.msg_type == 1


@given(st.binary(min_size=4, max_size=120), st.integers(0, 0xFFFF))
def test_fuzz_cookie_framed_garbage(body: bytes, msg_type: int) -> None:
    """Garbage behind a valid header reaches the attribute parser, never past it."""
    body = body[: len(body) - len(body) % 4]
    data = struct.pack("!HHI", msg_type & 0x3FFF, len(body), stun.MAGIC_COOKIE) + bytes(12) + body
    assert stun.is_stun(data)
    with contextlib.suppress(stun.StunError):
        stun.parse(data)
    stun.binding_response(data, ("2001:db8::5", 9))


@given(addresses, st.booleans(), st.text(max_size=40))
def test_fuzz_round_trip(addr: tuple[str, int], fp: bool, software: str) -> None:
    txid = new_txid()
    data = stun.encode_binding_success(txid, addr, fingerprint=fp, software=software)
    msg = stun.parse(data)
    assert msg.has_fingerprint == fp
    want = stun._normalize(addr[0])
    assert msg.reflexive_address == (str(want), addr[1])
    assert msg.software == software
