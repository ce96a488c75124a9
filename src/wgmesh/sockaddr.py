"""A socket's own address as the host's interfaces list it.

A roam is noticed by comparing the addresses a connection goes out from with the ones
the host still has; ``getsockname`` gives IPv4-mapped (``::ffff:192.0.2.1``) and scoped
(``fe80::1%eth0``) forms that an interface listing never shows."""

from __future__ import annotations

import ipaddress

__all__ = ["plain_ip"]


def plain_ip(sockname_host: str) -> str:
    """``sockname_host`` with any IPv4 mapping and zone index taken off."""
    ip = ipaddress.ip_address(sockname_host.split("%")[0])
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped or ip)
