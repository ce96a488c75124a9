"""The one interface both data planes implement: kernel (netlink) and userspace (Python).

The node only speaks this interface and never asks which implementation it
has: whatever differs between data planes (how the packet filter is enforced,
how disco/STUN and relayed WireGuard share the WireGuard port, the traversal
profile that suits that port, the keepalive) is a member of :class:`Backend`,
so a third backend needs no change to the node. Peers are given as the
*desired state*; a backend applies the difference, so a netmap delta that
changes one peer costs one peer's worth of work.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import attrs

from wgmesh.errors import WgmeshError
from wgmesh.keys import Key, PrivateKey
from wgmesh.wireguard.allowedips import parse_network

if TYPE_CHECKING:
    import asyncio

    from wgmesh.netmap import FilterRule
    from wgmesh.traversal import TraversalConfig, _Relay

__all__ = [
    "DEFAULT_MTU",
    "Backend",
    "BackendError",
    "InterfaceConfig",
    "PeerConfig",
    "PeerDiff",
    "PeerStats",
    "Port",
    "diff_peers",
    "routes_for",
]

DEFAULT_MTU = 1420
Addr = tuple[str, int]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class BackendError(WgmeshError):
    """A backend cannot do what was asked (missing module, no TUN, no root, ...)."""


def _networks(values: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    return tuple(sorted({parse_network(v) for v in values},
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
    """Pure diff of peer sets, shared by both backends.

    A desired peer without an endpoint keeps the one it has: the data plane owns
    endpoints (traversal moves them, WireGuard roams them to a packet's source), so a
    netmap change never counts, or writes, a peer whose only difference is where the
    data plane put it."""
    want = {p.public_key: p for p in desired}
    add: list[PeerConfig] = []
    update: list[PeerConfig] = []
    for k, p in want.items():
        if (cur := current.get(k)) is None:
            add.append(p)
        elif p.endpoint is None:
            # Compared field by field, not through a copy with the endpoint filled in:
            # at 500 peers the copies (their converters re-parse every address) were
            # most of a one-peer change's diff.
            if any(getattr(cur, f) != getattr(p, f) for f in _ALL_BUT_ENDPOINT):
                update.append(attrs.evolve(p, endpoint=cur.endpoint))
        elif cur != p:
            update.append(p)
    remove = tuple(k for k in current if k not in want)
    return PeerDiff(tuple(add), tuple(update), remove)


_ALL_BUT_ENDPOINT = tuple(f.name for f in attrs.fields(PeerConfig)
                          if f.name not in ("public_key", "endpoint"))


def routes_for(peers: Iterable[PeerConfig], addresses: Iterable[IPInterface]) -> set[IPNetwork]:
    """Prefixes that need a route via the interface: allowed IPs not already inside an
    interface address's connected prefix (subnet routes). Default routes (``/0``) are left out: sending
    everything into the tunnel needs policy routing on the fwmark, the caller's choice."""
    connected = [a.network for a in addresses]
    need: set[IPNetwork] = set()
    for p in peers:
        for net in p.allowed_ips:
            if net.prefixlen == 0:
                continue
            if any(c.version == net.version and net.subnet_of(c) for c in connected):  # type: ignore[arg-type]
                continue
            need.add(net)
    return need


class Port(Protocol):
    """How disco/STUN and relayed WireGuard share one backend's WireGuard port: what the
    node's data plane drives for traversal. Called on the node's asyncio loop thread, and
    calls its callbacks there."""

    def start(self, on_datagram: Callable[[bytes, Addr], None],
              on_wireguard_for_relay: Callable[[Key, bytes], None]) -> None:
        """Hand datagrams on the port that are not WireGuard (STUN, disco) to
        ``on_datagram``, and a relayed peer's outgoing WireGuard packets to
        ``on_wireguard_for_relay``."""

    def send(self, data: bytes, addr: Addr) -> None:
        """Send a datagram (STUN, disco) from the WireGuard port."""

    def use_relay(self, key: Key) -> None:
        """Carry ``key``'s WireGuard packets through the relay."""

    def use_direct(self, key: Key, addr: Addr, handshake: bool = False) -> None:
        """Point the peer at ``addr``; ``handshake``: make WireGuard handshake on it now."""

    def use_socket(self, key: Key, send: Callable[[bytes], None]) -> None:
        """Carry ``key``'s WireGuard packets out through ``send`` (a port-search socket's
        path). Only asked of a backend whose traversal profile has ``many_ports``."""

    def inject(self, key: Key, data: bytes) -> None:
        """A WireGuard packet from ``key`` that came another way (relay, port search)."""

    def seen_endpoint(self, endpoint: Addr | None, path: str) -> Addr | _Relay | None:
        """The stats endpoint as traversal sees it: an address, or RELAY."""

    def close(self) -> None:
        """Stop delivering and release what the port holds."""


@runtime_checkable
class Backend(Protocol):
    """A WireGuard interface under wgmesh's control (see the module docstring)."""

    name: str
    kind: str  # "kernel" or "userspace": reported (status, logs), never branched on

    @property
    def keepalive(self) -> int:
        """The persistent keepalive (seconds, 0: off) the node gives every peer."""

    @property
    def traversal(self) -> TraversalConfig:
        """The traversal profile that suits this data plane's port."""

    def set_filter(self, rules: Sequence[FilterRule]) -> None:
        """Enforce the netmap's inbound rules on the interface: a flow a peer starts is
        dropped unless a rule allows it; replies to our own flows pass.

        May be called before :meth:`up`, and the node does so, so no peer is ever
        configured without its filter. Fails closed: raises :class:`BackendError` when
        the rules cannot be put in place (the previous ones then stay)."""

    def up(self, config: InterfaceConfig) -> None:
        """Create (or adopt) the interface, set key, port, addresses, MTU, and bring it up."""

    def set_mtu(self, mtu: int) -> None:
        """Change the running interface's MTU (a peer's path turned out narrower)."""

    def down(self) -> None:
        """Destroy the interface, remove its filter and release every resource."""

    @property
    def listen_port(self) -> int:
        """The UDP port actually bound (the kernel picks one when 0 was asked)."""

    def open_port(self, loop: asyncio.AbstractEventLoop) -> Port:
        """The :class:`Port` traversal drives, once the interface is up; it delivers its
        callbacks on ``loop``."""

    def set_peers(self, desired: Sequence[PeerConfig]) -> PeerDiff:
        """Make the peer set equal to ``desired``; touch only what differs."""

    def set_endpoint(self, key: Key, endpoint: tuple[str, int]) -> None:
        """Move one peer's endpoint (relay bridge <-> direct) without a restart."""

    def stats(self) -> dict[Key, PeerStats]:
        """Per-peer counters and handshake times, read from the data plane. Safe to call
        from any thread: the node reads them off its loop (a dump of 500 kernel peers is
        slow)."""


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
