"""What control stores, as immutable records, with their codecs: change-feed JSON and SQL rows.

Pure (no database driver), so the fan-out :class:`~wgmesh.control.world.World`
can read records without pulling in the SQL layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from wgmesh.control import addressing
from wgmesh.keys import Key
from wgmesh.netmap import Endpoint, NodeInfo, Peer

__all__ = ["AUTHKEY_COLUMNS", "NODE_COLUMNS", "ApiKeyRecord", "AuthKeyRecord", "Change",
           "NodeRecord", "Registration", "endpoints_json"]

#: The ``nodes`` columns that :meth:`NodeRecord.from_row` decodes, in its order.
NODE_COLUMNS = ("id, name, node_key, disco_key, addr_index, tags, created_at, key_expiry, "
                "endpoints, home_relay, online, last_seen, hostinfo, auth_key_id, name_assigned, "
                "ephemeral, approved, advertised_routes, approved_routes")
#: The ``auth_keys`` columns that :meth:`AuthKeyRecord.from_row` decodes, in its order.
AUTHKEY_COLUMNS = ("id, reusable, tags, created_at, expires_at, uses, revoked, description, "
                   "ephemeral, preapproved, created_by")


def endpoints_json(endpoints: Iterable[Endpoint]) -> list[dict[str, Any]]:
    return [{"ip": e.ip, "port": e.port, "kind": e.kind} for e in endpoints]


@attrs.frozen
class NodeRecord:
    """A node as control stores it: public keys and metadata only, never a private key.

    ``name_assigned``: an admin gave ``name`` (policy selectors match only such
    names); otherwise the node derived it from its hostname. ``ephemeral``: removed
    a grace period after it goes offline. ``approved``: false while the node waits
    for an admin (it then sees no peer and no peer sees it). ``advertised_routes``: the
    networks the node offers to route (its report); ``approved_routes``: those an admin
    approved (policy ``autoApprovers`` may approve more, see :mod:`wgmesh.control.routes`).
    """

    id: int
    name: str
    node_key: Key
    disco_key: Key
    addr_index: int
    ipv4: str
    ipv6: str
    tags: tuple[str, ...]
    created_at: float
    key_expiry: float
    endpoints: tuple[Endpoint, ...] = ()
    home_relay: int = 0
    online: bool = False
    last_seen: float = 0.0
    hostinfo: dict[str, Any] = attrs.field(factory=dict, hash=False)
    auth_key_id: str = ""
    name_assigned: bool = False
    ephemeral: bool = False
    approved: bool = True
    advertised_routes: tuple[str, ...] = ()
    approved_routes: tuple[str, ...] = ()

    def live(self, now: float) -> bool:
        return not (0 < self.key_expiry <= now)

    def active(self, now: float) -> bool:
        """In the mesh: approved and its key not expired (only then peers see it)."""
        return self.approved and self.live(now)

    def info(self) -> NodeInfo:
        return NodeInfo(id=self.id, name=self.name, node_key=self.node_key,
                        disco_key=self.disco_key, ipv4=self.ipv4, ipv6=self.ipv6,
                        tags=self.tags, key_expiry=self.key_expiry, approved=self.approved)

    def peer(self, caps: tuple[str, ...] = (), routes: tuple[str, ...] = ()) -> Peer:
        return Peer(id=self.id, name=self.name, node_key=self.node_key,
                    disco_key=self.disco_key, ipv4=self.ipv4, ipv6=self.ipv6,
                    allowed_ips=(f"{self.ipv4}/32", f"{self.ipv6}/128"),
                    endpoints=self.endpoints, home_relay=self.home_relay, online=self.online,
                    last_seen=self.last_seen, key_expiry=self.key_expiry, tags=self.tags,
                    caps=caps, routes=routes)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "node_key": self.node_key.b64(),
                "disco_key": self.disco_key.b64(), "addr_index": self.addr_index,
                "ipv4": self.ipv4, "ipv6": self.ipv6, "tags": list(self.tags),
                "created_at": self.created_at, "key_expiry": self.key_expiry,
                "endpoints": endpoints_json(self.endpoints),
                "home_relay": self.home_relay, "online": self.online,
                "last_seen": self.last_seen, "hostinfo": self.hostinfo,
                "auth_key_id": self.auth_key_id, "name_assigned": self.name_assigned,
                "ephemeral": self.ephemeral, "approved": self.approved,
                "advertised_routes": list(self.advertised_routes),
                "approved_routes": list(self.approved_routes)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NodeRecord:
        return cls(id=d["id"], name=d["name"], node_key=Key(d["node_key"]),
                   disco_key=Key(d["disco_key"]), addr_index=d["addr_index"], ipv4=d["ipv4"],
                   ipv6=d["ipv6"], tags=tuple(d["tags"]), created_at=d["created_at"],
                   key_expiry=d["key_expiry"],
                   endpoints=tuple(Endpoint(**e) for e in d["endpoints"]),
                   home_relay=d["home_relay"], online=d["online"], last_seen=d["last_seen"],
                   hostinfo=d["hostinfo"], auth_key_id=d["auth_key_id"],
                   name_assigned=d.get("name_assigned", False),
                   ephemeral=d.get("ephemeral", False), approved=d.get("approved", True),
                   advertised_routes=tuple(d.get("advertised_routes", ())),
                   approved_routes=tuple(d.get("approved_routes", ())))

    @classmethod
    def from_row(cls, r: Sequence[Any], ula_prefix: str) -> NodeRecord:
        """A row of :data:`NODE_COLUMNS`; the addresses follow from its index and the prefix."""
        v4, v6 = addressing.address_for(r[4], ula_prefix)
        return cls(id=r[0], name=r[1], node_key=Key(r[2]), disco_key=Key(r[3]),
                   addr_index=r[4], ipv4=v4, ipv6=v6, tags=tuple(json.loads(r[5])),
                   created_at=r[6], key_expiry=r[7],
                   endpoints=tuple(Endpoint(**e) for e in json.loads(r[8])),
                   home_relay=r[9], online=bool(r[10]), last_seen=r[11],
                   hostinfo=json.loads(r[12]), auth_key_id=r[13], name_assigned=bool(r[14]),
                   ephemeral=bool(r[15]), approved=bool(r[16]),
                   advertised_routes=tuple(json.loads(r[17])),
                   approved_routes=tuple(json.loads(r[18])))


@attrs.frozen
class AuthKeyRecord:
    """A key nodes register with (its secret is stored only as a hash).

    ``ephemeral``/``preapproved`` pass on to its nodes; ``created_by`` is the
    actor that made it, whose tag ownership its tags must keep having.
    """

    id: str
    reusable: bool
    tags: tuple[str, ...]
    created_at: float
    expires_at: float
    uses: int
    revoked: bool
    description: str
    ephemeral: bool = False
    preapproved: bool = False
    created_by: str = ""

    def to_json(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["tags"] = list(self.tags)
        return d

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> AuthKeyRecord:
        """A row of :data:`AUTHKEY_COLUMNS`."""
        return cls(id=r[0], reusable=bool(r[1]), tags=tuple(json.loads(r[2])), created_at=r[3],
                   expires_at=r[4], uses=r[5], revoked=bool(r[6]), description=r[7],
                   ephemeral=bool(r[8]), preapproved=bool(r[9]), created_by=r[10])


@attrs.frozen
class ApiKeyRecord:
    """An admin's or a relay's API key (its secret is stored only as a hash)."""

    id: str
    role: str
    created_at: float
    revoked: bool
    description: str

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class Change:
    """The new state of one entity. kind: node | node_removed | policy | relay_map."""

    seq: int
    kind: str
    entity: str
    data: str


@attrs.frozen
class Registration:
    """A registration request whose challenge proof the store checks and consumes."""

    node_key: Key
    disco_key: Key
    hostname: str
    challenge_id: str
    proof_hash: str
    auth_key: str | None = None
    rotate_from: Key | None = None
