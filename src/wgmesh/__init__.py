"""wgmesh: Tailscale-style WireGuard meshes that hand the fast path to the kernel.

Public API:

* :class:`Node` (sync, thread-safe, Jupyter-safe) and :class:`AsyncNode`: join a mesh;
* :class:`ControlServer`, :class:`RelayServer`: the coordination and relay services;
* :class:`Netmap`, :class:`Status`, :class:`Event`: what nodes know and report;
* :class:`Key`, :class:`PrivateKey`: X25519 keys (private ones never print);
* :class:`Lab`: network-namespace experiments with real NATs.
"""

from wgmesh.errors import WgmeshError
from wgmesh.keys import Key, PrivateKey
from wgmesh.lab.network import Lab
from wgmesh.netmap import Netmap
from wgmesh.node.api import AsyncNode, Node
from wgmesh.node.events import Event
from wgmesh.node.status import PeerStatus, PingResult, Status

__all__ = ["AsyncNode", "ControlServer", "Event", "Key", "Lab", "Netmap", "Node", "PeerStatus",
           "PingResult", "PrivateKey", "RelayServer", "Status", "WgmeshError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The servers pull in aiohttp; import them only when asked for.
    if name == "ControlServer":
        from wgmesh.control.server import ControlServer

        return ControlServer
    if name == "RelayServer":
        from wgmesh.relaynet.server import RelayServer

        return RelayServer
    raise AttributeError(name)
