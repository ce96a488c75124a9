"""wgmesh: Tailscale-style WireGuard meshes that hand the fast path to the kernel.

Public API:

* :class:`Node` (sync, thread-safe, Jupyter-safe) and :class:`AsyncNode`: join a mesh;
* :class:`ControlServer`, :class:`RelayServer`: the coordination and relay services;
* :class:`Netmap`, :class:`Status`, :class:`Event`: what nodes know and report;
* :class:`Key`, :class:`PrivateKey`: X25519 keys (private ones never print);
* :class:`Lab`: network-namespace experiments with real NATs.

Every name loads on first use (PEP 562), so ``import wgmesh`` and the sans-I/O cores
(``wgmesh.stun``, ``wgmesh.netmap`` ...) stay free of nacl, asyncio drivers, the node and
the lab; the ``TYPE_CHECKING`` imports give type checkers the real classes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wgmesh.control.server import ControlServer
    from wgmesh.errors import WgmeshError
    from wgmesh.keys import Key, PrivateKey
    from wgmesh.lab import Lab
    from wgmesh.netmap import Netmap
    from wgmesh.node.api import AsyncNode, Node
    from wgmesh.node.events import Event
    from wgmesh.node.status import PeerStatus, PingResult, Status
    from wgmesh.relaynet.server import RelayServer

_WHERE = {
    "AsyncNode": "wgmesh.node.api",
    "ControlServer": "wgmesh.control.server",
    "Event": "wgmesh.node.events",
    "Key": "wgmesh.keys",
    "Lab": "wgmesh.lab",
    "Netmap": "wgmesh.netmap",
    "Node": "wgmesh.node.api",
    "PeerStatus": "wgmesh.node.status",
    "PingResult": "wgmesh.node.status",
    "PrivateKey": "wgmesh.keys",
    "RelayServer": "wgmesh.relaynet.server",
    "Status": "wgmesh.node.status",
    "WgmeshError": "wgmesh.errors",
}

__all__ = ["AsyncNode", "ControlServer", "Event", "Key", "Lab", "Netmap", "Node", "PeerStatus",
           "PingResult", "PrivateKey", "RelayServer", "Status", "WgmeshError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
