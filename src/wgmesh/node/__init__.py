"""A mesh node: ``AsyncNode``, its synchronous ``Node`` facade, and what they drive.

Submodules: ``api`` (the two classes), ``dataplane`` (traversal over a backend's
WireGuard port and the relay), ``netcheck``, ``state`` (the state dir), ``status`` and
``events`` (typed results), ``agent`` and ``localapi`` (``wgmesh up`` and its socket).
The classes load lazily so ``wgmesh.node.status`` stays light to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wgmesh.node.api import AsyncNode, Node

__all__ = ["AsyncNode", "Node"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from wgmesh.node import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
