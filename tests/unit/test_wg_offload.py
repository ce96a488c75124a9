"""GRO-style coalescing of TCP segments for TUN writes, checked against reference sums."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from budget import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from wgmesh.wireguard.offload import (
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    VNET_HDR,
    VNET_HDR_LEN,
    Coalescer,
    checksum,
)

pytestmark = pytest.mark.unit


def ref_checksum(data: bytes) -> int:
    """RFC 1071, the slow way."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f">{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(min_size=1, max_size=300))
def test_checksum_matches_rfc1071(data: bytes) -> None:
    got, ref = checksum(data), ref_checksum(data)
    assert got == ref or {got, ref} == {0, 0xFFFF}  # the two zeros of ones' complement


def tcp_packet(v6: bool, payload: bytes, seq: int = 1000, flags: int = 0x18,
               src: str = "10.0.0.1", dst: str = "10.0.0.2", options: bytes = b"") -> bytes:
    thl = 20 + len(options)
    tcp = bytearray(struct.pack(">HHIIBBHHH", 40000, 5201, seq, 77, (thl // 4) << 4, flags,
                                 512, 0, 0)) + options + payload
    if v6:
        s, d = ipaddress.ip_address(src if ":" in src else "fd00::1").packed, \
            ipaddress.ip_address(dst if ":" in dst else "fd00::2").packed
        ip = bytearray(struct.pack(">IHBB", 0x60000000, len(tcp), 6, 64)) + s + d
        pseudo = s + d + struct.pack(">IxxxB", len(tcp), 6)
    else:
        s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
        ip = bytearray(struct.pack(">BBHHHBBH", 0x45, 0, 20 + len(tcp), 7, 0x4000, 64, 6, 0))
        ip += s + d
        struct.pack_into(">H", ip, 10, ref_checksum(bytes(ip)))
        pseudo = s + d + struct.pack(">xBH", 6, len(tcp))
    struct.pack_into(">H", tcp, 16, ref_checksum(pseudo + bytes(tcp)))
    return bytes(ip + tcp)


def ihl_of(v6: bool) -> int:
    return 40 if v6 else 20


def valid(pkt: bytes) -> bool:
    v6 = pkt[0] >> 4 == 6
    ihl = 40 if v6 else 20
    tcp = pkt[ihl:]
    if v6:
        pseudo = pkt[8:40] + struct.pack(">IxxxB", len(tcp), 6)
    else:
        if ref_checksum(pkt[:20]) != 0 or struct.unpack_from(">H", pkt, 2)[0] != len(pkt):
            return False
        pseudo = pkt[12:20] + struct.pack(">xBH", 6, len(tcp))
    return ref_checksum(pseudo + tcp) == 0


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_coalesce_in_order_segments(v6: bool) -> None:
    seg = 1368
    ts = b"\x01\x01\x08\x0a" + bytes(8)  # NOP NOP timestamp, as Linux sends
    payload = bytes(range(256)) * 40 + b"tail"  # 10244 bytes: 7 full segments + 1 short
    chunks = [payload[i:i + seg] for i in range(0, len(payload), seg)]
    segs = [tcp_packet(v6, c, seq=1000 + i * seg, flags=0x10, options=ts)
            for i, c in enumerate(chunks[:-1])]
    segs.append(tcp_packet(v6, chunks[-1], seq=1000 + 7 * seg, flags=0x19, options=ts))  # FIN
    assert all(valid(s) for s in segs)
    written: list[bytes] = []
    c = Coalescer(lambda mv: written.append(bytes(mv)))
    for s in segs:
        c.add(memoryview(s), len(s))
    c.flush()
    assert len(written) == 2  # GRO does not merge a FIN, nor do we
    c.add(memoryview(segs[0]), len(segs[0]))
    psh = tcp_packet(v6, chunks[1], seq=1000 + seg, flags=0x18, options=ts)
    c.add(memoryview(psh), len(psh))
    c.add(memoryview(segs[2]), len(segs[2]))  # PSH ended the merge
    c.flush()
    assert len(written) == 4 and written[2][VNET_HDR_LEN + ihl_of(v6) + 13] == 0x18
    del written[2:]
    ihl = 40 if v6 else 20
    hl = ihl + 32
    flags, gso_type, hdr_len, gso_size, cstart, coff = VNET_HDR.unpack_from(written[0])
    assert (flags, gso_type, hdr_len, gso_size, cstart, coff) == \
        (1, GSO_TCPV6 if v6 else GSO_TCPV4, hl, seg, ihl, 16)
    merged = bytearray(written[0][VNET_HDR_LEN:])
    assert merged[hl:] == payload[:7 * seg]
    assert merged[ihl + 4:ihl + 16] == segs[0][ihl + 4:ihl + 16]  # seq, ack, flags of the first
    # What the kernel does with CHECKSUM_PARTIAL: sum from csum_start over the field's
    # pseudo-header sum and the data, and store the complement there.
    struct.pack_into(">H", merged, ihl + 16, checksum(merged[ihl:]))
    assert valid(bytes(merged))
    assert VNET_HDR.unpack_from(written[1])[1] == GSO_NONE and written[1][10:] == segs[-1]


def test_coalescer_keeps_flows_and_gaps_apart() -> None:
    written: list[bytes] = []
    c = Coalescer(lambda mv: written.append(bytes(mv)))
    a1 = tcp_packet(False, b"x" * 100, seq=1000, flags=0x10)
    a2 = tcp_packet(False, b"y" * 100, seq=1100, flags=0x10)
    gap = tcp_packet(False, b"z" * 100, seq=1300, flags=0x10)
    other = tcp_packet(False, b"o" * 100, seq=1400, flags=0x10, src="10.0.0.9")
    udp = bytearray(a1)
    udp[9] = 17
    frag1, frag2 = bytearray(a1), bytearray(a2)  # "more fragments" set: never merged
    frag1[6] |= 0x20
    frag2[6] |= 0x20
    for p in (a1, a2, gap, other, bytes(udp), bytes(frag1), bytes(frag2)):
        c.add(memoryview(p), len(p))
    c.flush()
    kinds = [VNET_HDR.unpack_from(w)[1] for w in written]
    assert kinds == [GSO_TCPV4] + [GSO_NONE] * 5
    assert [w[10:] for w in written[1:]] == [gap, other, bytes(udp), bytes(frag1), bytes(frag2)]


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=200))
def test_coalescer_never_raises_on_garbage(data: bytes) -> None:
    c = Coalescer(lambda mv: None)
    c.add(memoryview(data), len(data))
    c.flush()


# (what differs in the second segment, IPv6?, byte offset from the IP header, new value):
# each is a field Linux GRO requires to match, so the two segments must stay apart.
_MISMATCHES = [("ttl", False, 8, 63), ("tos", False, 1, 4), ("dst address", False, 19, 9),
               ("ack", False, 20 + 11, 78), ("window", False, 20 + 15, 1),
               ("ECE flag", False, 20 + 13, 0x50), ("timestamp option", False, 20 + 27, 9),
               ("hop limit", True, 7, 63), ("flow label", True, 3, 5),
               ("ack", True, 40 + 11, 78), ("timestamp option", True, 40 + 27, 9)]


@pytest.mark.parametrize(("field", "v6", "offset", "value"), _MISMATCHES,
                         ids=[f"{'v6' if m[1] else 'v4'}-{m[0]}" for m in _MISMATCHES])
def test_coalescer_merges_only_matching_headers(field: str, v6: bool, offset: int,
                                                value: int) -> None:
    ts = b"\x01\x01\x08\x0a" + bytes(8)
    first = tcp_packet(v6, b"a" * 100, seq=1000, flags=0x10, options=ts)
    second = bytearray(tcp_packet(v6, b"b" * 100, seq=1100, flags=0x10, options=ts))
    written: list[bytes] = []
    c = Coalescer(lambda mv: written.append(bytes(mv)))
    for p in (first, bytes(second)):
        c.add(memoryview(p), len(p))
    c.flush()
    assert len(written) == 1, "identical headers and consecutive sequence numbers merge"
    second[offset] = value
    written.clear()
    for p in (first, bytes(second)):
        c.add(memoryview(p), len(p))
    c.flush()
    assert [w[VNET_HDR_LEN:] for w in written] == [first, bytes(second)], field
