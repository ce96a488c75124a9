"""STUN Binding (RFC 8489), sans-I/O: the codec, a responder and a client transaction.

Why its own codec: nodes learn their reflexive ``ip:port`` from the WireGuard
port (the mapping WireGuard itself uses), and every relay answers Binding on
UDP, so both sides need a small, strict, allocation-light parser that never
raises on hostile input except :class:`StunError`. Only the Binding method is
spoken; classic RFC 3489 messages (no magic cookie) are not STUN here.

Public API (stable; the NAT-traversal code builds on it):

* :func:`is_stun` - fast demux check for a datagram on a shared port. It can't
  mistake a WireGuard or disco packet for STUN (the length field must match).
* :func:`encode_binding_request`, :func:`encode_binding_success`,
  :func:`encode_binding_error`, and the generic :func:`encode`.
* :func:`parse` -> :class:`Message` (raises :class:`StunError`), and
  :func:`parse_binding_response` -> the reflexive address of a success reply.
* :func:`binding_response` - a whole server in one call: request bytes and the
  observed source address in, reply bytes (or ``None`` to stay silent) out.
* :class:`BindingTransaction` - one client query with RFC 8489 retransmission
  timing, driven by a clock: ``request``, ``next_deadline``, ``on_timeout``,
  ``receive``.

No I/O here: the caller passes the time (``now``) and the randomness
(transaction ids: :data:`TXID_LEN` unpredictable bytes, e.g. from :mod:`secrets`,
so replies can't be forged blind).

Addresses are ``(host, port)`` tuples with the host as text, IPv4 or IPv6;
IPv4-mapped IPv6 addresses (from dual-stack sockets) are reported as IPv4.
"""

from __future__ import annotations

import ipaddress
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from wgmesh.errors import WgmeshError

__all__ = [
    "ATTR_ERROR_CODE",
    "ATTR_FINGERPRINT",
    "ATTR_MAPPED_ADDRESS",
    "ATTR_SOFTWARE",
    "ATTR_UNKNOWN_ATTRIBUTES",
    "ATTR_XOR_MAPPED_ADDRESS",
    "BINDING_ERROR",
    "BINDING_INDICATION",
    "BINDING_REQUEST",
    "BINDING_SUCCESS",
    "DEFAULT_PORT",
    "HEADER_LEN",
    "MAGIC_COOKIE",
    "TXID_LEN",
    "Address",
    "BindingTransaction",
    "Message",
    "StunError",
    "binding_response",
    "encode",
    "encode_binding_error",
    "encode_binding_request",
    "encode_binding_success",
    "is_stun",
    "parse",
    "parse_binding_response",
]

Address = tuple[str, int]

DEFAULT_PORT = 3478
HEADER_LEN = 20
MAGIC_COOKIE = 0x2112A442
_COOKIE = MAGIC_COOKIE.to_bytes(4, "big")
_FINGERPRINT_XOR = 0x5354554E
TXID_LEN = 12

BINDING_REQUEST = 0x0001
BINDING_INDICATION = 0x0011
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_ERROR_CODE = 0x0009
ATTR_UNKNOWN_ATTRIBUTES = 0x000A
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028

# Comprehension-required attributes (< 0x8000) this responder understands; any other
# one in a request earns a 420 reply, as RFC 8489 section 6.3.1 requires.
_UNDERSTOOD = frozenset({ATTR_MAPPED_ADDRESS, ATTR_ERROR_CODE, ATTR_UNKNOWN_ATTRIBUTES,
                         ATTR_XOR_MAPPED_ADDRESS})
_FAMILY_V4, _FAMILY_V6 = 0x01, 0x02
MAX_SOFTWARE_LEN = 763  # RFC 8489 section 14.14: fewer than 128 characters, <= 763 bytes


class StunError(WgmeshError, ValueError):
    """The bytes are not a well-formed STUN message (or not the reply we wait for)."""


def is_stun(data: bytes) -> bool:
    """Cheap check that ``data`` is framed like an RFC 5389/8489 message.

    Top two bits zero, the magic cookie, and a length field that is a multiple
    of 4 and equals the rest of the datagram. WireGuard messages have zero
    bytes where STUN's length is, and are never 20 bytes long, so they fail.
    """
    return (len(data) >= HEADER_LEN and data[0] < 0x40 and data[4:8] == _COOKIE
            and (len(data) - HEADER_LEN) == ((data[2] << 8) | data[3])
            and data[3] & 3 == 0)


@dataclass(frozen=True, slots=True)
class Message:
    """A parsed STUN message. ``attributes`` keeps wire order, values unpadded."""

    msg_type: int
    txid: bytes
    attributes: tuple[tuple[int, bytes], ...] = ()

    def get(self, attr_type: int) -> bytes | None:
        """The first value of ``attr_type`` (RFC 8489: later duplicates are ignored)."""
        for t, v in self.attributes:
            if t == attr_type:
                return v
        return None

    @property
    def xor_mapped_address(self) -> Address | None:
        v = self.get(ATTR_XOR_MAPPED_ADDRESS)
        return None if v is None else _decode_address(v, self.txid, xor=True)

    @property
    def mapped_address(self) -> Address | None:
        v = self.get(ATTR_MAPPED_ADDRESS)
        return None if v is None else _decode_address(v, self.txid, xor=False)

    @property
    def reflexive_address(self) -> Address | None:
        """XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS (servers predating RFC 5389)."""
        return self.xor_mapped_address or self.mapped_address

    @property
    def software(self) -> str | None:
        v = self.get(ATTR_SOFTWARE)
        return None if v is None else v.decode("utf-8", "replace")

    @property
    def error(self) -> tuple[int, str] | None:
        """``(code, reason)`` of an ERROR-CODE attribute."""
        v = self.get(ATTR_ERROR_CODE)
        if v is None:
            return None
        if len(v) < 4:
            raise StunError("ERROR-CODE too short")
        return (v[2] & 0x7) * 100 + v[3], v[4:].decode("utf-8", "replace")

    @property
    def has_fingerprint(self) -> bool:
        return bool(self.attributes) and self.attributes[-1][0] == ATTR_FINGERPRINT


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


def encode(msg_type: int, txid: bytes, attributes: Iterable[tuple[int, bytes]] = (), *,
           fingerprint: bool = True) -> bytes:
    """Any STUN message; ``fingerprint`` appends FINGERPRINT (CRC-32, section 14.7)."""
    if len(txid) != TXID_LEN:
        raise StunError(f"transaction id must be {TXID_LEN} bytes")
    body = bytearray()
    for t, v in attributes:
        body += struct.pack("!HH", t, len(v)) + v + b"\x00" * _pad(len(v))
    length = len(body) + (8 if fingerprint else 0)
    if length > 0xFFFF:
        raise StunError("message too long")
    msg = bytearray(struct.pack("!HHI", msg_type, length, MAGIC_COOKIE) + txid) + body
    if fingerprint:
        crc = (zlib.crc32(msg) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF
        msg += struct.pack("!HHI", ATTR_FINGERPRINT, 4, crc)
    return bytes(msg)


def _software_attr(software: str | None) -> list[tuple[int, bytes]]:
    if software is None:
        return []
    raw = software.encode()
    if len(raw) > MAX_SOFTWARE_LEN:
        raise StunError("SOFTWARE too long")
    return [(ATTR_SOFTWARE, raw)]


def encode_binding_request(txid: bytes, *, software: str | None = None,
                           fingerprint: bool = True) -> bytes:
    """A Binding request for transaction ``txid`` (also ``data[8:20]``)."""
    return encode(BINDING_REQUEST, txid, _software_attr(software), fingerprint=fingerprint)


def _normalize(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _encode_address(addr: Address, txid: bytes, *, xor: bool) -> bytes:
    try:
        ip = _normalize(addr[0])
    except ValueError as e:
        raise StunError(f"not an IP address: {addr[0]!r}") from e
    port = addr[1]
    raw = ip.packed
    if xor:
        port ^= MAGIC_COOKIE >> 16
        mask = _COOKIE + (txid if ip.version == 6 else b"")
        raw = bytes(a ^ b for a, b in zip(raw, mask, strict=True))
    family = _FAMILY_V4 if ip.version == 4 else _FAMILY_V6
    return struct.pack("!BBH", 0, family, port) + raw


def _decode_address(v: bytes, txid: bytes, *, xor: bool) -> Address:
    if len(v) < 4:
        raise StunError("address attribute too short")
    family, port = v[1], (v[2] << 8) | v[3]
    raw = v[4:]
    if (family, len(raw)) not in ((_FAMILY_V4, 4), (_FAMILY_V6, 16)):
        raise StunError("bad address family or length")
    if xor:
        port ^= MAGIC_COOKIE >> 16
        mask = _COOKIE + (txid if family == _FAMILY_V6 else b"")
        raw = bytes(a ^ b for a, b in zip(raw, mask, strict=True))
    return str(ipaddress.ip_address(raw)), port


def encode_binding_success(txid: bytes, addr: Address, *, software: str | None = None,
                           fingerprint: bool = True, mapped_address: bool = True) -> bytes:
    """A Binding success reply telling the client ``addr``.

    XOR-MAPPED-ADDRESS always; MAPPED-ADDRESS too by default, for RFC 3489-era
    clients (the XOR form exists because some NATs rewrite addresses in payloads).
    """
    attrs = [(ATTR_XOR_MAPPED_ADDRESS, _encode_address(addr, txid, xor=True))]
    if mapped_address:
        attrs.append((ATTR_MAPPED_ADDRESS, _encode_address(addr, txid, xor=False)))
    return encode(BINDING_SUCCESS, txid, attrs + _software_attr(software),
                  fingerprint=fingerprint)


def encode_binding_error(txid: bytes, code: int, reason: str, *,
                         unknown: Iterable[int] = (), software: str | None = None) -> bytes:
    """A Binding error reply; ``unknown`` fills UNKNOWN-ATTRIBUTES (for code 420)."""
    if not 300 <= code <= 699:
        raise StunError("error code must be 300-699")
    attrs = [(ATTR_ERROR_CODE,
              struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode()[:763])]
    unknown = list(unknown)
    if unknown:
        attrs.append((ATTR_UNKNOWN_ATTRIBUTES, b"".join(struct.pack("!H", t) for t in unknown)))
    return encode(BINDING_ERROR, txid, attrs + _software_attr(software))


def parse(data: bytes) -> Message:
    """Parse and validate one message; raises :class:`StunError`, nothing else.

    Checks header, cookie, length, attribute bounds, that FINGERPRINT (if any)
    is last and correct, and that nothing follows it.
    """
    if not is_stun(data):
        raise StunError("not a STUN message")
    msg_type = (data[0] << 8) | data[1]
    txid = bytes(data[8:20])
    attrs: list[tuple[int, bytes]] = []
    off, end = HEADER_LEN, len(data)
    while off < end:
        if end - off < 4:
            raise StunError("truncated attribute header")
        t, n = struct.unpack_from("!HH", data, off)
        vstart = off + 4
        if vstart + n > end:
            raise StunError("attribute overruns message")
        value = bytes(data[vstart:vstart + n])
        if t == ATTR_FINGERPRINT:
            if n != 4 or vstart + 4 != end:
                raise StunError("FINGERPRINT must be the last attribute")
            want = (zlib.crc32(data[:off]) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF
            if int.from_bytes(value, "big") != want:
                raise StunError("FINGERPRINT mismatch")
        attrs.append((t, value))
        off = vstart + n + _pad(n)
    if off != end:
        raise StunError("attribute padding overruns message")
    return Message(msg_type, txid, tuple(attrs))


def parse_binding_response(data: bytes, txid: bytes | None = None) -> Address:
    """The reflexive address from a Binding success reply.

    With ``txid``, the reply must answer that transaction. An error reply raises
    :class:`StunError` carrying its code and reason.
    """
    msg = parse(data)
    if txid is not None and msg.txid != txid:
        raise StunError("reply to another transaction")
    if msg.msg_type == BINDING_ERROR:
        code, reason = msg.error or (0, "")
        raise StunError(f"STUN error {code}: {reason}")
    if msg.msg_type != BINDING_SUCCESS:
        raise StunError(f"not a Binding success reply (type {msg.msg_type:#06x})")
    addr = msg.reflexive_address
    if addr is None:
        raise StunError("reply carries no mapped address")
    return addr


def binding_response(request: bytes, observed_addr: Address, *,
                     software: str | None = None) -> bytes | None:
    """Answer a Binding request seen from ``observed_addr`` (the packet's source).

    ``None`` means "send nothing": the input is not a valid Binding request
    (indications, replies, garbage, bad FINGERPRINT). A request with unknown
    comprehension-required attributes gets a 420 error, per RFC 8489.
    """
    try:
        msg = parse(request)
    except StunError:
        return None
    if msg.msg_type != BINDING_REQUEST:
        return None
    unknown = sorted({t for t, _ in msg.attributes if t < 0x8000 and t not in _UNDERSTOOD})
    if unknown:
        return encode_binding_error(msg.txid, 420, "Unknown Attribute", unknown=unknown,
                                    software=software)
    try:
        return encode_binding_success(msg.txid, observed_addr, software=software)
    except (StunError, ValueError, OverflowError, struct.error):
        return None


class BindingTransaction:
    """One client Binding query with RFC 8489 section 6.2.1 retransmissions, sans-I/O.

    The driver sends :attr:`request` at ``now``, feeds every datagram from the
    server to :meth:`receive` until it returns an address, and at
    :attr:`next_deadline` calls :meth:`on_timeout`, which gives bytes to
    resend, or ``None`` once the transaction has failed (then :attr:`failed`).
    ``txid``: :data:`TXID_LEN` fresh random bytes. The defaults (RTO 500 ms doubling, 7 sends, last wait 16 x RTO) are the
    RFC's; netcheck-style probes pass a shorter ``rto``/``max_sends``.
    """

    def __init__(self, now: float, txid: bytes, *, rto: float = 0.5, max_sends: int = 7,
                 last_wait_factor: float = 16.0, software: str | None = None) -> None:
        self.txid = txid
        self.request = encode_binding_request(self.txid, software=software)
        self.sent_at = now
        self.result: Address | None = None
        self.failed = False
        self.rtt: float | None = None
        self._rto = rto
        self._sends = 1
        self._max_sends = max_sends
        self._last_wait = rto * last_wait_factor
        self.next_deadline: float | None = now + (self._last_wait if max_sends == 1 else rto)

    @property
    def done(self) -> bool:
        return self.result is not None or self.failed

    def receive(self, data: bytes, now: float | None = None) -> Address | None:
        """The reflexive address if ``data`` answers this query; ignores anything else.

        ``now`` (when given) records :attr:`rtt`, the time since the first send.
        """
        if self.done:
            return None
        try:
            addr = parse_binding_response(data, self.txid)
        except StunError:
            return None
        self.result = addr
        self.next_deadline = None
        self.rtt = None if now is None else now - self.sent_at
        return addr

    def on_timeout(self, now: float) -> bytes | None:
        """Bytes to resend now, or ``None``: not due yet, done, or given up (:attr:`failed`)."""
        if self.done or self.next_deadline is None or now < self.next_deadline:
            return None
        if self._sends >= self._max_sends:
            self.failed = True
            self.next_deadline = None
            return None
        self._sends += 1
        self._rto *= 2
        wait = self._last_wait if self._sends == self._max_sends else self._rto
        self.next_deadline = now + wait
        return self.request

