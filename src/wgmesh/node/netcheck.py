"""Netcheck: what this node's network allows, measured with STUN from the WireGuard port.

The report answers the questions traversal needs: does UDP work at all; what are
the IPv4/IPv6 reflexive addresses; does the NAT **map each destination to a new
port** (two servers see different ports: a hard NAT, so publishing the reflexive
address is pointless and a port search is needed); which relay region is nearest;
does the NAT hairpin. The optional classic RFC 3489 NAT-type test (pystun3, it
needs a CHANGE-REQUEST server such as coturn with two addresses) runs in a child
process killed after a hard timeout, because pystun3 can loop forever on a reply
with the wrong transaction id.

Layers, so any transport can carry it:

* :class:`NetcheckProbe` - sans-I/O: ``start``/``receive``/``on_timeout`` return
  ``(address, bytes)`` datagrams to send, :meth:`~NetcheckProbe.report` the result.
  The userspace device feeds it STUN from its own socket (the WireGuard port), the
  kernel backend through sharedsock.
* :func:`netcheck` - a blocking driver over a given UDP socket (or fresh ones).
* :func:`classic_nat_type` - pystun3 under a hard timeout.
* :func:`local_addresses` - this host's interface addresses (the LAN candidates).

``wgmesh netcheck`` (its parser and printer) is :mod:`wgmesh.cli.netcheck`.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import ipaddress
import json
import secrets
import selectors
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

from wgmesh import stun
from wgmesh.netmap import RelayMap

__all__ = [
    "NetcheckProbe",
    "NetcheckReport",
    "StunServer",
    "classic_nat_type",
    "format_addr",
    "local_addresses",
    "netcheck",
    "parse_addr",
    "servers_from_relay_map",
]

Addr = tuple[str, int]


@attrs.frozen
class StunServer:
    """A STUN server; ``region`` is the relay region it belongs to (None: plain STUN)."""

    addr: Addr
    region: int | None = None
    region_code: str = ""


@attrs.frozen
class NetcheckReport:
    udp: bool
    ipv4: Addr | None
    ipv6: Addr | None
    #: True: a hard NAT (each destination gets its own port). None: fewer than two replies.
    mapping_varies_by_dest: bool | None
    hairpin: bool | None
    #: region id -> best round trip in seconds (None: no reply)
    region_latency: dict[int, float | None]
    preferred_region: int | None
    #: what each server saw: "ip:port" -> reflexive "ip:port" (None: no reply)
    seen_by: dict[str, str | None]
    nat_type: str | None = None  # classic RFC 3489 test, when asked for
    local_addresses: tuple[str, ...] = ()
    #: Gateway port mapping (:meth:`wgmesh.node.portmapper.PortMapper.report`): the
    #: mapping held and, per protocol, ``ok``, the ``external`` address or the ``error``.
    portmap: dict[str, Any] | None = None

    @property
    def hard_nat(self) -> bool:
        return bool(self.mapping_varies_by_dest)

    def to_json(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["ipv4"] = format_addr(self.ipv4) if self.ipv4 else None
        d["ipv6"] = format_addr(self.ipv6) if self.ipv6 else None
        d["region_latency"] = {str(k): v for k, v in self.region_latency.items()}
        d["local_addresses"] = list(self.local_addresses)
        d["hard_nat"] = self.hard_nat
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NetcheckReport:
        """The report back from :meth:`to_json` (e.g. the agent's, over its local API)."""
        return cls(
            udp=d["udp"], ipv4=parse_addr(d["ipv4"]) if d["ipv4"] else None,
            ipv6=parse_addr(d["ipv6"]) if d["ipv6"] else None,
            mapping_varies_by_dest=d["mapping_varies_by_dest"], hairpin=d["hairpin"],
            region_latency={int(k): v for k, v in d["region_latency"].items()},
            preferred_region=d["preferred_region"], seen_by=d["seen_by"],
            nat_type=d["nat_type"], local_addresses=tuple(d["local_addresses"]),
            portmap=d.get("portmap"))


def format_addr(a: Addr) -> str:
    """``ip:port``, with brackets around an IPv6 address."""
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


def parse_addr(text: str) -> Addr:
    """``HOST[:PORT]`` or ``[V6]:PORT`` (the STUN port when none is given)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        return (text, stun.DEFAULT_PORT)
    return (host.strip("[]"), int(port))


def servers_from_relay_map(relay_map: RelayMap) -> list[StunServer]:
    """Every relay answers STUN: one server per relay node with a STUN port."""
    out = []
    for region in relay_map.regions:
        for node in region.nodes:
            addr = node.stun_address
            if addr is not None and addr[0]:
                out.append(StunServer(addr, region.region_id, region.code))
    return out


class NetcheckProbe:
    """One netcheck run, sans-I/O. All servers are queried at once, from one socket."""

    def __init__(self, servers: Sequence[StunServer], now: float, *, rto: float = 0.1,
                 max_sends: int = 4, hairpin: bool = True, hairpin_wait: float = 0.3,
                 families: Iterable[int] = (4, 6)) -> None:
        fam = set(families)
        self.servers = [s for s in servers
                        if ipaddress.ip_address(s.addr[0]).version in fam]
        self._tx = {s: stun.BindingTransaction(now, secrets.token_bytes(stun.TXID_LEN),
                                               rto=rto, max_sends=max_sends)
                    for s in self.servers}
        self._by_txid = {tx.txid: s for s, tx in self._tx.items()}
        self._hairpin_enabled = hairpin
        self._hairpin_wait = hairpin_wait
        self._hairpin_txid: bytes | None = None
        self._hairpin_deadline: float | None = None
        self.hairpin: bool | None = None

    def start(self) -> list[tuple[Addr, bytes]]:
        return [(s.addr, tx.request) for s, tx in self._tx.items()]

    @property
    def done(self) -> bool:
        return all(tx.done for tx in self._tx.values()) and (
            self._hairpin_deadline is None or self.hairpin is not None)

    @property
    def next_deadline(self) -> float | None:
        ts = [tx.next_deadline for tx in self._tx.values() if tx.next_deadline is not None]
        if self._hairpin_deadline is not None and self.hairpin is None:
            ts.append(self._hairpin_deadline)
        return min(ts, default=None)

    def receive(self, data: bytes, src: Addr, now: float) -> list[tuple[Addr, bytes]]:
        """Feed a datagram that arrived on the probed socket (non-STUN is ignored)."""
        if not stun.is_stun(data):
            return []
        txid = data[8:20]
        if self._hairpin_txid is not None and txid == self._hairpin_txid:
            self.hairpin = True  # our own request came back through the NAT
            return []
        server = self._by_txid.get(txid)
        if server is None:
            return []
        got = self._tx[server].receive(data, now)
        if got is None or not self._hairpin_enabled or self._hairpin_txid is not None:
            return []
        if ":" in got[0] or server.addr[0] == got[0]:
            return []
        self._hairpin_txid = secrets.token_bytes(stun.TXID_LEN)
        self._hairpin_deadline = now + self._hairpin_wait
        return [(got, stun.encode_binding_request(self._hairpin_txid))]

    def on_timeout(self, now: float) -> list[tuple[Addr, bytes]]:
        out = []
        for s, tx in self._tx.items():
            again = tx.on_timeout(now)
            if again is not None:
                out.append((s.addr, again))
        if (self._hairpin_deadline is not None and self.hairpin is None
                and now >= self._hairpin_deadline):
            self.hairpin = False
        return out

    def report(self, *, nat_type: str | None = None,
               local: Sequence[str] = ()) -> NetcheckReport:
        seen: dict[str, str | None] = {}
        v4: list[Addr] = []
        v6: list[Addr] = []
        latency: dict[int, float | None] = {}
        for s, tx in self._tx.items():
            r = tx.result
            seen[format_addr(s.addr)] = format_addr(r) if r else None
            if r is not None:
                (v6 if ":" in r[0] else v4).append(r)
            if s.region is not None:
                best = latency.get(s.region)
                rtt = tx.rtt if r is not None else None
                latency[s.region] = (rtt if best is None else best if rtt is None
                                     else min(best, rtt))
        varies = None
        by_server_ip = {s.addr[0]: tx.result for s, tx in self._tx.items()
                        if tx.result is not None and ":" not in tx.result[0]}
        if len(by_server_ip) >= 2:
            varies = len(set(by_server_ip.values())) > 1
        replied = {k: v for k, v in latency.items() if v is not None}
        preferred = min(replied, key=lambda k: replied[k]) if replied else None
        hairpin = self.hairpin if self._hairpin_deadline is not None else None
        return NetcheckReport(
            udp=bool(v4 or v6), ipv4=v4[0] if v4 else None, ipv6=v6[0] if v6 else None,
            mapping_varies_by_dest=varies, hairpin=hairpin, region_latency=latency,
            preferred_region=preferred, seen_by=seen, nat_type=nat_type,
            local_addresses=tuple(local))


def netcheck(servers: Sequence[StunServer], *, sock: socket.socket | None = None,
             timeout: float = 3.0, hairpin: bool = True, classic: Addr | None = None,
             classic_timeout: float = 15.0) -> NetcheckReport:
    """Run a netcheck, blocking. With ``sock`` the probes leave from that socket's port.

    ``sock`` is left open (its timeout restored); datagrams that are not replies
    are discarded, so pass the WireGuard port's socket only while nothing else
    reads it. Without it, one IPv4 and (if any server is IPv6) one IPv6 socket
    are opened for the run.
    """
    socks: list[socket.socket] = []
    own: list[socket.socket] = []
    if sock is not None:
        socks.append(sock)
        families = (6, 4) if sock.family == socket.AF_INET6 else (4,)
    else:
        own.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        families = (4,)
        if any(":" in s.addr[0] for s in servers) and socket.has_ipv6:
            try:
                s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                own.append(s6)
                families = (4, 6)
            except OSError:
                pass
        socks = own
    probe = NetcheckProbe(servers, time.monotonic(), hairpin=hairpin, families=families)

    def send(datagrams: list[tuple[Addr, bytes]]) -> None:
        for addr, data in datagrams:
            want = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
            s = next((x for x in socks if x.family == want), socks[0])
            dst = addr if s.family == want else ("::ffff:" + addr[0], addr[1])
            with contextlib.suppress(OSError):  # unreachable: that server just fails
                s.sendto(data, dst)

    # a selector, not select(): an agent with many hard-NAT search ports has fds past 1023
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    try:
        send(probe.start())
        deadline = time.monotonic() + timeout
        while not probe.done and (now := time.monotonic()) < deadline:
            nd = probe.next_deadline
            wait = max(0.0, min(deadline, nd if nd is not None else deadline) - now)
            for key, _ in sel.select(wait):
                s = key.fileobj  # type: ignore[assignment]
                try:
                    data, src = s.recvfrom(2048)
                except OSError:
                    continue
                send(probe.receive(data, (src[0], src[1]), time.monotonic()))
            send(probe.on_timeout(time.monotonic()))
    finally:
        sel.close()
        for s in own:
            s.close()
    nat_type = classic_nat_type(classic, timeout=classic_timeout) if classic else None
    return probe.report(nat_type=nat_type, local=local_addresses())


_CLASSIC = """
import json, socket, sys, stun
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(float(sys.argv[3]))
s.bind(("0.0.0.0", 0))
typ, info = stun.get_nat_type(s, "0.0.0.0", s.getsockname()[1],
                              stun_host=sys.argv[1], stun_port=int(sys.argv[2]))
print(json.dumps(typ))
"""


def classic_nat_type(server: Addr, *, timeout: float = 15.0, reply_wait: float = 0.3
                     ) -> str | None:
    """pystun3's RFC 3489 NAT type against ``server`` (it must honour CHANGE-REQUEST).

    Runs in a child process that is killed after ``timeout`` seconds; ``None``
    then, or if it fails. Always names the server: pystun3's default list is
    the public internet.
    """
    try:
        cp = subprocess.run([sys.executable, "-c", _CLASSIC, server[0], str(server[1]),
                             str(reply_wait)], capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None
    if cp.returncode != 0:
        return None
    try:
        out = json.loads(cp.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return out if isinstance(out, str) else None


_SIOCGIFCONF = 0x8912
_IFREQ = 40


def local_addresses(include_loopback: bool = False) -> tuple[str, ...]:
    """Interface addresses of this host (IPv4 via SIOCGIFCONF, IPv6 from /proc)."""
    out: list[str] = []
    buf = array.array("B", bytes(_IFREQ * 128))
    ifc = struct.pack("@iL", len(buf), buf.buffer_info()[0])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            n = struct.unpack("@iL", fcntl.ioctl(s.fileno(), _SIOCGIFCONF, ifc))[0]
        except OSError:
            n = 0
    raw = buf.tobytes()[:n]
    for i in range(0, n - _IFREQ + 1, _IFREQ):
        out.append(socket.inet_ntoa(raw[i + 20:i + 24]))  # ifr_addr.sin_addr
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            h = line.split()[0]
            out.append(str(ipaddress.IPv6Address(bytes.fromhex(h))))
    except OSError:
        pass
    return tuple(a for a in dict.fromkeys(out)
                 if include_loopback or not ipaddress.ip_address(a).is_loopback)
