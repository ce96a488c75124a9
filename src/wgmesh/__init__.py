"""wgmesh: Tailscale-style WireGuard meshes that hand the fast path to the kernel.

Public API: :class:`Lab` (network-namespace experiments), :class:`Key` /
:class:`PrivateKey`; the node, control and relay servers join as they land.
"""

from wgmesh.errors import WgmeshError
from wgmesh.keys import Key, PrivateKey
from wgmesh.lab import Lab

__all__ = ["Key", "Lab", "PrivateKey", "WgmeshError"]
__version__ = "0.1.0"
