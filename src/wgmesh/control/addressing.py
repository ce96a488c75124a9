"""Node addresses and names: one index per node gives both its IPv4 and IPv6.

IPv4 comes from 100.64.0.0/10 (CGNAT space, as Tailscale uses), IPv6 from a
random ULA /48 chosen once per network. Index ``n`` maps to ``100.64.0.0 + n``
and ``<ula>::<n>``, so the two stay paired and the row's index is all the
store must keep stable.
"""

from __future__ import annotations

import ipaddress
import re
import secrets

__all__ = ["CGNAT", "address_for", "dns_label", "new_ula_prefix", "next_index", "unique_name"]

CGNAT = ipaddress.ip_network("100.64.0.0/10")
_MAX_INDEX = CGNAT.num_addresses - 2


def new_ula_prefix() -> str:
    """A random fdXX:XXXX:XXXX::/48 (RFC 4193 global id)."""
    gid = secrets.token_bytes(5)
    net = ipaddress.IPv6Network((int.from_bytes(b"\xfd" + gid + b"\0" * 10, "big"), 48))
    return str(net)


def next_index(after: int) -> int:
    """The next usable index: skips host parts .0 and .255 that confuse some tools."""
    n = after + 1
    while n & 0xFF in (0, 255):
        n += 1
    if n > _MAX_INDEX:
        raise ValueError("address space exhausted")
    return n


def address_for(index: int, ula_prefix: str) -> tuple[str, str]:
    v4 = CGNAT.network_address + index
    v6 = ipaddress.IPv6Network(ula_prefix).network_address + index
    return str(v4), str(v6)


def dns_label(hostname: str) -> str:
    """A DNS-safe label from whatever hostname a node reports."""
    label = re.sub(r"[^a-z0-9-]+", "-", hostname.split(".")[0].lower()).strip("-")
    return label[:63].strip("-") or "node"


def unique_name(base: str, taken: set[str]) -> str:
    if base not in taken:
        return base
    n = 2
    while True:
        suffix = f"-{n}"
        cand = base[: 63 - len(suffix)].rstrip("-") + suffix
        if cand not in taken:
            return cand
        n += 1
