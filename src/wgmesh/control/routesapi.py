"""The routes part of the admin API (``/v1/admin/routes``) and of the node's report.

``GET /v1/admin/routes`` lists every node that advertises or was approved for a route:
what it advertises, what an admin approved, what carries traffic (``enabled``: admin or
``autoApprovers``) and which prefixes it is the primary router of.
``POST /v1/admin/routes/{node}/approve`` and ``.../reject`` take ``{"routes": [CIDR...]}``
and are audited (``routes.approve``, ``routes.reject``) by the store.
"""

from __future__ import annotations

from typing import Any

from wgmesh.control.errors import BadRequest
from wgmesh.control.routes import parse_routes
from wgmesh.control.world import World

__all__ = ["routes_field", "routes_table"]


def routes_field(d: dict[str, Any]) -> list[str] | None:
    """The ``routes`` list of a request body (None when absent); BadRequest if malformed."""
    if "routes" not in d:
        return None
    raw = d["routes"]
    if not isinstance(raw, list):
        raise BadRequest("routes: must be a list of CIDRs")
    try:
        return parse_routes(raw)
    except ValueError as e:
        raise BadRequest(f"routes: {e}") from None


def routes_table(world: World) -> list[dict[str, Any]]:
    """One row per node with routes, as this replica's world sees it."""
    out = []
    for nid, rec in sorted(world.nodes.items()):
        if not (rec.advertised_routes or rec.approved_routes):
            continue
        enabled = world.routers.get(nid, ())
        out.append({"id": nid, "name": rec.name, "online": rec.online,
                    "advertised": list(rec.advertised_routes),
                    "approved": list(rec.approved_routes), "enabled": list(enabled),
                    "primary": [r for r in enabled
                                if world.primaries.primary.get(r) == nid]})
    return out
