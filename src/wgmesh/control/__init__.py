"""Coordination service: registration, netmap streams, ACL policy, audit trail.

Public pieces: :class:`ControlServer` (aiohttp), :class:`ControlClient`
(requests), :func:`open_store` and the :class:`Store` interface (SQLite by
default, PostgreSQL for replicas). Import-light: the server's aiohttp stack is
only imported by :mod:`wgmesh.control.server`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wgmesh.control.client import Backoff, ControlClient, Registered
from wgmesh.control.errors import ControlAPIError, ControlError

if TYPE_CHECKING:
    from wgmesh.control.server import ControlServer
    from wgmesh.control.store import Store, open_store

__all__ = ["Backoff", "ControlAPIError", "ControlClient", "ControlError", "ControlServer",
           "Registered", "Store", "open_store"]


def __getattr__(name: str) -> Any:
    if name == "ControlServer":
        from wgmesh.control.server import ControlServer

        return ControlServer
    if name in ("Store", "open_store"):
        from wgmesh.control import store

        return getattr(store, name)
    raise AttributeError(name)
