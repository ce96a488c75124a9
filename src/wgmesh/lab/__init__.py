"""Disposable networks for experiments and tests: not part of the product.

Nothing in ``node``, ``control``, ``relaynet``, ``wireguard`` or ``drop`` imports this
package. ``Lab`` builds namespaces and real NATs; the submodules add NAT probing
(``natprobe``), a whole mesh (``mesh``), the connectivity grid (``grid``), the demo,
a traversal-only node (``traversal``), a static WireGuard helper (``wg``) and a peer
API on a plain WireGuard interface (``dropd``).
"""

from wgmesh.lab.network import (
    NAT_KINDS,
    TIME_SCALE,
    Host,
    Lab,
    LabError,
    NatKind,
    NatRouter,
    Process,
    clean_leftovers,
)

__all__ = ["NAT_KINDS", "TIME_SCALE", "Host", "Lab", "LabError", "NatKind", "NatRouter",
           "Process", "clean_leftovers"]
