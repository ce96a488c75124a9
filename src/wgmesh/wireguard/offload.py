"""GRO for a TUN device with ``IFF_VNET_HDR``: merge TCP segments before writing (sans-I/O).

:class:`Coalescer` merges consecutive in-order segments of one TCP flow, as Linux
GRO does, into one super-packet with a virtio-net header, so one TUN write (and
one trip through the kernel's TCP receive path) carries up to 64 KB. wireguard-go
does the same since 2023. The kernel completes the checksum (CHECKSUM_PARTIAL).

Checksums use the identity that the Internet checksum of a byte string is its
big-endian integer value modulo 0xFFFF, so the sum runs in C, not a Python loop.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable

__all__ = [
    "GSO_MAX_BYTES",
    "GSO_MAX_SEGMENTS",
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "GSO_UNSUPPORTED",
    "SOL_UDP",
    "UDP_GRO",
    "UDP_SEGMENT",
    "VNET_HDR",
    "VNET_HDR_LEN",
    "ZERO_HDR",
    "Coalescer",
    "checksum",
]

VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_off
VNET_HDR_LEN = VNET_HDR.size
F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6 = 0, 1, 4
PROTO_TCP = 6
MAX_IP_LEN = 65535
_FIN, _SYN, _RST, _PSH, _URG, _ECE, _CWR = 0x01, 0x02, 0x04, 0x08, 0x20, 0x40, 0x80
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
ZERO_HDR = bytes(VNET_HDR_LEN)  # GSO_NONE, checksum already complete
# UDP segmentation offload (Linux >= 4.18): one sendmsg carries up to 64 datagrams of one
# size (the last may be shorter); UDP_GRO is its receive side.
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
#: A GSO send failing with one of these means this kernel or device has no UDP GSO:
#: fall back to one datagram per send for good.
GSO_UNSUPPORTED = frozenset({errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP})


def _sum(data: bytes | bytearray | memoryview) -> int:
    """Ones'-complement sum of ``data`` as 16-bit words, modulo 0xFFFF."""
    v = int.from_bytes(data, "big")
    if len(data) & 1:
        v <<= 8
    return v % 0xFFFF


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum (never 0, so it is valid for UDP too)."""
    return 0xFFFF - ((initial + _sum(data)) % 0xFFFF)


def _pseudo(pkt: bytes | bytearray | memoryview, v6: bool, tcp_len: int) -> int:
    if v6:
        return (_sum(pkt[8:40]) + PROTO_TCP + tcp_len) % 0xFFFF
    return (_sum(pkt[12:20]) + PROTO_TCP + tcp_len) % 0xFFFF


# What a segment must share with the held one to join it, as Linux GRO checks: IPv4
# version/IHL/TOS, the DF/fragment word, TTL, protocol and addresses; IPv6 version/class/
# flow label, next header, hop limit and addresses; then TCP ports, ack, data offset,
# window and urgent pointer. Lengths, IDs, sequence numbers, flags and checksums differ
# per segment and are left out (flags and options are compared apart). One C-level
# unpack per segment: building the key from slices cost more than the decryption.
_KEY4 = struct.Struct("!H4xHBB2x8s" "I4xIB1xH2xH")
_KEY6 = struct.Struct("!I2xBB32s" "I4xIB1xH2xH")


class Coalescer:
    """Merges in-order TCP segments of one flow, as GRO does, before a TUN write.

    Feed decrypted IP packets to :meth:`add`; complete packets (each with its
    virtio-net header) go to ``write(buffer)``. Call :meth:`flush` at the end of a
    batch: nothing is ever held across batches, so no timer is needed.
    """

    def __init__(self, write: Callable[[memoryview], object]) -> None:
        self._write = write
        self._buf = bytearray(VNET_HDR_LEN + MAX_IP_LEN)
        self._mv = memoryview(self._buf)
        self._len = 0  # IP bytes held after the header; 0 = nothing held
        self._key: tuple[int | bytes, ...] = ()
        self._h = self._ihl = self._seg = self._segs = self._flags = 0
        self._v6 = False
        self._next_seq = 0
        self._closed = False

    def add(self, pkt: memoryview, n: int) -> None:
        b0 = pkt[0] if n else 0
        # IPv4 with options or any fragment (MF or an offset) is never merged.
        if b0 == 0x45 and n >= 40 and pkt[9] == PROTO_TCP and not (pkt[6] & 0x3F or pkt[7]):
            v6, ihl, key = False, 20, _KEY4.unpack_from(pkt)
        elif b0 >> 4 == 6 and n >= 60 and pkt[6] == PROTO_TCP:
            v6, ihl, key = True, 40, _KEY6.unpack_from(pkt)
        else:
            self.flush()
            self._emit_plain(pkt, n)
            return
        h = ihl + (pkt[ihl + 12] >> 4) * 4
        if not ihl + 20 <= h <= n:
            self.flush()
            self._emit_plain(pkt, n)
            return
        flags = pkt[ihl + 13]
        payload = n - h
        (seq,) = _U32.unpack_from(pkt, ihl + 4)
        if (self._len and not self._closed and key == self._key and h == self._h
                and flags & ~_PSH == self._flags and 0 < payload <= self._seg
                and seq == self._next_seq and self._len + payload <= MAX_IP_LEN
                and (h == ihl + 20 or pkt[ihl + 20:h] ==
                     self._mv[VNET_HDR_LEN + ihl + 20:VNET_HDR_LEN + h])):
            end = VNET_HDR_LEN + self._len
            self._buf[end:end + payload] = pkt[h:n]
            self._len += payload
            self._segs += 1
            self._next_seq = (seq + payload) & 0xFFFFFFFF
            if flags & _PSH:
                self._buf[VNET_HDR_LEN + ihl + 13] |= _PSH  # as GRO carries PSH over
                self._closed = True
            elif payload < self._seg:
                self._closed = True
            return
        self.flush()
        if payload == 0 or flags & (_SYN | _FIN | _RST | _URG | _CWR | _ECE):
            self._emit_plain(pkt, n)
            return
        self._buf[VNET_HDR_LEN:VNET_HDR_LEN + n] = pkt[:n]
        self._len, self._h, self._ihl, self._v6 = n, h, ihl, v6
        self._seg, self._segs, self._closed = payload, 1, bool(flags & _PSH)
        self._key, self._flags = key, flags & ~_PSH
        self._next_seq = (seq + payload) & 0xFFFFFFFF

    def _emit_plain(self, pkt: memoryview, n: int) -> None:
        self._buf[:VNET_HDR_LEN] = ZERO_HDR
        self._buf[VNET_HDR_LEN:VNET_HDR_LEN + n] = pkt[:n]
        self._write(self._mv[:VNET_HDR_LEN + n])

    def flush(self) -> None:
        if not self._len:
            return
        b, ihl, total = self._buf, self._ihl, self._len
        ip = VNET_HDR_LEN
        if self._segs == 1:
            VNET_HDR.pack_into(b, 0, 0, GSO_NONE, 0, 0, 0, 0)  # untouched: checksums valid
        else:
            if self._v6:
                _U16.pack_into(b, ip + 4, total - 40)
            else:
                _U16.pack_into(b, ip + 2, total)
                _U16.pack_into(b, ip + 10, 0)
                _U16.pack_into(b, ip + 10, checksum(self._mv[ip:ip + ihl]))
            # CHECKSUM_PARTIAL: the field holds the pseudo-header sum, the kernel the rest.
            _U16.pack_into(b, ip + ihl + 16, _pseudo(self._mv[ip:], self._v6, total - ihl))
            VNET_HDR.pack_into(b, 0, F_NEEDS_CSUM, GSO_TCPV6 if self._v6 else GSO_TCPV4,
                               self._h, self._seg, ihl, 16)
        self._write(self._mv[:ip + total])
        self._len = 0
