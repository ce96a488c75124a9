"""Host-side unit tests of sharedsock's pure parts: UDP checksums (checked against
the kernel's own UDP stack on loopback), the BPF program (run by a small classic-BPF
interpreter here, fuzzed against the predicate it must implement), IPv4 parsing."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wgmesh import stun
from wgmesh.disco import MAGIC as DISCO_MAGIC
from wgmesh.wireguard.sharedsock import (
    SIGNATURES,
    bpf_program,
    parse_ipv4,
    udp_datagram,
)

pytestmark = pytest.mark.unit

V4A, V4B = ipaddress.ip_address("198.51.100.10"), ipaddress.ip_address("203.0.113.7")
V6A, V6B = ipaddress.ip_address("2001:db8:203::a"), ipaddress.ip_address("2001:db8::1")


def run_bpf(program: list[tuple[int, int, int, int]], pkt: bytes) -> int:
    """Interpret the subset of classic BPF that bpf_program emits (as the kernel would:
    an out-of-bounds load rejects the packet)."""
    a = x = pc = 0
    while True:
        op, jt, jf, k = program[pc]
        pc += 1
        cls, size, mode = op & 0x07, op & 0x18, op & 0xE0
        if cls == 0x06:
            return k
        if cls == 0x01:  # ldxb 4*([k]&0xf)
            assert (size, mode) == (0x10, 0xA0)
            if k >= len(pkt):
                return 0
            x = (pkt[k] & 0x0F) * 4
        elif cls == 0x00:
            off = k + (x if mode == 0x40 else 0)
            n = {0x00: 4, 0x08: 2, 0x10: 1}[size]
            if off + n > len(pkt):
                return 0
            a = int.from_bytes(pkt[off:off + n], "big")
        elif cls == 0x05:
            hit = (a == k) if op & 0xF0 == 0x10 else bool(a & k)
            pc += jt if hit else jf
        else:
            raise AssertionError(f"unexpected opcode {op:#x}")


def ipv4(src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, segment: bytes,
         frag: int = 0, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(segment), 1, frag, 64,
                      17, 0, src.packed, dst.packed) + options
    return hdr + segment


def wanted(payload: bytes) -> bool:
    return any(payload[off:off + len(m)] == m for off, m in SIGNATURES)


stun_req = stun.encode_binding_request(bytes(range(stun.TXID_LEN)))
payloads = st.one_of(
    st.binary(max_size=64),
    st.just(stun_req),
    st.binary(min_size=40, max_size=80).map(lambda b: DISCO_MAGIC + b),
    st.binary(min_size=1, max_size=6).map(lambda b: DISCO_MAGIC[:len(b)] + b),  # near misses
    st.binary(min_size=4, max_size=4).map(lambda b: b + stun_req[4:8] + b"x" * 12),
)


@given(payloads, st.sampled_from([51820, 41641, 3478]), st.sampled_from([0, 0x2000, 0x0001]),
       st.sampled_from([b"", b"\x01\x01\x01\x00"]))
def test_ipv4_filter_matches_predicate(payload: bytes, dport: int, frag: int,
                                       options: bytes) -> None:
    prog = bpf_program(51820, socket.AF_INET)
    pkt = ipv4(V4B, V4A, udp_datagram(V4B, 3478, V4A, dport, payload), frag, options)
    expect = dport == 51820 and wanted(payload) and not frag & 0x1FFF
    assert (run_bpf(prog, pkt) == 0xFFFF) == expect
    if expect and not frag:
        assert parse_ipv4(pkt, 51820) == (payload, (str(V4B), 3478))


@given(payloads, st.sampled_from([51820, 41641]))
def test_ipv6_filter_matches_predicate(payload: bytes, dport: int) -> None:
    prog = bpf_program(51820, socket.AF_INET6)
    seg = udp_datagram(V6B, 3478, V6A, dport, payload)
    assert (run_bpf(prog, seg) == 0xFFFF) == (dport == 51820 and wanted(payload))


def test_wireguard_messages_are_not_admitted() -> None:
    prog = bpf_program(51820, socket.AF_INET)
    for wg in (b"\x01\x00\x00\x00" + bytes(144), b"\x02\x00\x00\x00" + bytes(88),
               b"\x04\x00\x00\x00" + bytes(32)):
        assert run_bpf(prog, ipv4(V4B, V4A, udp_datagram(V4B, 1, V4A, 51820, wg))) == 0


@given(st.binary(max_size=300))
def test_parse_ipv4_never_raises(data: bytes) -> None:
    parse_ipv4(data, 51820)


@pytest.mark.parametrize("src,dst", [(V4A, V4B), (V6A, V6B)])
def test_checksummed_segment_verifies(src: ipaddress._BaseAddress, dst: ipaddress._BaseAddress
                                      ) -> None:
    # RFC 1071: with the checksum in place, pseudo-header + segment sum to 0xFFFF, which is
    # how the receiver verifies (the netns test also has the kernel's UDP stack accept it).
    for payload in (b"", b"a", b"hello wireguard", bytes(range(256)) * 3):
        seg = udp_datagram(src, 51820, dst, 3478, payload)  # type: ignore[arg-type]
        if src.version == 4:
            pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, 17, len(seg))
        else:
            pseudo = src.packed + dst.packed + struct.pack("!I3xB", len(seg), 17)
        data = pseudo + seg + b"\0" * (len(seg) % 2)
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        assert total == 0xFFFF
