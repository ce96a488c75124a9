"""Coordination service: registration, netmap streams, ACL policy, audit trail.

Public pieces: :class:`ControlServer` (aiohttp), :class:`ControlClient`
(requests), :func:`open_store` and the :class:`Store` interface (SQLite by
default, PostgreSQL for replicas). Lazy (PEP 562): importing a pure part such
as :mod:`wgmesh.control.world` loads neither aiohttp nor requests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wgmesh.control.errors import ControlAPIError, ControlError

if TYPE_CHECKING:
    from wgmesh.control.client import Backoff, ControlClient, Registered
    from wgmesh.control.server import ControlServer
    from wgmesh.control.store import Store, open_store

__all__ = ["Backoff", "ControlAPIError", "ControlClient", "ControlError", "ControlServer",
           "Registered", "Store", "open_store"]


def __getattr__(name: str) -> Any:
    if name in ("Backoff", "ControlClient", "Registered"):
        from wgmesh.control import client

        return getattr(client, name)
    if name == "ControlServer":
        from wgmesh.control.server import ControlServer

        return ControlServer
    if name in ("Store", "open_store"):
        from wgmesh.control import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
