"""The one interface both data planes implement: kernel (netlink) and userspace (Python).

The node agent only speaks this interface. Peers are given as the *desired
state*; a backend applies the difference, so a netmap delta that changes one
peer costs one peer's worth of work.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import attrs

from wgmesh.errors import WgmeshError
from wgmesh.keys import Key, PrivateKey

__all__ = [
    "DEFAULT_MTU",
    "Backend",
    "BackendError",
    "InterfaceConfig",
    "PeerConfig",
    "PeerDiff",
    "PeerStats",
    "diff_peers",
]

DEFAULT_MTU = 1420

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class BackendError(WgmeshError):
    """A backend cannot do what was asked (missing module, no TUN, no root, ...)."""


def _networks(values: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    return tuple(sorted({ipaddress.ip_network(v, strict=False) for v in values},
                        key=lambda n: (n.version, n.network_address, n.prefixlen)))


def _endpoint(value: tuple[str, int] | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, port = value
    return (str(ipaddress.ip_address(host)), int(port))


@attrs.frozen
class PeerConfig:
    """What a peer should look like. Equality drives the diff."""

    public_key: Key
    allowed_ips: tuple[IPNetwork, ...] = attrs.field(default=(), converter=_networks)
    endpoint: tuple[str, int] | None = attrs.field(default=None, converter=_endpoint)
    persistent_keepalive: int = 0
    preshared_key: bytes | None = attrs.field(default=None, repr=False)


@attrs.frozen
class PeerStats:
    """What the data plane reports about a peer."""

    public_key: Key
    endpoint: tuple[str, int] | None
    last_handshake: float | None  # unix time, None if never
    rx_bytes: int
    tx_bytes: int
    allowed_ips: tuple[IPNetwork, ...] = ()
    persistent_keepalive: int = 0


@attrs.frozen
class InterfaceConfig:
    name: str
    private_key: PrivateKey = attrs.field(repr=False)
    listen_port: int = 0
    addresses: tuple[IPInterface, ...] = attrs.field(
        default=(), converter=lambda vs: tuple(ipaddress.ip_interface(v) for v in vs)
    )
    mtu: int = DEFAULT_MTU
    fwmark: int = 0


@attrs.frozen
class PeerDiff:
    """The minimal set of changes that turns ``current`` into ``desired``."""

    add: tuple[PeerConfig, ...]
    update: tuple[PeerConfig, ...]
    remove: tuple[Key, ...]

    def __bool__(self) -> bool:
        return bool(self.add or self.update or self.remove)


def diff_peers(current: Mapping[Key, PeerConfig], desired: Sequence[PeerConfig]) -> PeerDiff:
    """Pure diff of peer sets, shared by both backends."""
    want = {p.public_key: p for p in desired}
    add = tuple(p for k, p in want.items() if k not in current)
    update = tuple(p for k, p in want.items() if k in current and current[k] != p)
    remove = tuple(k for k in current if k not in want)
    return PeerDiff(add, update, remove)


@runtime_checkable
class Backend(Protocol):
    """A WireGuard interface under wgmesh's control."""

    name: str
    kind: str  # "kernel" or "userspace"

    def up(self, config: InterfaceConfig) -> None:
        """Create (or adopt) the interface, set key, port, addresses, MTU, and bring it up."""

    def down(self) -> None:
        """Destroy the interface and release every resource."""

    @property
    def listen_port(self) -> int:
        """The UDP port actually bound (the kernel picks one when 0 was asked)."""

    def set_peers(self, desired: Sequence[PeerConfig]) -> PeerDiff:
        """Make the peer set equal to ``desired``; touch only what differs."""

    def set_endpoint(self, key: Key, endpoint: tuple[str, int]) -> None:
        """Move one peer's endpoint (relay bridge <-> direct) without a restart."""

    def stats(self) -> dict[Key, PeerStats]:
        """Per-peer counters and handshake times, read from the data plane."""


def kernel_wireguard_available() -> tuple[bool, str]:
    """Can this host create an in-kernel WireGuard interface? Returns (ok, why).

    Tries the real thing (``ip link add type wireguard``) in a throwaway namespace,
    because a loadable module, a built-in one and a missing one look alike from
    userspace until you ask the kernel.
    """
    import secrets
    import subprocess

    ns = f"wgmprobe{secrets.token_hex(3)}"
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        return False, f"cannot create a network namespace to probe ({e})"
    try:
        cp = subprocess.run(["ip", "-n", ns, "link", "add", "wgprobe", "type", "wireguard"],
                            capture_output=True, text=True)
        if cp.returncode == 0:
            return True, "the kernel created a wireguard link"
        return False, f"kernel refused a wireguard link: {cp.stderr.strip() or cp.returncode}"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
