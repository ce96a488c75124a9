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

__all__ = ["CGNAT", "address_for", "dns_label", "name_prefix", "new_ula_prefix", "next_index",
           "unique_name", "unusable_endpoint"]

CGNAT = ipaddress.ip_network("100.64.0.0/10")
_MAX_INDEX = CGNAT.num_addresses - 2
_SUFFIX_MAX = 15  # "-" and up to 14 digits


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


def name_prefix(base: str) -> str:
    """What every name :func:`unique_name` derives from ``base`` starts with.

    Suffixing truncates ``base`` to stay within 63 characters, so the names
    already taken must be looked up by this prefix, not by ``base``.
    """
    return base[: 63 - _SUFFIX_MAX].rstrip("-")


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, else ``base-2``, ``base-3``, ... (truncated to a DNS label) not in ``taken``."""
    if base not in taken:
        return base
    n = 2
    while True:
        suffix = f"-{n}"
        cand = base[: 63 - len(suffix)].rstrip("-") + suffix
        if cand not in taken:
            return cand
        n += 1


def unusable_endpoint(ip: str, ula_prefix: str) -> str | None:
    """Why ``ip`` can never be a peer's endpoint (``None`` if it may be).

    Loopback, unspecified and multicast addresses reach no peer, and a tunnel
    address (the CGNAT range control assigns from, or this network's ULA
    prefix) would route WireGuard's own packets into WireGuard.
    """
    a = ipaddress.ip_address(ip)
    if a.version == 6 and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    if a.is_loopback or a.is_unspecified or a.is_multicast:
        return "a loopback, unspecified or multicast address"
    if a in CGNAT or a in ipaddress.ip_network(ula_prefix):
        return "a mesh tunnel address"
    return None
