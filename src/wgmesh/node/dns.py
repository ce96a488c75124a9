"""Mesh DNS: each node answers ``NAME.MESHDOMAIN`` from its netmap and forwards the rest.

Two layers, so the protocol logic is tested without sockets:

* The core (:class:`NameTable`, :func:`decide`, :class:`Forward`, :class:`RateLimiter`)
  is sans-I/O: query bytes and a table in, reply bytes or a decision to forward out; no
  sockets, no clock (time is an argument). It could move to a core module as is, except
  that dnspython's own import pulls in ``socket`` (``dns.inet``).
* :class:`DnsResponder` is the asyncio driver: UDP and TCP on one address, forwarding
  everything outside the mesh to the node's previous resolvers.

Address: the node's own tunnel IPv4 address, not 100.100.100.100. The tunnel address is
already on both backends' interfaces (kernel WireGuard, userspace TUN), so nothing is
added to the system that a crash could leave behind; peers reach it through the tunnel,
where the packet filter applies, and the underlay has no route to it. 100.100.100.100
lies inside control's own pool (100.64.0.0/10, index 2384996), so it would need a
reservation in control plus an extra address on every node; Tailscale can use it
because its netstack intercepts that address inside the TUN, and the kernel backend has
no such hook. Binding inside the node's namespace is the caller's job.

Trust: a source is "in the tunnel" if it is loopback or the address of a node in the
current netmap (this node or a peer). Only such sources get answers: mesh names, and
recursion through the upstreams. Anyone else gets REFUSED for a well-formed query and
silence for anything malformed, so the responder reflects nothing to the underlay.

Caching: none. Mesh answers come from the current table with a 5 s TTL, so a renamed or
removed node stops resolving here at once and downstream within seconds; forwarded
answers are relayed, never stored (the system's stub resolver caches under its own rules).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import struct
from collections.abc import Sequence

import attrs
import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset

from wgmesh.netmap import Netmap, NodeInfo, Peer

__all__ = ["TTL", "DnsResponder", "Forward", "NameTable", "RateLimiter", "Upstream", "decide"]

#: Seconds a mesh answer may be cached downstream: "stops resolving within seconds".
TTL = 5
#: Largest query accepted; real ones are a few hundred bytes even with EDNS padding.
MAX_QUERY = 4096
#: Our EDNS UDP payload (the DNS flag day 2020 value: no IP fragmentation).
UDP_PAYLOAD = 1232
#: The classic UDP limit for clients without EDNS.
PLAIN_UDP = 512
#: Types never answered or forwarded: zone transfers would list the whole mesh.
_REFUSED_TYPES = frozenset({dns.rdatatype.AXFR, dns.rdatatype.IXFR})
#: Meta types that are no question at all.
_BOGUS_TYPES = frozenset({dns.rdatatype.OPT, dns.rdatatype.TSIG, dns.rdatatype.TKEY})
_QR, _RD, _OPCODE_MASK = 0x8000, 0x0100, 0x7800

Upstream = tuple[str, int]


# ------------------------------------------------------------------------- core

@attrs.frozen
class NameTable:
    """Who is who in the mesh, as of one netmap: labels, addresses and reverse names."""

    domain: dns.name.Name
    addresses: dict[str, tuple[str, ...]]
    reverse: dict[dns.name.Name, str]
    members: frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]
    #: Each address's reverse name and parsed form, for the next table to reuse: a node
    #: rebuilds its table on every netmap change, and parsing every peer's addresses
    #: again was most of a change's cost at 500 peers.
    parsed: dict[str, tuple[dns.name.Name, ipaddress.IPv4Address | ipaddress.IPv6Address]] \
        = attrs.field(factory=dict, eq=False, repr=False)

    @classmethod
    def from_netmap(cls, netmap: Netmap, domain: str,
                    previous: NameTable | None = None) -> NameTable:
        """This node and its peers; on a (control-prevented) name clash the first wins.
        ``previous``: the table this one replaces (its parsed addresses are reused)."""
        origin = dns.name.from_text(domain)
        if origin == dns.name.root:
            raise ValueError("the mesh domain must not be the DNS root")
        addresses: dict[str, tuple[str, ...]] = {}
        nodes: list[NodeInfo | Peer] = [netmap.self_node,
                                        *sorted(netmap.peers.values(), key=lambda p: p.id)]
        for node in nodes:
            ips = tuple(ip for ip in (node.ipv4, node.ipv6) if ip)
            addresses.setdefault(node.name.lower(), ips)
        known = previous.parsed if previous is not None else {}
        parsed = {ip: known.get(ip) or (dns.reversename.from_address(ip),
                                        ipaddress.ip_address(ip))
                  for ips in addresses.values() for ip in ips}
        reverse = {parsed[ip][0]: label for label, ips in addresses.items() for ip in ips}
        members = frozenset(address for _, address in parsed.values())
        return cls(origin, addresses, reverse, members, parsed)

    @property
    def domain_text(self) -> str:
        return self.domain.to_text(omit_final_dot=True)

    def resolve(self, name: str) -> list[str]:
        """Addresses of ``name`` (``peer`` or ``peer.MESHDOMAIN``, any case, trailing dot
        or not); empty if unknown. Never asks the system resolver."""
        label = name.rstrip(".").lower()
        suffix = "." + self.domain_text.lower()
        if label.endswith(suffix):
            label = label[: -len(suffix)]
        return [] if "." in label else list(self.addresses.get(label, ()))

    def trusts(self, source: str) -> bool:
        """Is ``source`` inside the tunnel: loopback or a node of this netmap?"""
        try:
            ip = ipaddress.ip_address(source)
        except ValueError:
            return False
        return ip.is_loopback or ip in self.members


@attrs.frozen
class Forward:
    """Decision: ask the upstreams ``upstream`` and relay the reply with :meth:`reply`."""

    query: dns.message.Message
    upstream: dns.message.Message
    limit: int

    def reply(self, response: dns.message.Message | None) -> bytes:
        """The client's reply: the upstream's answer under the client's id and EDNS terms,
        truncated (TC) to what the client can take; SERVFAIL if no upstream answered."""
        if response is None:
            failed = _response(self.query)
            failed.set_rcode(dns.rcode.SERVFAIL)
            return failed.to_wire(max_size=self.limit, prefer_truncation=True)
        response.id = self.query.id
        if self.query.edns >= 0:  # our payload, the upstream's DO bit, none of its options
            response.use_edns(0, response.ednsflags & dns.flags.DO, UDP_PAYLOAD)
        else:
            response.use_edns(False)
        return response.to_wire(max_size=self.limit, prefer_truncation=True)


def decide(table: NameTable, wire: bytes, *, trusted: bool,
           tcp: bool = False) -> bytes | Forward | None:
    """What to do with one query from a client: reply bytes, :class:`Forward`, or ``None``
    (silence). ``trusted``: the source is inside the tunnel (:meth:`NameTable.trusts`).

    Hostile input gets FORMERR or NOTIMP (inside the tunnel) or silence (outside); a
    response (QR set) never gets anything, so two responders cannot loop. Never raises.
    """
    if len(wire) < 12 or wire[2] & 0x80:
        return None
    if len(wire) > MAX_QUERY:
        return _header_error(wire, dns.rcode.FORMERR) if trusted else None
    if dns.opcode.from_flags(wire[2] << 8) != dns.opcode.QUERY:  # before dnspython parses
        return _header_error(wire, dns.rcode.NOTIMP) if trusted else None  # UPDATE, NOTIFY
    try:
        query = dns.message.from_wire(wire)
    except Exception:  # dnspython raises many types on hostile input; all mean malformed
        return _header_error(wire, dns.rcode.FORMERR) if trusted else None
    if len(query.question) != 1 or query.answer or query.authority:
        return _header_error(wire, dns.rcode.FORMERR) if trusted else None
    question = query.question[0]
    if question.rdtype in _BOGUS_TYPES:
        return _header_error(wire, dns.rcode.FORMERR) if trusted else None
    limit = _client_limit(query, tcp)
    if not trusted or question.rdtype in _REFUSED_TYPES or \
            question.rdclass != dns.rdataclass.IN:
        return _refuse(query, limit)
    if question.name.is_subdomain(table.domain):
        return _mesh_answer(table, query, limit)
    if question.name in table.reverse:
        return _reverse_answer(table, query, limit)
    return Forward(query, _upstream_query(query), limit)


@attrs.define
class RateLimiter:
    """Token bucket per source: ``rate`` queries/s, bursts of ``burst``; memory bounded by
    ``max_sources`` (the longest-idle source is forgotten first)."""

    rate: float
    burst: float
    max_sources: int = 4096
    _buckets: dict[str, tuple[float, float]] = attrs.field(factory=dict, init=False)

    def allow(self, source: str, now: float) -> bool:
        tokens, last = self._buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1
        if len(self._buckets) >= self.max_sources:
            del self._buckets[next(iter(self._buckets))]  # dicts keep insertion (= use) order
        self._buckets[source] = (tokens - 1 if allowed else tokens, now)
        return allowed


def _header_error(wire: bytes, rcode: dns.rcode.Rcode) -> bytes:
    """A bare header (id, opcode, RD echoed; no sections): works when parsing did not."""
    qid, flags = struct.unpack_from("!HH", wire)
    return struct.pack("!HHHHHH", qid, _QR | (flags & (_OPCODE_MASK | _RD)) | rcode, 0, 0, 0, 0)


def _client_limit(query: dns.message.Message, tcp: bool) -> int:
    if tcp:
        return 65535
    if query.edns < 0:
        return PLAIN_UDP
    return max(PLAIN_UDP, min(query.payload, UDP_PAYLOAD))


def _response(query: dns.message.Message) -> dns.message.Message:
    return dns.message.make_response(query, recursion_available=True, our_payload=UDP_PAYLOAD)


def _refuse(query: dns.message.Message, limit: int) -> bytes:
    response = dns.message.make_response(query, our_payload=UDP_PAYLOAD)
    response.set_rcode(dns.rcode.REFUSED)
    return response.to_wire(max_size=limit, prefer_truncation=True)


def _mesh_answer(table: NameTable, query: dns.message.Message, limit: int) -> bytes:
    """Authoritative: A/AAAA of a node, NODATA for its other types and the apex,
    NXDOMAIN for any other name in the mesh domain."""
    question = query.question[0]
    response = _response(query)
    response.flags |= dns.flags.AA
    labels = question.name.relativize(table.domain).labels
    if len(labels) == 1:
        ips = table.addresses.get(labels[0].decode("ascii", "replace").lower())
        if ips is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        for ip in ips or ():
            rdtype = dns.rdatatype.AAAA if ":" in ip else dns.rdatatype.A
            if question.rdtype in (rdtype, dns.rdatatype.ANY):
                response.answer.append(dns.rrset.from_text(question.name, TTL, "IN", rdtype, ip))
    elif labels:  # deeper than NAME.MESHDOMAIN: nothing lives there (the apex: NODATA)
        response.set_rcode(dns.rcode.NXDOMAIN)
    return response.to_wire(max_size=limit, prefer_truncation=True)


def _reverse_answer(table: NameTable, query: dns.message.Message, limit: int) -> bytes:
    question = query.question[0]
    response = _response(query)
    response.flags |= dns.flags.AA
    if question.rdtype in (dns.rdatatype.PTR, dns.rdatatype.ANY):
        target = dns.name.Name((table.reverse[question.name].encode(),)).concatenate(
            table.domain)
        response.answer.append(dns.rrset.from_text(question.name, TTL, "IN", "PTR",
                                                   target.to_text()))
    return response.to_wire(max_size=limit, prefer_truncation=True)


def _upstream_query(query: dns.message.Message) -> dns.message.Message:
    """A fresh query (random id, our EDNS) for the client's question and flags."""
    question = query.question[0]
    upstream = dns.message.make_query(question.name, question.rdtype, question.rdclass,
                                      use_edns=0, payload=UDP_PAYLOAD,
                                      want_dnssec=bool(query.ednsflags & dns.flags.DO))
    upstream.flags = query.flags & (dns.flags.RD | dns.flags.CD | dns.flags.AD)
    return upstream


# ----------------------------------------------------------------------- driver


class DnsResponder:
    """UDP + TCP DNS on ``address``:``port`` for one node; see the module docstring.

    ``upstreams`` are the node's previous resolvers, tried in order with ``timeout``
    each (UDP, then TCP when the answer is truncated); this responder's own address is
    dropped from them so a resolv.conf already pointing here cannot make a loop. At most
    ``max_inflight`` forwarded queries and ``max_tcp`` TCP clients at a time; beyond
    ``rate``/``burst`` queries per second a source is ignored.
    """

    def __init__(self, netmap: Netmap, domain: str, address: str, *, port: int = 53,
                 upstreams: Sequence[Upstream] = (), timeout: float = 2.0,
                 max_inflight: int = 256, max_tcp: int = 64, rate: float = 200.0,
                 burst: float = 400.0, tcp_idle: float = 10.0) -> None:
        self._table = NameTable.from_netmap(netmap, domain)
        self.address, self.port = address, port
        self.upstreams = [u for u in upstreams if u != (address, port)]
        self.timeout, self.max_inflight, self.max_tcp = timeout, max_inflight, max_tcp
        self.tcp_idle = tcp_idle
        self._limiter = RateLimiter(rate, burst)
        self._forwards: set[asyncio.Task[bytes]] = set()
        self._tcp_clients: set[asyncio.StreamWriter] = set()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    @property
    def table(self) -> NameTable:
        return self._table

    def update(self, netmap: Netmap) -> None:
        """Answer from ``netmap`` from now on: removed and renamed nodes stop resolving."""
        self._table = NameTable.from_netmap(netmap, self._table.domain_text, self._table)

    def resolve(self, name: str) -> list[str]:
        """Addresses of a mesh name from the current table (no system resolver)."""
        return self._table.resolve(name)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(self.address, self.port))
        self._tcp = await asyncio.start_server(self._serve_tcp, self.address, self.port)

    async def close(self) -> None:
        if self._tcp is not None:
            self._tcp.close()
        for writer in list(self._tcp_clients):
            writer.close()
        if self._udp is not None:
            self._udp.close()
        for task in list(self._forwards):
            task.cancel()
        await asyncio.gather(*self._forwards, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()

    async def __aenter__(self) -> DnsResponder:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- per query ------------------------------------------------------------------
    def _decide(self, wire: bytes, source: str, tcp: bool) -> bytes | Forward | None:
        if not self._limiter.allow(source, asyncio.get_running_loop().time()):
            return None
        return decide(self._table, wire, trusted=self._table.trusts(source), tcp=tcp)

    def _start_forward(self, forward: Forward) -> asyncio.Task[bytes] | None:
        """A task asking the upstreams, or None if ``max_inflight`` are out already."""
        if len(self._forwards) >= self.max_inflight:
            return None
        task = asyncio.get_running_loop().create_task(self._ask_upstreams(forward))
        self._forwards.add(task)
        task.add_done_callback(self._forwards.discard)
        return task

    async def _ask_upstreams(self, forward: Forward) -> bytes:
        for host, port in self.upstreams:
            with contextlib.suppress(TimeoutError, OSError, dns.exception.DNSException):
                response, _ = await asyncio.wait_for(
                    dns.asyncquery.udp_with_fallback(
                        forward.upstream, host, timeout=self.timeout, port=port,
                        ignore_unexpected=True),
                    2 * self.timeout)
                return forward.reply(response)
        return forward.reply(None)

    def _on_datagram(self, wire: bytes, addr: tuple[str, int]) -> None:
        decision = self._decide(wire, addr[0], tcp=False)
        if isinstance(decision, Forward):
            task = self._start_forward(decision)
            if task is not None:
                task.add_done_callback(functools.partial(self._send_result, addr=addr))
        elif decision is not None:
            self._send(decision, addr)

    def _send_result(self, task: asyncio.Task[bytes], addr: tuple[str, int]) -> None:
        if not task.cancelled():
            self._send(task.result(), addr)

    def _send(self, reply: bytes, addr: tuple[str, int]) -> None:
        if self._udp is not None and not self._udp.is_closing():
            self._udp.sendto(reply, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        if len(self._tcp_clients) >= self.max_tcp:
            writer.close()
            return
        self._tcp_clients.add(writer)
        source = writer.get_extra_info("peername")[0]
        try:
            while True:
                size = await asyncio.wait_for(reader.readexactly(2), self.tcp_idle)
                wire = await asyncio.wait_for(
                    reader.readexactly(int.from_bytes(size, "big")), self.tcp_idle)
                decision = self._decide(wire, source, tcp=True)
                if isinstance(decision, Forward):
                    task = self._start_forward(decision)
                    decision = None if task is None else await task
                if decision is None:  # silence on TCP: hang up
                    break
                writer.write(len(decision).to_bytes(2, "big") + decision)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_clients.discard(writer)
            writer.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, responder: DnsResponder) -> None:
        self._responder = responder

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._responder._on_datagram(data, addr)
