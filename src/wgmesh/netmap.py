"""The netmap: everything one node knows about its mesh, and how it changes.

Control sends a node one full :class:`Netmap`, then only :class:`NetmapDelta`
messages; :func:`apply` folds a delta into a map. Both ends share this module,
so the wire format is defined exactly once: one JSON object per line, tagged by
``"type"`` (``netmap`` | ``delta`` | ``keepalive``), see :func:`encode` and
:func:`decode`.

Conventions: keys are WireGuard base64; times are Unix seconds as floats;
``0`` means "never" for ``key_expiry`` and "none" for ``home_relay`` (a relay
region id, as in Tailscale's DERP map). Peers are keyed by their stable node
id, so a key rotation is an upsert of the same id with a new ``node_key``.

Everything here is pure: no I/O, no clock. Decoding validates every field and
raises :class:`NetmapFormatError` (a ``ValueError``) on anything malformed.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs

from wgmesh.errors import WgmeshError
from wgmesh.keys import Key, KeyFormatError

__all__ = [
    "CAPABILITIES",
    "CAP_FILE_SEND",
    "Endpoint",
    "FilterRule",
    "Keepalive",
    "Message",
    "Netmap",
    "NetmapDelta",
    "NetmapFormatError",
    "NodeInfo",
    "Peer",
    "PeerChange",
    "RelayMap",
    "RelayNode",
    "RelayRegion",
    "apply",
    "check_domain",
    "decode",
    "dumps",
    "encode",
    "from_json",
    "packet_allowed",
    "relay_map_from_json",
    "to_json",
]

#: A peer holding this capability on a node may send that node files (``wgmesh.drop.server``).
CAP_FILE_SEND = "file-send"
#: Every capability the policy language knows; unknown names are rejected.
CAPABILITIES = frozenset({CAP_FILE_SEND})

PROTOS = ("any", "tcp", "udp", "icmp")
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_TOKEN_RE = re.compile(r"^[a-z0-9][a-z0-9:_.-]{0,62}$")
_MAX_LIST = 100_000


class NetmapFormatError(WgmeshError, ValueError):
    """A netmap message does not follow the wire format."""


# --------------------------------------------------------------------- models


@attrs.frozen
class Endpoint:
    """One address a peer may be reachable at. ``kind``: local | stun | portmap | ..."""

    ip: str
    port: int
    kind: str = "stun"

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    @classmethod
    def parse(cls, text: str, kind: str = "stun") -> Endpoint:
        """``1.2.3.4:5`` or ``[2001:db8::1]:5``."""
        host, sep, port = text.rpartition(":")
        if not sep:
            raise NetmapFormatError(f"endpoint {text!r} lacks a port")
        return _endpoint({"ip": host.strip("[]"), "port": _int_of(port, text), "kind": kind},
                         "endpoint")

    @classmethod
    def from_json(cls, obj: Any) -> Endpoint:
        """Validate ``{"ip", "port", "kind"}``; :class:`NetmapFormatError` if malformed."""
        return _endpoint(obj, "endpoint")


@attrs.frozen
class NodeInfo:
    """The node's own identity, as control assigned it."""

    id: int
    name: str
    node_key: Key
    disco_key: Key
    ipv4: str
    ipv6: str
    tags: tuple[str, ...] = ()
    key_expiry: float = 0.0
    #: False while the node waits for an admin's approval (it then has no peers).
    approved: bool = True

    @property
    def addresses(self) -> tuple[str, str]:
        return (self.ipv4, self.ipv6)

    def expired(self, now: float) -> bool:
        return 0 < self.key_expiry <= now

    @classmethod
    def from_json(cls, obj: Any) -> NodeInfo:
        return _nodeinfo(_dict(obj, "node"), "node")


@attrs.frozen
class Peer:
    """A peer this node may talk to. ``caps``: what the peer may do *to this node*."""

    id: int
    name: str
    node_key: Key
    disco_key: Key
    ipv4: str
    ipv6: str
    allowed_ips: tuple[str, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    home_relay: int = 0
    online: bool = False
    last_seen: float = 0.0
    key_expiry: float = 0.0
    tags: tuple[str, ...] = ()
    caps: tuple[str, ...] = ()
    #: Networks behind this peer it routes for us: approved subnet routes it is the primary
    #: router of, and ``/0`` if it is an exit node. A node uses them only if it accepts
    #: routes (or picked this exit node); absent on the wire when empty.
    routes: tuple[str, ...] = ()


#: The fields a :class:`PeerChange` can carry: the ones that change often.
PATCH_FIELDS = ("endpoints", "home_relay", "online", "last_seen", "key_expiry")


@attrs.frozen
class PeerChange:
    """A small change to a known peer; ``None`` means "unchanged"."""

    id: int
    endpoints: tuple[Endpoint, ...] | None = None
    home_relay: int | None = None
    online: bool | None = None
    last_seen: float | None = None
    key_expiry: float | None = None

    def apply_to(self, peer: Peer) -> Peer:
        changed = {f: getattr(self, f) for f in PATCH_FIELDS if getattr(self, f) is not None}
        return attrs.evolve(peer, **changed) if changed else peer


@attrs.frozen
class RelayNode:
    """One relay server. ``stun_host`` empty means the URL's host; ``stun_port`` 0: no STUN.

    ``key``: the relay's public key; nodes talk to the relay only once it has proved it
    (``None``: the relay proves whichever key it names, which pins nothing).
    """

    name: str
    url: str
    stun_port: int = 3478
    stun_host: str = ""
    key: Key | None = None

    @property
    def stun_address(self) -> tuple[str, int] | None:
        if not self.stun_port:
            return None
        return (self.stun_host or urlsplit(self.url).hostname or "", self.stun_port)


@attrs.frozen
class RelayRegion:
    region_id: int
    code: str
    name: str = ""
    nodes: tuple[RelayNode, ...] = ()


@attrs.frozen
class RelayMap:
    """Relay regions by id; a node's ``home_relay`` names one of them."""

    regions: tuple[RelayRegion, ...] = ()

    def region(self, region_id: int) -> RelayRegion | None:
        return next((r for r in self.regions if r.region_id == region_id), None)


@attrs.frozen
class FilterRule:
    """Inbound packets from ``src`` CIDRs to ``dst`` CIDRs on ``ports`` are accepted.

    Rules are compiled by control for one node (``dst`` are that node's own
    addresses); anything no rule accepts is dropped. ``caps`` are capabilities
    the sources hold on this node (e.g. :data:`CAP_FILE_SEND`).
    """

    src: tuple[str, ...]
    dst: tuple[str, ...]
    ports: tuple[tuple[int, int], ...] = ((0, 65535),)
    proto: str = "any"
    caps: tuple[str, ...] = ()

    def matches(self, src_ip: str, dst_ip: str, proto: str, port: int) -> bool:
        if self.proto not in ("any", proto):
            return False
        if not any(lo <= port <= hi for lo, hi in self.ports):
            return False
        return _in_any(src_ip, self.src) and _in_any(dst_ip, self.dst)


def _in_any(ip: str, cidrs: Iterable[str]) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr in ipaddress.ip_network(c, strict=False) for c in cidrs)


def packet_allowed(rules: Iterable[FilterRule], src_ip: str, dst_ip: str,
                   proto: str = "tcp", port: int = 0) -> bool:
    """Default deny: true only if some rule accepts the packet."""
    return any(r.matches(src_ip, dst_ip, proto, port) for r in rules)


@attrs.frozen
class Netmap:
    """One node's complete view at sequence ``seq``. Treat ``peers`` as read-only."""

    seq: int
    self_node: NodeInfo
    peers: Mapping[int, Peer] = attrs.field(factory=dict)
    relay_map: RelayMap = RelayMap()
    filter: tuple[FilterRule, ...] = ()
    policy_version: int = 0
    #: The mesh lock's head hash (hex) as control stores it; "" while the mesh is not
    #: locked. Only a hint to fetch the chain: nodes trust the chain, never this field.
    lock_head: str = ""
    #: The mesh DNS domain (``NAME.DOMAIN``), a control setting; "" for the default.
    domain: str = ""

    def peer_by_key(self, key: Key) -> Peer | None:
        return next((p for p in self.peers.values() if p.node_key == key), None)

    def peer_by_ip(self, ip: str) -> Peer | None:
        return next((p for p in self.peers.values() if ip in (p.ipv4, p.ipv6)), None)

    def peer_has_cap(self, peer: Peer, cap: str) -> bool:
        """May ``peer`` use capability ``cap`` on this node?"""
        return cap in peer.caps

    def rows(self) -> list[dict[str, Any]]:
        """One row per peer, for tables (text and Jupyter)."""
        return [{"peer": p.name, "ipv4": p.ipv4, "key": p.node_key.short(),
                 "online": p.online, "home_relay": p.home_relay or None,
                 "endpoints": " ".join(str(e) for e in p.endpoints) or None,
                 "caps": ",".join(p.caps) or None}
                for p in sorted(self.peers.values(), key=lambda p: p.name)]

    def __str__(self) -> str:
        from wgmesh.display import text_table

        me = self.self_node
        return (f"netmap seq {self.seq} for {me.name} {me.ipv4}: {len(self.peers)} peer(s), "
                f"{len(self.filter)} filter rule(s)\n" + text_table(self.rows(), _NETMAP_COLUMNS))

    def _repr_html_(self) -> str:
        from wgmesh.display import html_table

        me = self.self_node
        return html_table(self.rows(), _NETMAP_COLUMNS,
                          caption=f"netmap seq {self.seq} for {me.name} {me.ipv4}")


_NETMAP_COLUMNS = ["peer", "ipv4", "key", "online", "home_relay", "endpoints", "caps"]


@attrs.frozen
class NetmapDelta:
    """What changed since the previous message; empty fields mean "no change"."""

    seq: int
    peers_upsert: tuple[Peer, ...] = ()
    peers_removed: tuple[int, ...] = ()
    peers_changed: tuple[PeerChange, ...] = ()
    self_node: NodeInfo | None = None
    relay_map: RelayMap | None = None
    filter: tuple[FilterRule, ...] | None = None
    policy_version: int | None = None
    lock_head: str | None = None

    def is_empty(self) -> bool:
        return not (self.peers_upsert or self.peers_removed or self.peers_changed) and all(
            v is None for v in (self.self_node, self.relay_map, self.filter,
                                self.policy_version, self.lock_head))


@attrs.frozen
class Keepalive:
    """Sent on idle streams; ``seq`` is the last sequence the stream delivered."""

    seq: int


Message = Netmap | NetmapDelta | Keepalive


def apply(netmap: Netmap, delta: NetmapDelta) -> Netmap:
    """The map after ``delta``. Stale or repeated deltas (``seq`` not newer) change nothing."""
    if delta.seq <= netmap.seq:
        return netmap
    peers = dict(netmap.peers)
    for pid in delta.peers_removed:
        peers.pop(pid, None)
    for p in delta.peers_upsert:
        peers[p.id] = p
    for c in delta.peers_changed:
        if c.id in peers:
            peers[c.id] = c.apply_to(peers[c.id])
    return Netmap(
        seq=delta.seq,
        self_node=delta.self_node or netmap.self_node,
        peers=peers,
        relay_map=netmap.relay_map if delta.relay_map is None else delta.relay_map,
        filter=netmap.filter if delta.filter is None else delta.filter,
        policy_version=(netmap.policy_version if delta.policy_version is None
                        else delta.policy_version),
        lock_head=netmap.lock_head if delta.lock_head is None else delta.lock_head,
        domain=netmap.domain,
    )


# ---------------------------------------------------------------- JSON codec


def _endpoint_json(e: Endpoint) -> dict[str, Any]:
    return {"ip": e.ip, "port": e.port, "kind": e.kind}


def _node_json(n: NodeInfo) -> dict[str, Any]:
    return {"id": n.id, "name": n.name, "node_key": n.node_key.b64(),
            "disco_key": n.disco_key.b64(), "ipv4": n.ipv4, "ipv6": n.ipv6,
            "tags": list(n.tags), "key_expiry": n.key_expiry,
            **({} if n.approved else {"approved": False})}


def _peer_json(p: Peer) -> dict[str, Any]:
    return {"id": p.id, "name": p.name, "node_key": p.node_key.b64(),
            "disco_key": p.disco_key.b64(), "ipv4": p.ipv4, "ipv6": p.ipv6,
            "allowed_ips": list(p.allowed_ips),
            "endpoints": [_endpoint_json(e) for e in p.endpoints],
            "home_relay": p.home_relay, "online": p.online, "last_seen": p.last_seen,
            "key_expiry": p.key_expiry, "tags": list(p.tags), "caps": list(p.caps),
            **({"routes": list(p.routes)} if p.routes else {})}


def _change_json(c: PeerChange) -> dict[str, Any]:
    out: dict[str, Any] = {"id": c.id}
    for f in PATCH_FIELDS:
        v = getattr(c, f)
        if v is not None:
            out[f] = [_endpoint_json(e) for e in v] if f == "endpoints" else v
    return out


def _relay_map_json(m: RelayMap) -> dict[str, Any]:
    return {"regions": [
        {"region_id": r.region_id, "code": r.code, "name": r.name,
         "nodes": [{"name": n.name, "url": n.url, "stun_port": n.stun_port,
                    "stun_host": n.stun_host, **({"key": n.key.b64()} if n.key else {})}
                   for n in r.nodes]}
        for r in m.regions]}


def _rule_json(r: FilterRule) -> dict[str, Any]:
    return {"src": list(r.src), "dst": list(r.dst), "ports": [list(p) for p in r.ports],
            "proto": r.proto, "caps": list(r.caps)}


def to_json(obj: Any) -> Any:
    """The JSON-ready form of any model here (messages carry a ``"type"`` tag)."""
    match obj:
        case Netmap():
            return {"type": "netmap", "seq": obj.seq, "self": _node_json(obj.self_node),
                    "peers": [_peer_json(p) for p in obj.peers.values()],
                    "relay_map": _relay_map_json(obj.relay_map),
                    "filter": [_rule_json(r) for r in obj.filter],
                    "policy_version": obj.policy_version,
                    **({"lock_head": obj.lock_head} if obj.lock_head else {}),
                    **({"domain": obj.domain} if obj.domain else {})}
        case NetmapDelta():
            out: dict[str, Any] = {"type": "delta", "seq": obj.seq}
            if obj.peers_upsert:
                out["peers_upsert"] = [_peer_json(p) for p in obj.peers_upsert]
            if obj.peers_removed:
                out["peers_removed"] = list(obj.peers_removed)
            if obj.peers_changed:
                out["peers_changed"] = [_change_json(c) for c in obj.peers_changed]
            if obj.self_node is not None:
                out["self"] = _node_json(obj.self_node)
            if obj.relay_map is not None:
                out["relay_map"] = _relay_map_json(obj.relay_map)
            if obj.filter is not None:
                out["filter"] = [_rule_json(r) for r in obj.filter]
            if obj.policy_version is not None:
                out["policy_version"] = obj.policy_version
            if obj.lock_head is not None:
                out["lock_head"] = obj.lock_head
            return out
        case Keepalive():
            return {"type": "keepalive", "seq": obj.seq}
        case Peer():
            return _peer_json(obj)
        case PeerChange():
            return _change_json(obj)
        case NodeInfo():
            return _node_json(obj)
        case Endpoint():
            return _endpoint_json(obj)
        case RelayMap():
            return _relay_map_json(obj)
        case FilterRule():
            return _rule_json(obj)
    raise TypeError(f"not a netmap model: {type(obj).__name__}")


def dumps(obj: Any) -> str:
    """Compact JSON text of a model (no trailing newline)."""
    return json.dumps(to_json(obj), separators=(",", ":"))


def encode(msg: Message) -> bytes:
    """One wire line: compact JSON and ``\\n``."""
    return dumps(msg).encode() + b"\n"


def decode(line: bytes | str) -> Message:
    """Parse one wire line; :class:`NetmapFormatError` if it is not a valid message."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise NetmapFormatError(f"not JSON: {e}") from None
    return from_json(obj)


def from_json(obj: Any) -> Message:
    """Validate a parsed message object (the inverse of :func:`to_json` on messages)."""
    d = _dict(obj, "message")
    kind = d.get("type")
    seq = _int(d, "seq", "message")
    if kind == "keepalive":
        return Keepalive(seq=seq)
    if kind == "netmap":
        return Netmap(
            seq=seq,
            self_node=_nodeinfo(_dict(d.get("self"), "self"), "self"),
            peers={p.id: p for p in (_peer(x, f"peers[{i}]")
                                     for i, x in enumerate(_list(d, "peers", "netmap")))},
            relay_map=_relay_map(d.get("relay_map", {"regions": []}), "relay_map"),
            filter=tuple(_rule(x, f"filter[{i}]")
                         for i, x in enumerate(_list(d, "filter", "netmap"))),
            policy_version=_int(d, "policy_version", "netmap"),
            lock_head=_lock_head(d, "netmap") if "lock_head" in d else "",
            domain=_domain(d, "netmap") if "domain" in d else "",
        )
    if kind == "delta":
        return NetmapDelta(
            seq=seq,
            peers_upsert=tuple(_peer(x, f"peers_upsert[{i}]") for i, x in
                               enumerate(_list(d, "peers_upsert", "delta", optional=True))),
            peers_removed=tuple(_int_val(x, f"peers_removed[{i}]") for i, x in
                                enumerate(_list(d, "peers_removed", "delta", optional=True))),
            peers_changed=tuple(_change(x, f"peers_changed[{i}]") for i, x in
                                enumerate(_list(d, "peers_changed", "delta", optional=True))),
            self_node=None if "self" not in d else _nodeinfo(_dict(d["self"], "self"), "self"),
            relay_map=None if "relay_map" not in d else _relay_map(d["relay_map"], "relay_map"),
            filter=None if "filter" not in d else tuple(
                _rule(x, f"filter[{i}]") for i, x in enumerate(_list(d, "filter", "delta"))),
            policy_version=(None if "policy_version" not in d
                            else _int(d, "policy_version", "delta")),
            lock_head=_lock_head(d, "delta") if "lock_head" in d else None,
        )
    raise NetmapFormatError(f"message: unknown type {kind!r}")


# -------------------------------------------------------------- validation


def _fail(path: str, what: str) -> NetmapFormatError:
    return NetmapFormatError(f"{path}: {what}")


def _dict(v: Any, path: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _fail(path, "must be an object")
    return v


def _list(d: dict[str, Any], key: str, path: str, optional: bool = False) -> list[Any]:
    if key not in d and optional:
        return []
    v = d.get(key)
    if not isinstance(v, list) or len(v) > _MAX_LIST:
        raise _fail(f"{path}.{key}", "must be a list")
    return v


def _int_val(v: Any, path: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _fail(path, f"must be an integer in [{lo}, {hi}]")
    return v


def _int_of(text: str, ctx: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        raise NetmapFormatError(f"endpoint {ctx!r}: bad port")
    return int(text)


def _int(d: dict[str, Any], key: str, path: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    return _int_val(d.get(key), f"{path}.{key}", lo, hi)


def _float(d: dict[str, Any], key: str, path: str) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise _fail(f"{path}.{key}", "must be a non-negative number")
    return float(v)


def _bool(d: dict[str, Any], key: str, path: str) -> bool:
    v = d.get(key)
    if not isinstance(v, bool):
        raise _fail(f"{path}.{key}", "must be true or false")
    return v


def _str(d: dict[str, Any], key: str, path: str, maxlen: int = 255) -> str:
    v = d.get(key)
    if not isinstance(v, str) or len(v) > maxlen:
        raise _fail(f"{path}.{key}", f"must be a string of at most {maxlen} characters")
    return v


def _domain(d: dict[str, Any], path: str) -> str:
    return check_domain(_str(d, "domain", path, 200), f"{path}.domain")


def check_domain(text: str, path: str = "domain") -> str:
    """``text`` if it is a DNS name of lowercase labels (the mesh domain), else an error."""
    if not all(_NAME_RE.match(label) for label in text.split(".")):
        raise _fail(path, f"{text!r} is not a DNS name of lowercase labels")
    return text


def _lock_head(d: dict[str, Any], path: str) -> str:
    v = _str(d, "lock_head", path, 64)
    if v and (len(v) != 64 or v.strip("0123456789abcdef")):
        raise _fail(f"{path}.lock_head", "must be 64 lowercase hex digits or empty")
    return v


def _key(d: dict[str, Any], key: str, path: str) -> Key:
    v = d.get(key)
    if not isinstance(v, str):
        raise _fail(f"{path}.{key}", "must be a base64 key")
    try:
        return Key(v)
    except KeyFormatError as e:
        raise _fail(f"{path}.{key}", str(e)) from None


def _ip(d: dict[str, Any], key: str, path: str, version: int | None = None) -> str:
    v = _str(d, key, path, 64)
    try:
        addr = ipaddress.ip_address(v)
    except ValueError:
        raise _fail(f"{path}.{key}", f"{v!r} is not an IP address") from None
    if version is not None and addr.version != version:
        raise _fail(f"{path}.{key}", f"must be an IPv{version} address")
    return str(addr)


def _cidr(v: Any, path: str) -> str:
    if not isinstance(v, str) or len(v) > 64:
        raise _fail(path, "must be a CIDR string")
    try:
        return str(ipaddress.ip_network(v, strict=False))
    except ValueError:
        raise _fail(path, f"{v!r} is not a CIDR") from None


def _tokens(d: dict[str, Any], key: str, path: str) -> tuple[str, ...]:
    out = []
    for i, v in enumerate(_list(d, key, path)):
        if not isinstance(v, str) or not _TOKEN_RE.match(v):
            raise _fail(f"{path}.{key}[{i}]", "must be a short lowercase name")
        out.append(v)
    return tuple(out)


def _name(d: dict[str, Any], key: str, path: str) -> str:
    v = _str(d, key, path, 63)
    if not _NAME_RE.match(v):
        raise _fail(f"{path}.{key}", f"{v!r} is not a DNS label")
    return v


def _endpoint(v: Any, path: str) -> Endpoint:
    d = _dict(v, path)
    kind = d.get("kind", "stun")
    if not isinstance(kind, str) or not _TOKEN_RE.match(kind):
        raise _fail(f"{path}.kind", "must be a short lowercase name")
    return Endpoint(ip=_ip(d, "ip", path), port=_int(d, "port", path, 1, 65535), kind=kind)


def _endpoints(d: dict[str, Any], key: str, path: str) -> tuple[Endpoint, ...]:
    return tuple(_endpoint(x, f"{path}.{key}[{i}]")
                 for i, x in enumerate(_list(d, key, path)))


def _nodeinfo(d: dict[str, Any], path: str) -> NodeInfo:
    return NodeInfo(id=_int(d, "id", path), name=_name(d, "name", path),
                    node_key=_key(d, "node_key", path), disco_key=_key(d, "disco_key", path),
                    ipv4=_ip(d, "ipv4", path, 4), ipv6=_ip(d, "ipv6", path, 6),
                    tags=_tokens(d, "tags", path), key_expiry=_float(d, "key_expiry", path),
                    approved=d.get("approved", True) is not False)


def _peer(v: Any, path: str) -> Peer:
    d = _dict(v, path)
    return Peer(id=_int(d, "id", path), name=_name(d, "name", path),
                node_key=_key(d, "node_key", path), disco_key=_key(d, "disco_key", path),
                ipv4=_ip(d, "ipv4", path, 4), ipv6=_ip(d, "ipv6", path, 6),
                allowed_ips=tuple(_cidr(x, f"{path}.allowed_ips[{i}]")
                                  for i, x in enumerate(_list(d, "allowed_ips", path))),
                endpoints=_endpoints(d, "endpoints", path),
                home_relay=_int(d, "home_relay", path, 0, 2**31),
                online=_bool(d, "online", path), last_seen=_float(d, "last_seen", path),
                key_expiry=_float(d, "key_expiry", path), tags=_tokens(d, "tags", path),
                caps=_tokens(d, "caps", path),
                routes=tuple(_cidr(x, f"{path}.routes[{i}]") for i, x in
                             enumerate(_list(d, "routes", path, optional=True))))


def _change(v: Any, path: str) -> PeerChange:
    d = _dict(v, path)
    return PeerChange(
        id=_int(d, "id", path),
        endpoints=_endpoints(d, "endpoints", path) if "endpoints" in d else None,
        home_relay=_int(d, "home_relay", path, 0, 2**31) if "home_relay" in d else None,
        online=_bool(d, "online", path) if "online" in d else None,
        last_seen=_float(d, "last_seen", path) if "last_seen" in d else None,
        key_expiry=_float(d, "key_expiry", path) if "key_expiry" in d else None)


def relay_map_from_json(v: Any) -> RelayMap:
    """Parse a relay map (the ``--relay-map`` file and admin API use this form)."""
    return _relay_map(v, "relay_map")


def _relay_map(v: Any, path: str) -> RelayMap:
    d = _dict(v, path)
    regions = []
    for i, r in enumerate(_list(d, "regions", path)):
        rp = f"{path}.regions[{i}]"
        rd = _dict(r, rp)
        nodes = []
        for j, n in enumerate(_list(rd, "nodes", rp)):
            np_ = f"{rp}.nodes[{j}]"
            nd = _dict(n, np_)
            url = _str(nd, "url", np_, 2048)
            if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
                raise _fail(f"{np_}.url", "must be an http(s) URL with a host")
            nodes.append(RelayNode(name=_str(nd, "name", np_, 63), url=url,
                                   stun_port=_int(nd, "stun_port", np_, 0, 65535)
                                   if "stun_port" in nd else 3478,
                                   stun_host=_str(nd, "stun_host", np_)
                                   if "stun_host" in nd else "",
                                   key=_key(nd, "key", np_) if "key" in nd else None))
        regions.append(RelayRegion(region_id=_int(rd, "region_id", rp, 1, 2**31),
                                   code=_str(rd, "code", rp, 32),
                                   name=_str(rd, "name", rp) if "name" in rd else "",
                                   nodes=tuple(nodes)))
    ids = [r.region_id for r in regions]
    if len(set(ids)) != len(ids):
        raise _fail(path, "region ids must be unique")
    return RelayMap(regions=tuple(sorted(regions, key=lambda r: r.region_id)))


def _rule(v: Any, path: str) -> FilterRule:
    d = _dict(v, path)
    ports = []
    for i, p in enumerate(_list(d, "ports", path)):
        if not isinstance(p, list) or len(p) != 2:
            raise _fail(f"{path}.ports[{i}]", "must be [first, last]")
        lo = _int_val(p[0], f"{path}.ports[{i}][0]", 0, 65535)
        hi = _int_val(p[1], f"{path}.ports[{i}][1]", lo, 65535)
        ports.append((lo, hi))
    proto = d.get("proto", "any")
    if proto not in PROTOS:
        raise _fail(f"{path}.proto", f"must be one of {', '.join(PROTOS)}")
    return FilterRule(
        src=tuple(_cidr(x, f"{path}.src[{i}]") for i, x in enumerate(_list(d, "src", path))),
        dst=tuple(_cidr(x, f"{path}.dst[{i}]") for i, x in enumerate(_list(d, "dst", path))),
        ports=tuple(ports), proto=proto, caps=_tokens(d, "caps", path))
