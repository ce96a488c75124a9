"""Where a credential may be sent: shared by the control client and the relay's allow-list.

Bearer tokens, auth keys and relay credentials must not cross a network in the clear, so a
plain ``http://`` URL is accepted only when it points at loopback.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from wgmesh.errors import WgmeshError

__all__ = ["check_credential_url"]


def check_credential_url(url: str, what: str = "control") -> None:
    """Refuse a URL that would send credentials in the clear: ``http://`` off loopback."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme != "http" or not parts.hostname:
        raise WgmeshError(f"{what} URL {url!r}: expected https://HOST[:PORT]")
    host = parts.hostname
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise WgmeshError(f"refusing plain http:// to {what} at {host}: credentials would "
                          f"cross the network in the clear; use https:// "
                          f"(wgmesh control serve --tls-cert/--tls-key, or a TLS proxy)")
