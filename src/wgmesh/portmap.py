"""Port mapping with PCP (RFC 6887) and NAT-PMP (RFC 6886), sans-I/O: codecs and client machines.

Why: behind an endpoint-dependent ("symmetric") NAT no amount of STUN gives a
peer a usable address, but most home routers will open a port on request. The
node asks the gateway (UDP 5351) to map its WireGuard port and publishes the
result as a ``portmap`` endpoint. The gateway is untrusted input: every reply
is checked against the request it claims to answer (PCP's 96-bit nonce, the
opcode, protocol and internal port), a lease of 0 is never a mapping, and the
external address must be one a peer could reach. Nothing here opens a socket
or reads a clock: bytes and ``now`` come in, bytes and typed outcomes go out.

Layers:

* Codecs: :func:`encode_pcp_map`, :func:`encode_pcp_announce`, :func:`decode_pcp`;
  :func:`encode_natpmp_address`, :func:`encode_natpmp_map`, :func:`decode_natpmp`.
  Decoders raise only :class:`PortmapError`.
* :class:`PcpMap` and :class:`NatPmpMap`: one request with retransmissions,
  ending in a :class:`Mapping`, :class:`Deleted` or :class:`Failure`.
* :class:`Epoch`: a gateway's epoch counter; says when the gateway lost its state.
* :class:`Lease`: the life of one mapping: map, renew at half the lease,
  re-map after a gateway reset or an external-address change, delete on demand,
  and report :class:`Mapped`, :class:`Failed` or :class:`Removed` events.

Which protocol to try next (PCP, then NAT-PMP, then UPnP-IGD) is the driver's
choice; a :class:`Failed` event says why this one did not work.
"""

from __future__ import annotations

import abc
import ipaddress
import struct
from typing import Literal

import attrs

from wgmesh.errors import WgmeshError

__all__ = [
    "ANNOUNCE_GROUP_V4",
    "ANNOUNCE_GROUP_V6",
    "ANNOUNCE_PORT",
    "DEFAULT_LIFETIME",
    "NATPMP_RESULTS",
    "NATPMP_VERSION",
    "NONCE_LEN",
    "OP_ANNOUNCE",
    "OP_MAP",
    "PCP_MAX_LEN",
    "PCP_RESULTS",
    "PCP_VERSION",
    "SERVER_PORT",
    "TCP",
    "UDP",
    "Address",
    "Deleted",
    "Epoch",
    "Failed",
    "Failure",
    "Lease",
    "Mapped",
    "Mapping",
    "Method",
    "NatPmpMap",
    "NatPmpResponse",
    "PcpMap",
    "PcpResponse",
    "PortmapError",
    "Removed",
    "decode_natpmp",
    "decode_pcp",
    "encode_natpmp_address",
    "encode_natpmp_map",
    "encode_pcp_announce",
    "encode_pcp_map",
    "unreachable",
]

Address = tuple[str, int]
Method = Literal["pcp", "natpmp", "upnp"]

SERVER_PORT = 5351  # both protocols, on the gateway
ANNOUNCE_PORT = 5350  # clients listen here for the gateway's multicast announcements
ANNOUNCE_GROUP_V4 = "224.0.0.1"
ANNOUNCE_GROUP_V6 = "ff02::1"
DEFAULT_LIFETIME = 7200  # seconds; RFC 6886 section 3.3 recommends two hours
UDP, TCP = 17, 6

PCP_VERSION = 2
PCP_MAX_LEN = 1100  # RFC 6887 section 7: longer messages are invalid
OP_ANNOUNCE, OP_MAP = 0, 1
NONCE_LEN = 12
_PCP_HEADER = 24
_PCP_MAP_LEN = _PCP_HEADER + 36
_R_BIT = 0x80

NATPMP_VERSION = 0
_NATPMP_OP_ADDRESS = 0
_NATPMP_OPS = {UDP: 1, TCP: 2}
_NATPMP_ERROR_MIN = 8  # version, op, result, epoch: RFC 6886 section 3.5
_NATPMP_ADDRESS_LEN = 12
_NATPMP_MAP_LEN = 16

PCP_RESULTS = {
    0: "SUCCESS", 1: "UNSUPP_VERSION", 2: "NOT_AUTHORIZED", 3: "MALFORMED_REQUEST",
    4: "UNSUPP_OPCODE", 5: "UNSUPP_OPTION", 6: "MALFORMED_OPTION", 7: "NETWORK_FAILURE",
    8: "NO_RESOURCES", 9: "UNSUPP_PROTOCOL", 10: "USER_EX_QUOTA",
    11: "CANNOT_PROVIDE_EXTERNAL", 12: "ADDRESS_MISMATCH", 13: "EXCESSIVE_REMOTE_PEERS",
}
NATPMP_RESULTS = {
    0: "SUCCESS", 1: "UNSUPPORTED_VERSION", 2: "NOT_AUTHORIZED", 3: "NETWORK_FAILURE",
    4: "OUT_OF_RESOURCES", 5: "UNSUPPORTED_OPCODE",
}
_UNSUPP_VERSION = 1  # the same code in both protocols, which is how PCP finds NAT-PMP


class PortmapError(WgmeshError, ValueError):
    """Bytes that are not a well-formed reply, or not the reply to our request."""


# ---------------------------------------------------------------- addresses


_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


def _ip16(ip: str) -> bytes:
    """PCP's 128-bit address field: IPv6 as is, IPv4 as ``::ffff:a.b.c.d`` (RFC 6887 s5)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise PortmapError(f"not an IP address: {ip!r}") from None
    return _V4_MAPPED + addr.packed if addr.version == 4 else addr.packed


def _ip_text(raw: bytes) -> str:
    addr = ipaddress.IPv6Address(raw)
    return str(addr.ipv4_mapped or addr)


def unreachable(ip: str) -> str | None:
    """Why no peer could reach ``ip``, or None. Private addresses pass: double NAT is real.

    Also the check for UPnP-IGD's external address, which has no codec here."""
    addr = ipaddress.ip_address(ip)
    for bad, what in ((addr.is_unspecified, "unspecified"), (addr.is_loopback, "loopback"),
                      (addr.is_multicast, "multicast"), (addr.is_link_local, "link-local"),
                      (addr.is_reserved, "reserved")):
        if bad:
            return f"external address {ip} is {what}"
    return None


def _port(value: int, what: str, *, zero: bool = False) -> int:
    if not (0 if zero else 1) <= value <= 0xFFFF:
        raise PortmapError(f"{what} {value} out of range")
    return value


def _lifetime(value: int) -> int:
    if not 0 <= value <= 0xFFFFFFFF:
        raise PortmapError(f"lifetime {value} out of range")
    return value


# ---------------------------------------------------------------------- PCP


@attrs.frozen
class PcpResponse:
    """A well-formed PCP response. MAP fields are None in a header-only error reply.

    ``version`` 0 marks a NAT-PMP gateway's "unsupported version" answer to PCP.
    """

    version: int
    opcode: int
    result: int
    lifetime: int
    epoch: int
    nonce: bytes | None = None
    protocol: int | None = None
    internal_port: int | None = None
    external: Address | None = None
    options: tuple[tuple[int, bytes], ...] = ()


def encode_pcp_map(nonce: bytes, client_ip: str, internal_port: int, lifetime: int, *,
                   protocol: int = UDP, suggested: Address | None = None) -> bytes:
    """A MAP request (RFC 6887 s11.1); ``lifetime`` 0 deletes the mapping.

    ``client_ip`` is the source address the gateway will see (it answers
    ADDRESS_MISMATCH otherwise). Without ``suggested`` the external address is
    the all-zeros one of the client's family, so the gateway picks.
    """
    if len(nonce) != NONCE_LEN:
        raise PortmapError(f"nonce must be {NONCE_LEN} bytes")
    if not 1 <= protocol <= 255:
        raise PortmapError(f"protocol {protocol} out of range")
    client = _ip16(client_ip)
    if suggested is None:
        suggested = ("0.0.0.0" if client.startswith(_V4_MAPPED) else "::", 0)
    header = struct.pack("!BBHI", PCP_VERSION, OP_MAP, 0, _lifetime(lifetime)) + client
    return header + nonce + struct.pack("!B3xHH", protocol, _port(internal_port, "internal port"),
                                        _port(suggested[1], "suggested port", zero=True)) + _ip16(
        suggested[0])


def encode_pcp_announce(client_ip: str) -> bytes:
    """An ANNOUNCE request (RFC 6887 s14.1): a cheap "is there a PCP server?" probe."""
    return struct.pack("!BBHI", PCP_VERSION, OP_ANNOUNCE, 0, 0) + _ip16(client_ip)


def _pcp_options(data: bytes, off: int) -> tuple[tuple[int, bytes], ...]:
    options = []
    while off < len(data):
        if len(data) - off < 4:
            raise PortmapError("truncated PCP option header")
        code, length = data[off], int.from_bytes(data[off + 2:off + 4], "big")
        end = off + 4 + length
        if end + (-length % 4) > len(data):
            raise PortmapError(f"PCP option {code} overruns the message")
        options.append((code, data[off + 4:end]))
        off = end + (-length % 4)
    return tuple(options)


def decode_pcp(data: bytes) -> PcpResponse:
    """Parse a PCP response (MAP or ANNOUNCE); :class:`PortmapError` if malformed.

    A NAT-PMP gateway answers PCP with its own "unsupported version" message;
    that is returned with ``version`` 0 so the caller can fall back.
    """
    if len(data) >= _NATPMP_ERROR_MIN and data[0] == NATPMP_VERSION:
        pmp = decode_natpmp(data)
        if pmp.result != _UNSUPP_VERSION:
            raise PortmapError("a NAT-PMP reply, not a PCP one")
        return PcpResponse(NATPMP_VERSION, pmp.opcode, pmp.result, 0, pmp.epoch)
    if len(data) < _PCP_HEADER:
        raise PortmapError(f"PCP reply too short ({len(data)} bytes)")
    if len(data) > PCP_MAX_LEN:
        raise PortmapError(f"PCP reply too long ({len(data)} bytes)")
    if len(data) % 4:
        raise PortmapError(f"PCP reply length {len(data)} is not a multiple of 4")
    version, op, result, lifetime, epoch = struct.unpack_from("!BBxBII", data)
    if not op & _R_BIT:
        raise PortmapError("a PCP request, not a response")
    op &= ~_R_BIT
    if version != PCP_VERSION:
        if result != _UNSUPP_VERSION:
            raise PortmapError(f"PCP version {version}")
        return PcpResponse(version, op, result, lifetime, epoch)
    if op == OP_ANNOUNCE:
        return PcpResponse(version, op, result, lifetime, epoch, options=_pcp_options(data, 24))
    if op != OP_MAP:
        raise PortmapError(f"PCP opcode {op} is not spoken here")
    if len(data) == _PCP_HEADER and result:
        return PcpResponse(version, op, result, lifetime, epoch)
    if len(data) < _PCP_MAP_LEN:
        raise PortmapError(f"PCP MAP reply too short ({len(data)} bytes)")
    protocol, internal, external_port = struct.unpack_from("!B3xHH", data, 36)
    return PcpResponse(version, op, result, lifetime, epoch, nonce=data[24:36],
                       protocol=protocol, internal_port=internal,
                       external=(_ip_text(data[44:60]), external_port),
                       options=_pcp_options(data, _PCP_MAP_LEN))


# ------------------------------------------------------------------ NAT-PMP


@attrs.frozen
class NatPmpResponse:
    """A well-formed NAT-PMP response; ``opcode`` without the response bit.

    ``internal_port`` is None only in a short error reply that does not echo it.
    """

    opcode: int
    result: int
    epoch: int
    external_ip: str | None = None
    internal_port: int | None = None
    external_port: int = 0
    lifetime: int = 0


def encode_natpmp_address() -> bytes:
    """The external-address request (RFC 6886 s3.2)."""
    return bytes((NATPMP_VERSION, _NATPMP_OP_ADDRESS))


def encode_natpmp_map(internal_port: int, lifetime: int, *, suggested_port: int = 0,
                      protocol: int = UDP) -> bytes:
    """A mapping request (RFC 6886 s3.3); ``lifetime`` 0 deletes (the suggestion must be 0)."""
    if protocol not in _NATPMP_OPS:
        raise PortmapError("NAT-PMP maps only UDP and TCP")
    if lifetime == 0:
        suggested_port = 0
    return struct.pack("!BBHHHI", NATPMP_VERSION, _NATPMP_OPS[protocol], 0,
                       _port(internal_port, "internal port"),
                       _port(suggested_port, "suggested port", zero=True), _lifetime(lifetime))


def decode_natpmp(data: bytes) -> NatPmpResponse:
    """Parse a NAT-PMP response; :class:`PortmapError` if malformed.

    Success replies have fixed sizes (12 bytes for the address, 16 for a
    mapping); error replies are at least the 8-byte common part and at most
    the 16 of a mapping reply (unsupported opcodes echo the request).
    """
    if len(data) < _NATPMP_ERROR_MIN:
        raise PortmapError(f"NAT-PMP reply too short ({len(data)} bytes)")
    if len(data) > _NATPMP_MAP_LEN:
        raise PortmapError(f"NAT-PMP reply too long ({len(data)} bytes)")
    version, op, result, epoch = struct.unpack_from("!BBHI", data)
    if version != NATPMP_VERSION:
        raise PortmapError(f"NAT-PMP version {version}")
    if not op & _R_BIT:
        raise PortmapError("a NAT-PMP request, not a response")
    op &= ~_R_BIT
    if result:
        internal = (int.from_bytes(data[8:10], "big")
                    if op in _NATPMP_OPS.values() and len(data) >= 10 else None)
        return NatPmpResponse(op, result, epoch, internal_port=internal)
    if op == _NATPMP_OP_ADDRESS:
        if len(data) != _NATPMP_ADDRESS_LEN:
            raise PortmapError(f"NAT-PMP address reply is {len(data)} bytes, not 12")
        return NatPmpResponse(op, result, epoch,
                              external_ip=str(ipaddress.IPv4Address(data[8:12])))
    if op not in _NATPMP_OPS.values():
        raise PortmapError(f"NAT-PMP opcode {op} is not spoken here")
    if len(data) != _NATPMP_MAP_LEN:
        raise PortmapError(f"NAT-PMP mapping reply is {len(data)} bytes, not 16")
    internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
    return NatPmpResponse(op, result, epoch, internal_port=internal, external_port=external,
                          lifetime=lifetime)


# ----------------------------------------------------------------- outcomes


@attrs.frozen
class Mapping:
    """A granted lease: peers reach ``internal_port`` at ``external`` for ``lifetime`` s."""

    method: Method
    internal_port: int
    external: Address
    lifetime: int
    epoch: int


@attrs.frozen
class Deleted:
    """The gateway confirmed that the mapping of ``internal_port`` is gone."""

    method: Method
    internal_port: int


@attrs.frozen
class Failure:
    """No mapping, and why. ``code`` is the gateway's result code, None when none came.

    ``retry_after`` is PCP's error lifetime: how long the gateway says the error holds.
    """

    method: Method
    reason: str
    code: int | None = None
    retry_after: int | None = None


Outcome = Mapping | Deleted | Failure


class _Transaction(abc.ABC):
    """One request, resent on a doubling timer until answered or given up.

    The driver sends :attr:`requests` at ``now``, feeds datagrams from the
    gateway to :meth:`receive` and calls :meth:`on_timeout` at
    :attr:`next_deadline`; :attr:`result` is set once done. Replies that are
    not ours are ignored (the last reason is kept in :attr:`rejected` and
    quoted if the transaction gives up), so a stray or spoofed datagram
    cannot end it.
    """

    method: Method

    def __init__(self, requests: tuple[bytes, ...], now: float, rto: float,
                 max_sends: int) -> None:
        self.requests = requests
        self.result: Outcome | None = None
        self.rejected: str | None = None
        self._answered: set[int] = set()
        self._rto = rto
        self._sends = 1
        self._max_sends = max_sends
        self.next_deadline: float | None = now + rto

    @abc.abstractmethod
    def decode(self, data: bytes) -> PcpResponse | NatPmpResponse:
        """The protocol's decoder."""

    @abc.abstractmethod
    def _match(self, msg: PcpResponse | NatPmpResponse) -> Outcome | int | str:
        """The outcome, the index of a request answered so far, or why ``msg`` is not ours."""

    def receive(self, data: bytes) -> Outcome | None:
        """The outcome if ``data`` completes this transaction; anything else is ignored."""
        try:
            msg = self.decode(data)
        except PortmapError as e:
            if self.result is None:
                self.rejected = str(e)
            return None
        self.accept(msg)
        return self.result

    def accept(self, msg: PcpResponse | NatPmpResponse) -> bool:
        """Whether ``msg`` answers this transaction (completing it or part of it)."""
        if self.result is not None:
            return False
        got = self._match(msg)
        if isinstance(got, str):
            self.rejected = got
            return False
        if isinstance(got, int):
            self._answered.add(got)
        else:
            self.result = got
            self.next_deadline = None
        return True

    def on_timeout(self, now: float) -> list[bytes]:
        """Requests to resend now; none when not due, done, or given up (then :attr:`result`)."""
        if self.result is not None or self.next_deadline is None or now < self.next_deadline:
            return []
        if self._sends >= self._max_sends:
            why = f"; last reply rejected: {self.rejected}" if self.rejected else ""
            self.result = Failure(self.method, f"no valid reply after {self._sends} sends{why}")
            self.next_deadline = None
            return []
        self._sends += 1
        self._rto *= 2
        self.next_deadline = now + self._rto
        return [r for i, r in enumerate(self.requests) if i not in self._answered]


def _failure(method: Method, code: int, names: dict[int, str], retry: int | None = None,
             ) -> Failure:
    name = names.get(code, f"unknown result code {code}")
    return Failure(method, f"gateway answered {name}", code=code, retry_after=retry)


class PcpMap(_Transaction):
    """One PCP MAP request (or deletion, with ``lifetime`` 0) and its checked answer.

    ``nonce`` must be unpredictable (the driver draws it) and stay the same for
    renewals and the deletion of the same mapping (RFC 6887 s11.3).
    """

    method: Method = "pcp"

    def __init__(self, now: float, *, nonce: bytes, client_ip: str, internal_port: int,
                 lifetime: int = DEFAULT_LIFETIME, protocol: int = UDP,
                 suggested: Address | None = None, rto: float = 0.25, max_sends: int = 4) -> None:
        request = encode_pcp_map(nonce, client_ip, internal_port, lifetime, protocol=protocol,
                                 suggested=suggested)
        super().__init__((request,), now, rto, max_sends)
        self.nonce, self.internal_port, self.protocol = nonce, internal_port, protocol
        self.lifetime = lifetime
        self._v4 = ipaddress.ip_address(client_ip).version == 4

    def decode(self, data: bytes) -> PcpResponse:
        return decode_pcp(data)

    def _match(self, msg: PcpResponse | NatPmpResponse) -> Outcome | int | str:
        if not isinstance(msg, PcpResponse):
            return "not a PCP reply"
        if msg.version != PCP_VERSION:
            if msg.opcode != OP_MAP:
                return f"opcode {msg.opcode} in a version {msg.version} reply"
            speaks = "NAT-PMP" if msg.version == NATPMP_VERSION else f"PCP version {msg.version}"
            return Failure("pcp", f"gateway speaks {speaks}, not PCP version {PCP_VERSION}",
                           code=msg.result)
        if msg.opcode != OP_MAP:
            return f"opcode {msg.opcode}, not MAP"
        if msg.nonce is None:  # header-only error: the gateway could not parse our request
            return _failure("pcp", msg.result, PCP_RESULTS, msg.lifetime)
        if msg.nonce != self.nonce:
            return "mapping nonce differs from ours"
        if msg.protocol != self.protocol or msg.internal_port != self.internal_port:
            return (f"reply for protocol {msg.protocol} port {msg.internal_port}, "
                    f"not {self.protocol} port {self.internal_port}")
        if msg.result:
            return _failure("pcp", msg.result, PCP_RESULTS, msg.lifetime)
        return _granted("pcp", self.internal_port, self.lifetime, msg.lifetime, msg.external,
                        msg.epoch, v4=self._v4)


def _granted(method: Method, internal_port: int, asked: int, lifetime: int,
             external: Address | None, epoch: int, *, v4: bool = True) -> Outcome:
    """Turn a successful reply into a Mapping, Deleted, or a Failure naming what is wrong."""
    if asked == 0:
        if lifetime:
            return Failure(method, f"asked to delete, gateway kept the mapping for {lifetime} s")
        return Deleted(method, internal_port)
    if lifetime == 0:
        return Failure(method, "gateway granted a lease of 0 s (no mapping)")
    if external is None or external[1] == 0:
        return Failure(method, "gateway mapped to external port 0")
    why = unreachable(external[0])
    if why is None and (ipaddress.ip_address(external[0]).version == 4) != v4:
        why = f"external address {external[0]} is of the other family"
    if why is not None:
        return Failure(method, why)
    return Mapping(method, internal_port, external, lifetime, epoch)


class NatPmpMap(_Transaction):
    """One NAT-PMP mapping (or deletion, with ``lifetime`` 0) and its checked answer.

    A mapping reply lacks the external address, so the address request goes
    out alongside and both answers make the :class:`Mapping`. NAT-PMP has no
    transaction id: a reply is ours when opcode and internal port match.
    """

    method: Method = "natpmp"

    def __init__(self, now: float, *, internal_port: int, lifetime: int = DEFAULT_LIFETIME,
                 protocol: int = UDP, suggested_port: int = 0, rto: float = 0.25,
                 max_sends: int = 4) -> None:
        request = encode_natpmp_map(internal_port, lifetime, suggested_port=suggested_port,
                                    protocol=protocol)
        requests = (request,) if lifetime == 0 else (request, encode_natpmp_address())
        super().__init__(requests, now, rto, max_sends)
        self.internal_port, self.lifetime = internal_port, lifetime
        self._op = _NATPMP_OPS[protocol]
        self._address: str | None = None
        self._mapped: NatPmpResponse | None = None

    def decode(self, data: bytes) -> NatPmpResponse:
        return decode_natpmp(data)

    def _match(self, msg: PcpResponse | NatPmpResponse) -> Outcome | int | str:
        if not isinstance(msg, NatPmpResponse):
            return "not a NAT-PMP reply"
        if msg.opcode == _NATPMP_OP_ADDRESS and len(self.requests) > 1:
            if msg.result:
                return _failure("natpmp", msg.result, NATPMP_RESULTS)
            assert msg.external_ip is not None
            self._address = msg.external_ip
        elif msg.opcode == self._op:
            if msg.internal_port not in (None, self.internal_port):
                return f"reply for internal port {msg.internal_port}, not {self.internal_port}"
            if msg.result:
                return _failure("natpmp", msg.result, NATPMP_RESULTS)
            if self.lifetime == 0 or msg.lifetime == 0:
                return _granted("natpmp", self.internal_port, self.lifetime, msg.lifetime, None,
                                msg.epoch)
            self._mapped = msg
        else:
            return f"opcode {msg.opcode} not asked for"
        if self._address is None or self._mapped is None:
            return 0 if self._mapped is not None else 1
        m = self._mapped
        return _granted("natpmp", self.internal_port, self.lifetime, m.lifetime,
                        (self._address, m.external_port), m.epoch)


# -------------------------------------------------------------------- epoch


class Epoch:
    """A gateway's epoch counter, checked as each protocol's RFC says.

    The counter restarts when the gateway loses its mapping table (a reboot),
    which clients must notice to re-create their mappings. PCP (RFC 6887
    s8.5): invalid if it went back by more than 1 s, or if client and server
    elapsed times disagree by more than 2 s plus 1/16. NAT-PMP (RFC 6886 s3.6):
    invalid if below the last value plus 7/8 of the client's elapsed time by
    more than 2 s.
    """

    def __init__(self, method: Method) -> None:
        self.method = method
        self._last: tuple[int, float] | None = None

    def observe(self, epoch: int, now: float) -> bool:
        """Record ``epoch`` seen at ``now``; True if it shows the gateway lost its state."""
        last, self._last = self._last, (epoch, now)
        if last is None:
            return False
        prev, then = last
        client = now - then
        if self.method == "natpmp":
            return epoch < prev + client * 7 / 8 - 2
        if epoch < prev - 1:
            return True
        server = epoch - prev
        return client + 2 < server - server / 16 or server + 2 < client - client / 16


# -------------------------------------------------------------------- lease


@attrs.frozen
class Mapped:
    """The lease holds: publish ``mapping.external``. ``renewal``: same endpoint as before."""

    mapping: Mapping
    renewal: bool


@attrs.frozen
class Failed:
    """This protocol gave up; withdraw any endpoint it gave. The driver may fall back."""

    failure: Failure


@attrs.frozen
class Removed:
    """The mapping was deleted on request (the gateway confirmed it)."""

    internal_port: int


Event = Mapped | Failed | Removed
State = Literal["idle", "mapping", "mapped", "deleting", "deleted", "failed"]


class Lease:
    """The life of one mapping of ``internal_port`` with one protocol, sans-I/O.

    ``start`` (and later ``receive``, ``on_timeout`` at :attr:`next_deadline`,
    and ``delete``) return the datagrams to send to the gateway's port 5351;
    :meth:`events` drains what happened. Feed :meth:`receive` only datagrams
    from the gateway's address, including its multicast announcements on port
    5350.

    * renews at half the granted lease, suggesting the endpoint it holds; a
      renewal without reply is retried halfway to expiry, and at expiry the
      lease has :class:`Failed`;
    * re-maps when the gateway's epoch shows it lost state (in replies, and in
      announcements of either protocol), when a PCP gateway says our mapping
      changed, or when a NAT-PMP gateway announces a new external address;
      ``remap_delay`` (the RFCs want 0-5 s of random spread: the driver draws
      it) and ``remap_holdoff`` bound how often, so a flood of announcements
      costs at most one request per holdoff;
    * an announced address is never published: only a reply to our own
      request (NAT-PMP) or one carrying our nonce (PCP) changes the mapping.
    """

    def __init__(self, method: Literal["pcp", "natpmp"], *, internal_port: int,
                 client_ip: str = "", nonce: bytes = b"", lifetime: int = DEFAULT_LIFETIME,
                 protocol: int = UDP, suggested: Address | None = None, rto: float = 0.25,
                 max_sends: int = 4, remap_delay: float = 0.0,
                 remap_holdoff: float = 2.0) -> None:
        if lifetime <= 0:
            raise PortmapError("a lease needs a positive lifetime")
        if method == "pcp":  # bad arguments fail here rather than at the first request
            encode_pcp_map(nonce, client_ip, internal_port, lifetime, protocol=protocol)
        else:
            encode_natpmp_map(internal_port, lifetime, protocol=protocol)
        self.method: Literal["pcp", "natpmp"] = method
        self.internal_port, self.lifetime, self.protocol = internal_port, lifetime, protocol
        self.client_ip, self.nonce = client_ip, nonce
        self.state: State = "idle"
        self.mapping: Mapping | None = None
        self.epoch = Epoch(method)
        self.gateway_resets = 0  # epoch resets seen: the gateway rebooted or lost its table
        self._suggested = suggested
        self._rto, self._max_sends = rto, max_sends
        self._remap_delay, self._holdoff = remap_delay, remap_holdoff
        self._tx: PcpMap | NatPmpMap | None = None
        self._why = "map"  # what the transaction in flight (or the next one) is for
        self._wake_at: float | None = None
        self._expires_at: float | None = None
        self._last_remap: float | None = None
        self._events: list[Event] = []

    @property
    def next_deadline(self) -> float | None:
        times = [t for t in (self._tx.next_deadline if self._tx else None, self._wake_at,
                             self._expires_at) if t is not None]
        return min(times, default=None)

    def events(self) -> list[Event]:
        """What happened since the last call, oldest first."""
        out, self._events = self._events, []
        return out

    def start(self, now: float) -> list[bytes]:
        if self.state != "idle":
            raise PortmapError(f"lease already {self.state}")
        self.state = "mapping"
        return self._send(now, "map", self.lifetime)

    def delete(self, now: float) -> list[bytes]:
        """Ask the gateway to drop the mapping (also when this process never held it:
        a NAT-PMP mapping, or a PCP one with the same nonce, left by an earlier run)."""
        if self.state == "deleted":
            return []
        self.state = "deleting"
        self._wake_at = self._expires_at = None
        return self._send(now, "delete", 0)

    def receive(self, data: bytes, now: float, *, announcement: bool = False) -> list[bytes]:
        """A datagram from the gateway. ``announcement``: it came to the multicast group,
        so it never answers our request (a NAT-PMP address announcement looks exactly
        like the reply to our address request, and must not pass for one)."""
        if self.state in ("idle", "deleted", "failed"):
            return []
        tx = None if announcement else self._tx
        try:
            msg = self._decode(data)
        except PortmapError as e:
            if tx is not None and tx.result is None:
                tx.rejected = str(e)
            return []
        if tx is not None and tx.accept(msg):
            self._observe(msg.epoch, now)  # the reply itself re-created the mapping
            if tx.result is not None:
                self._finish(tx.result, now)
            return []
        self._unsolicited(msg, now)
        return self._due(now)

    def on_timeout(self, now: float) -> list[bytes]:
        if self.state == "mapped" and self._expires_at is not None and now >= self._expires_at:
            why = self._tx.rejected if self._tx and self._tx.rejected else "no reply"
            self._fail(Failure(self.method, f"lease expired before a renewal succeeded ({why})"))
            return []
        out: list[bytes] = []
        if self._tx is not None:
            out = self._tx.on_timeout(now)
            if self._tx.result is not None:
                self._finish(self._tx.result, now)
        return out + self._due(now)

    # ------------------------------------------------------------ internals

    def _decode(self, data: bytes) -> PcpResponse | NatPmpResponse:
        # A gateway that speaks both announces a restart with PCP's ANNOUNCE only
        # (miniupnpd does), so a NAT-PMP lease reads PCP too; the epoch is shared.
        if self.method == "pcp" or data[:1] == bytes((PCP_VERSION,)):
            return decode_pcp(data)
        return decode_natpmp(data)

    def _send(self, now: float, why: str, lifetime: int) -> list[bytes]:
        held = self.mapping.external if self.mapping else self._suggested
        self._why, self._wake_at = why, None
        if self.method == "pcp":
            self._tx = PcpMap(now, nonce=self.nonce, client_ip=self.client_ip,
                              internal_port=self.internal_port, lifetime=lifetime,
                              protocol=self.protocol, suggested=held, rto=self._rto,
                              max_sends=self._max_sends)
        else:
            self._tx = NatPmpMap(now, internal_port=self.internal_port, lifetime=lifetime,
                                 protocol=self.protocol, suggested_port=held[1] if held else 0,
                                 rto=self._rto, max_sends=self._max_sends)
        return list(self._tx.requests)

    def _due(self, now: float) -> list[bytes]:
        if self._tx is None and self._wake_at is not None and now >= self._wake_at:
            if self._why == "remap":
                self._last_remap = now
            return self._send(now, self._why, self.lifetime)
        return []

    def _finish(self, outcome: Outcome, now: float) -> None:
        """A transaction ended. Deleted only answers a deletion, Mapping only a map."""
        why, self._tx = self._why, None
        if isinstance(outcome, Deleted):
            self.state, self.mapping = "deleted", None
            self._events.append(Removed(self.internal_port))
        elif isinstance(outcome, Mapping):
            renewal = self.mapping is not None and self.mapping.external == outcome.external
            self.mapping, self.state = outcome, "mapped"
            self._expires_at = now + outcome.lifetime
            self._wake_at, self._why = now + max(1.0, outcome.lifetime / 2), "renew"
            self._events.append(Mapped(outcome, renewal))
        elif (why == "renew" and outcome.code is None and self._expires_at is not None
              and now + 1.0 < self._expires_at):
            self._wake_at = now + max(1.0, (self._expires_at - now) / 2)
        else:
            prefix = {"remap": "re-map failed: ", "delete": "delete failed: "}.get(why, "")
            self._fail(attrs.evolve(outcome, reason=prefix + outcome.reason))

    def _fail(self, failure: Failure) -> None:
        self.state, self.mapping, self._tx = "failed", None, None
        self._wake_at = self._expires_at = None
        self._events.append(Failed(failure))

    def _unsolicited(self, msg: PcpResponse | NatPmpResponse, now: float) -> None:
        """Announcements and gateway-initiated replies: they can only trigger a re-map."""
        if isinstance(msg, PcpResponse):
            if msg.version != PCP_VERSION:
                return
            ours = (msg.opcode == OP_MAP and msg.nonce == self.nonce
                    and msg.protocol == self.protocol and msg.internal_port == self.internal_port)
            if msg.opcode == OP_ANNOUNCE and not msg.result:
                if self._observe(msg.epoch, now):
                    self._remap(now)
            elif ours:  # RFC 6887 s14.2: the gateway changed or dropped our mapping
                self._observe(msg.epoch, now)
                self._remap(now)
        elif msg.opcode == _NATPMP_OP_ADDRESS and not msg.result:
            reset = self._observe(msg.epoch, now)
            moved = self.mapping is not None and msg.external_ip != self.mapping.external[0]
            if reset or moved:
                self._remap(now)

    def _observe(self, epoch: int, now: float) -> bool:
        reset = self.epoch.observe(epoch, now)
        self.gateway_resets += reset
        return reset

    def _remap(self, now: float) -> None:
        if self.state != "mapped" or self._tx is not None:
            return  # a request in flight answers with the gateway's current state anyway
        at = now + self._remap_delay
        if self._last_remap is not None:
            at = max(at, self._last_remap + self._holdoff)
        if self._why != "remap" or self._wake_at is None or at < self._wake_at:
            self._wake_at, self._why = at, "remap"
