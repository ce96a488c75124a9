"""WireGuard data planes behind one interface: ``kernel`` (netlink) and ``userspace``."""

from wgmesh.wireguard.backend import (
    DEFAULT_MTU,
    Backend,
    BackendError,
    InterfaceConfig,
    PeerConfig,
    PeerStats,
)

__all__ = ["DEFAULT_MTU", "Backend", "BackendError", "InterfaceConfig", "PeerConfig", "PeerStats"]
