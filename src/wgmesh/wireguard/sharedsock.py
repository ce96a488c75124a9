"""STUN and disco from the kernel WireGuard's own UDP port.

The kernel owns the WireGuard port, yet STUN and hole-punching probes must
leave from that very port: a NAT maps each (source ip, source port) on its own,
so probes from any other port would measure, and open, a mapping WireGuard
never uses. wgmesh therefore sends those datagrams through raw sockets, with a
UDP header it builds itself carrying the WireGuard port as source.

Replies arrive at the same port. A raw socket gets a *copy* of every incoming
UDP packet of its family and never takes one away from the kernel's UDP
socket, so WireGuard keeps receiving everything. A classic BPF program
(``SO_ATTACH_FILTER``) runs in the kernel before a copy is queued and admits
only packets to the WireGuard port whose payload is STUN (the magic cookie at
offset 4) or disco (its magic prefix), so Python is never woken for tunnel
traffic. The program is generated from :data:`SIGNATURES`, which come from
:mod:`wgmesh.stun` and :mod:`wgmesh.disco`, so it follows those constants.

Sans-I/O parts (tested on any host): :func:`udp_datagram`, :func:`bpf_program`,
:func:`parse_ipv4`. :class:`SharedSocket` is the thin driver:
``send(data, dst)``, ``recv(timeout)``, iteration, or ``add_reader(loop, cb)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import selectors
import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from wgmesh.disco import MAGIC as DISCO_MAGIC
from wgmesh.errors import WgmeshError
from wgmesh.libc import LIBC, errno_error
from wgmesh.stun import MAGIC_COOKIE
from wgmesh.wireguard.netns import socket_in

if TYPE_CHECKING:
    from wgmesh.wireguard.kernel import KernelBackend

__all__ = [
    "SIGNATURES",
    "Address",
    "SharedSocket",
    "SharedSocketError",
    "bpf_program",
    "parse_ipv4",
    "udp_checksum",
    "udp_datagram",
]

Address = tuple[str, int]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: (payload offset, bytes) a datagram must carry to be handed to wgmesh.
SIGNATURES: tuple[tuple[int, bytes], ...] = (
    (4, MAGIC_COOKIE.to_bytes(4, "big")),  # STUN (RFC 8489 section 5)
    (0, DISCO_MAGIC),                       # wgmesh disco
)

SO_ATTACH_FILTER = 26
IP_PKTINFO = 8
UDP_HEADER = 8


class SharedSocketError(WgmeshError):
    """The shared-port sockets cannot be opened or used (no root, no such family...)."""


# ---- sans-I/O: packets ---------------------------------------------------------------
def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def udp_checksum(src: IPAddress, dst: IPAddress, segment: bytes) -> int:
    """RFC 768 / RFC 8200 section 8.1 checksum over the pseudo-header and ``segment``
    (UDP header with a zero checksum field, plus payload). Never 0: 0 means "none"."""
    if src.version == 4:
        pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, socket.IPPROTO_UDP,
                                                       len(segment))
    else:
        pseudo = src.packed + dst.packed + struct.pack("!I3xB", len(segment), socket.IPPROTO_UDP)
    csum = ~_fold(_sum16(pseudo) + _sum16(segment)) & 0xFFFF
    return csum or 0xFFFF


def udp_datagram(src: IPAddress, sport: int, dst: IPAddress, dport: int, payload: bytes) -> bytes:
    """A UDP header and ``payload``, checksummed for the ``src`` -> ``dst`` pseudo-header."""
    length = UDP_HEADER + len(payload)
    if length > 0xFFFF:
        raise SharedSocketError(f"datagram too large ({len(payload)} bytes)")
    bare = struct.pack("!HHHH", sport, dport, length, 0) + payload
    return bare[:6] + struct.pack("!H", udp_checksum(src, dst, bare)) + bare[8:]


def _parse_udp(segment: bytes, port: int) -> tuple[int, bytes] | None:
    if len(segment) < UDP_HEADER:
        return None
    sport, dport, length, _ = struct.unpack_from("!HHHH", segment)
    if dport != port or not UDP_HEADER <= length <= len(segment):
        return None
    return sport, segment[UDP_HEADER:length]


def parse_ipv4(packet: bytes, port: int) -> tuple[bytes, Address] | None:
    """``(payload, (src ip, src port))`` of an IPv4 packet as a raw socket returns it,
    or ``None`` if it is malformed, a fragment, or not UDP to ``port``."""
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != socket.IPPROTO_UDP:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if ihl < 20 or struct.unpack_from("!H", packet, 6)[0] & 0x3FFF:
        return None
    got = _parse_udp(packet[ihl:], port)
    if got is None:
        return None
    sport, payload = got
    return payload, (socket.inet_ntop(socket.AF_INET, packet[12:16]), sport)


# ---- sans-I/O: the classic BPF program ------------------------------------------------
BPF_LD, BPF_LDX, BPF_JMP, BPF_RET = 0x00, 0x01, 0x05, 0x06
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_ABS, BPF_IND, BPF_MSH, BPF_K = 0x20, 0x40, 0xA0, 0x00
BPF_JEQ, BPF_JSET = 0x10, 0x40
_SIZE = {4: BPF_W, 2: BPF_H, 1: BPF_B}

Insn = tuple[int, int, int, int]  # code, jt, jf, k


def bpf_program(port: int, family: int, signatures: Sequence[tuple[int, bytes]] = SIGNATURES
                ) -> list[Insn]:
    """A socket filter admitting UDP datagrams to ``port`` that carry any signature.

    For ``AF_INET`` the raw socket's packet starts at the IP header (non-first
    fragments are refused, the header length comes from IHL); for ``AF_INET6``
    it starts at the UDP header. Accepted packets are kept whole.

    A load past the end of the packet makes the kernel drop it on the spot, so
    signatures are tested shortest-reach first: a packet too short for one is too
    short for every later one as well.
    """
    signatures = sorted(signatures, key=lambda s: s[0] + len(s[1]))
    # Assemble with symbolic jump targets, then resolve them to relative offsets.
    code: list[tuple[int, str | int, str | int, int]] = []
    labels: dict[str, int] = {}
    ind = family == socket.AF_INET
    mode = BPF_IND if ind else BPF_ABS

    def load(offset: int, size: int) -> None:
        code.append((BPF_LD | _SIZE[size] | mode, 0, 0, offset))

    if ind:
        code.append((BPF_LD | BPF_H | BPF_ABS, 0, 0, 6))            # flags + fragment offset
        code.append((BPF_JMP | BPF_JSET | BPF_K, "drop", 0, 0x1FFF))
        code.append((BPF_LDX | BPF_B | BPF_MSH, 0, 0, 0))           # X = IHL * 4
    load(2, 2)                                                       # UDP destination port
    code.append((BPF_JMP | BPF_JEQ | BPF_K, 0, "drop", port))
    for n, (offset, magic) in enumerate(signatures):
        miss = f"sig{n + 1}" if n + 1 < len(signatures) else "drop"
        labels[f"sig{n}"] = len(code)
        pos = 0
        while pos < len(magic):
            size = 4 if len(magic) - pos >= 4 else 2 if len(magic) - pos >= 2 else 1
            load(UDP_HEADER + offset + pos, size)
            value = int.from_bytes(magic[pos:pos + size], "big")
            pos += size
            code.append((BPF_JMP | BPF_JEQ | BPF_K, "accept" if pos == len(magic) else 0,
                         miss, value))
    labels["accept"] = len(code)
    code.append((BPF_RET | BPF_K, 0, 0, 0xFFFF))
    labels["drop"] = len(code)
    code.append((BPF_RET | BPF_K, 0, 0, 0))

    out: list[Insn] = []
    for i, (op, jt, jf, k) in enumerate(code):
        rel = [labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf)]
        assert all(0 <= r < 256 for r in rel), "jump out of range"
        out.append((op, rel[0], rel[1], k))
    return out


def _attach(sock: socket.socket, program: list[Insn]) -> None:
    raw = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(raw)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


_UNSPEC = (ctypes.c_ubyte * 28)()  # a zeroed sockaddr: family AF_UNSPEC


def _disconnect(sock: socket.socket) -> None:
    """``connect(AF_UNSPEC)``: dissolve a UDP socket's association and, as it was not
    bound to an address, the source address its last ``connect`` chose (Python's
    ``connect`` has no way to pass AF_UNSPEC)."""
    if LIBC.connect(sock.fileno(), ctypes.byref(_UNSPEC), ctypes.sizeof(_UNSPEC)) != 0:
        raise errno_error()


# ---- the driver ----------------------------------------------------------------------
class SharedSocket:
    """Send and receive STUN/disco on the kernel WireGuard port ``port``.

    ``netns`` is the namespace of the WireGuard interface; ``fwmark`` should be the
    interface's, so probes take the same routes as WireGuard's own packets.
    """

    def __init__(self, port: int, *, netns: str | None = None, fwmark: int = 0,
                 signatures: Sequence[tuple[int, bytes]] = SIGNATURES) -> None:
        if not 0 < port < 65536:
            raise SharedSocketError(f"not a UDP port: {port}")
        self.port = port
        self.sent = 0
        self.received = 0
        self.dropped = 0
        self._socks: dict[int, socket.socket] = {}
        self._probes: dict[int, socket.socket] = {}
        try:
            for family in (socket.AF_INET, socket.AF_INET6):
                try:
                    raw = socket_in(netns, family, socket.SOCK_RAW, socket.IPPROTO_UDP)
                except OSError as e:
                    if family == socket.AF_INET6 and self._socks:
                        continue  # no IPv6 in this namespace: IPv4 only
                    raise SharedSocketError(f"raw UDP socket: {e.strerror} (needs root/"
                                            "CAP_NET_RAW)") from None
                self._socks[family] = raw
                _attach(raw, bpf_program(port, family, signatures))
                raw.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    while True:  # anything queued before the filter was attached
                        raw.recv(65535)
                self._probes[family] = socket_in(netns, family, socket.SOCK_DGRAM)
                if fwmark:
                    for s in (raw, self._probes[family]):
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, fwmark)
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_backend(cls, backend: KernelBackend) -> SharedSocket:
        """The shared socket for a running kernel backend: its port, namespace, fwmark."""
        return cls(backend.listen_port, netns=backend.netns, fwmark=backend.info().fwmark)

    def __repr__(self) -> str:
        return (f"<SharedSocket port {self.port}: sent {self.sent}, received {self.received},"
                f" dropped {self.dropped}>")

    def __enter__(self) -> SharedSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for s in (*self._socks.values(), *self._probes.values()):
            s.close()
        self._socks.clear()
        self._probes.clear()

    # -- sending
    def _source_for(self, dst: IPAddress) -> IPAddress:
        """The source address the kernel would choose towards ``dst`` (a connected
        UDP socket asks the routing table; nothing is sent).

        Disconnected first: a UDP socket keeps the source its first ``connect`` chose,
        so after a roam every later ``connect`` would route from the gone address and
        fail (ENETUNREACH), and no STUN or disco would leave this port again."""
        probe = self._probes[socket.AF_INET if dst.version == 4 else socket.AF_INET6]
        _disconnect(probe)
        probe.connect((str(dst), 9))
        return ipaddress.ip_address(probe.getsockname()[0])

    def send(self, data: bytes, dst: Address) -> None:
        """Send ``data`` to ``dst`` with the WireGuard port as UDP source port."""
        ip = ipaddress.ip_address(dst[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        sock = self._socks.get(family)
        if sock is None:
            raise SharedSocketError(f"no IPv{ip.version} raw socket for {ip}")
        try:
            src = self._source_for(ip)
            segment = udp_datagram(src, self.port, ip, int(dst[1]), data)
            if family == socket.AF_INET:
                info = struct.pack("I4s4s", 0, src.packed, bytes(4))
                cmsg = [(socket.IPPROTO_IP, IP_PKTINFO, info)]
                sock.sendmsg([segment], cmsg, 0, (str(ip), 0))
            else:
                info = src.packed + struct.pack("I", 0)
                cmsg = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, info)]
                sock.sendmsg([segment], cmsg, 0, (str(ip), 0, 0, 0))
        except OSError as e:
            raise SharedSocketError(f"send to {ip}:{dst[1]}: {e.strerror}") from None
        self.sent += 1

    # -- receiving
    def _read(self, family: int) -> tuple[bytes, Address] | None:
        sock = self._socks[family]
        try:
            packet, addr = sock.recvfrom(65535)
        except (BlockingIOError, InterruptedError):
            return None
        if family == socket.AF_INET:
            got = parse_ipv4(packet, self.port)
        else:
            udp = _parse_udp(packet, self.port)
            got = None if udp is None else (udp[1], (addr[0], udp[0]))
        if got is None:
            self.dropped += 1
            return None
        self.received += 1
        return got

    def recv(self, timeout: float | None = None) -> tuple[bytes, Address] | None:
        """The next STUN/disco datagram as ``(data, (src ip, src port))``, or ``None``
        when ``timeout`` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._socks:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            # a selector, not select(): fds past 1023 are common in a busy agent
            with selectors.DefaultSelector() as sel:
                for sock in self._socks.values():
                    sel.register(sock, selectors.EVENT_READ)
                ready = {key.fileobj for key, _ in sel.select(left)}
            for family, sock in list(self._socks.items()):
                if sock in ready:
                    got = self._read(family)
                    if got is not None:
                        return got
            if deadline is not None and time.monotonic() >= deadline:
                return None
        return None

    def __iter__(self) -> Iterator[tuple[bytes, Address]]:
        """Datagrams as they come, until the socket is closed."""
        while self._socks:
            got = self.recv(timeout=0.5)
            if got is not None:
                yield got

    def add_reader(self, loop: asyncio.AbstractEventLoop,
                   callback: Callable[[bytes, Address], None]) -> None:
        """Deliver datagrams to ``callback(data, src)`` from ``loop``."""
        def readable(family: int) -> None:
            while (got := self._read(family)) is not None:
                callback(*got)
        for family, sock in self._socks.items():
            loop.add_reader(sock.fileno(), readable, family)

    def remove_reader(self, loop: asyncio.AbstractEventLoop) -> None:
        for sock in self._socks.values():
            loop.remove_reader(sock.fileno())
