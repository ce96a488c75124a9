"""Cryptokey routing: longest-prefix match from IP address to peer, IPv4 and IPv6.

One dict per prefix length, probed from the longest length present down. Real
configurations use few distinct lengths (/32, /24, /128, /0 ...), so a lookup is a
handful of dict probes on an int taken straight from the packet header. Each value
also knows its own entries, so listing or removing one peer's networks costs
that peer's entries, not the table's.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from typing import Generic, TypeVar

__all__ = ["AllowedIPs", "parse_network"]

T = TypeVar("T")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Parsed networks kept: a node builds every peer's config and the filter's rules again on
#: each netmap change, and parsing the same prefixes again was much of a change's cost at
#: 500 peers (about 4 per peer). ipaddress networks are immutable, so sharing them is
#: safe; the bound keeps a long-lived node in a churning mesh at about 2 MB for them.
_PARSED = 1 << 13


@functools.lru_cache(maxsize=_PARSED)
def parse_network(value: str | Network | tuple[int, int], version: int = 0) -> Network:
    """``ipaddress.ip_network(value, strict=False)``, remembered; ``(address, prefix length)``
    ints need their ``version``."""
    if version == 4:
        return ipaddress.IPv4Network(value)
    if version == 6:
        return ipaddress.IPv6Network(value)
    return ipaddress.ip_network(value, strict=False)


class _Family(Generic[T]):
    __slots__ = ("bits", "lengths", "owned", "tables")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.tables: dict[int, dict[int, T]] = {}
        self.lengths: list[int] = []  # descending
        self.owned: dict[T, set[tuple[int, int]]] = {}  # value -> its (prefix length, key)

    def insert(self, addr: int, plen: int, value: T) -> None:
        t = self.tables.get(plen)
        if t is None:
            t = self.tables[plen] = {}
            self.lengths = sorted(self.tables, reverse=True)
        key = addr >> (self.bits - plen)
        prev = t.get(key)
        if prev is not None:
            self.owned[prev].discard((plen, key))
        t[key] = value
        self.owned.setdefault(value, set()).add((plen, key))

    def remove_where(self, value: T) -> None:
        for plen, key in self.owned.pop(value, ()):
            t = self.tables[plen]
            del t[key]
            if not t:
                del self.tables[plen]
        self.lengths = sorted(self.tables, reverse=True)

    def lookup(self, addr: int) -> T | None:
        bits = self.bits
        for plen in self.lengths:
            v = self.tables[plen].get(addr >> (bits - plen))
            if v is not None:
                return v
        return None

    def entries(self, value: T) -> list[tuple[int, int]]:
        return [(key << (self.bits - plen), plen) for plen, key in self.owned.get(value, ())]


class AllowedIPs(Generic[T]):
    """Map networks to values (peers); a network given twice belongs to the last one."""

    def __init__(self) -> None:
        self._v4: _Family[T] = _Family(32)
        self._v6: _Family[T] = _Family(128)

    def insert(self, network: Network | str, value: T) -> None:
        net = ipaddress.ip_network(network, strict=False)
        fam = self._v4 if net.version == 4 else self._v6
        fam.insert(int(net.network_address), net.prefixlen, value)

    def remove_value(self, value: T) -> None:
        self._v4.remove_where(value)
        self._v6.remove_where(value)

    def replace(self, value: T, networks: Iterable[Network | str]) -> None:
        self.remove_value(value)
        for n in networks:
            self.insert(n, value)

    def networks(self, value: T) -> list[Network]:
        out = [parse_network(e, 4) for e in self._v4.entries(value)]
        out += [parse_network(e, 6) for e in self._v6.entries(value)]
        return sorted(out, key=lambda n: (n.version, n.network_address, n.prefixlen))

    def lookup_v4(self, addr: int) -> T | None:
        return self._v4.lookup(addr)

    def lookup_v6(self, addr: int) -> T | None:
        return self._v6.lookup(addr)

    def lookup(self, address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> T | None:
        a = ipaddress.ip_address(address)
        return self.lookup_v4(int(a)) if a.version == 4 else self.lookup_v6(int(a))

    def lookup_packet_dst(self, pkt: bytes | memoryview) -> T | None:
        """The peer for an IP packet's destination; None for non-IP or unrouted."""
        if not pkt:
            return None
        v = pkt[0] >> 4
        if v == 4 and len(pkt) >= 20:
            return self._v4.lookup(int.from_bytes(pkt[16:20], "big"))
        if v == 6 and len(pkt) >= 40:
            return self._v6.lookup(int.from_bytes(pkt[24:40], "big"))
        return None
