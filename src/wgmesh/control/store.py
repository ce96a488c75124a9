"""Durable control state behind one :class:`Store` interface: SQLite (default) or PostgreSQL.

Every mutation is one transaction that also appends a row to ``changes`` (the
new state of the entity, under a global sequence number) and an entry to the
hash-chained ``audit`` log. Replicas learn what changed by reading ``changes``
after their high-water mark: that one path serves the writing replica, other
replicas (woken by PostgreSQL ``NOTIFY``) and a restarted server alike.

Writers are serialised (SQLite ``BEGIN IMMEDIATE``; a PostgreSQL transaction
advisory lock), so change sequence numbers commit in order and a reader can
never skip a change that commits late. Control writes are rare; this is cheap.

Stores are synchronous and not thread-safe: the server gives each one its own
thread. Schema changes are versioned migrations (:data:`MIGRATIONS`).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from wgmesh.control import addressing, credentials
from wgmesh.control.audit import GENESIS, AuditEntry, entry_hash
from wgmesh.control.errors import BadRequest, Conflict, ControlError, NotFound, Unauthorized
from wgmesh.control.policy import DEFAULT_POLICY, parse_policy
from wgmesh.keys import Key
from wgmesh.netmap import Endpoint, NodeInfo, Peer

__all__ = ["MIGRATIONS", "ApiKeyRecord", "AuthKeyRecord", "Change", "NodeRecord",
           "PostgresStore", "Registration", "SQLiteStore", "Store", "open_store"]

CHALLENGE_TTL_S = 60.0
ROLES = ("admin", "relay")


@attrs.frozen
class NodeRecord:
    """A node as control stores it: public keys and metadata only, never a private key."""

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

    def live(self, now: float) -> bool:
        return not (0 < self.key_expiry <= now)

    def info(self) -> NodeInfo:
        return NodeInfo(id=self.id, name=self.name, node_key=self.node_key,
                        disco_key=self.disco_key, ipv4=self.ipv4, ipv6=self.ipv6,
                        tags=self.tags, key_expiry=self.key_expiry)

    def peer(self, caps: tuple[str, ...] = ()) -> Peer:
        return Peer(id=self.id, name=self.name, node_key=self.node_key,
                    disco_key=self.disco_key, ipv4=self.ipv4, ipv6=self.ipv6,
                    allowed_ips=(f"{self.ipv4}/32", f"{self.ipv6}/128"),
                    endpoints=self.endpoints, home_relay=self.home_relay, online=self.online,
                    last_seen=self.last_seen, key_expiry=self.key_expiry, tags=self.tags,
                    caps=caps)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "node_key": self.node_key.b64(),
                "disco_key": self.disco_key.b64(), "addr_index": self.addr_index,
                "ipv4": self.ipv4, "ipv6": self.ipv6, "tags": list(self.tags),
                "created_at": self.created_at, "key_expiry": self.key_expiry,
                "endpoints": [{"ip": e.ip, "port": e.port, "kind": e.kind}
                              for e in self.endpoints],
                "home_relay": self.home_relay, "online": self.online,
                "last_seen": self.last_seen, "hostinfo": self.hostinfo,
                "auth_key_id": self.auth_key_id}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NodeRecord:
        return cls(id=d["id"], name=d["name"], node_key=Key(d["node_key"]),
                   disco_key=Key(d["disco_key"]), addr_index=d["addr_index"], ipv4=d["ipv4"],
                   ipv6=d["ipv6"], tags=tuple(d["tags"]), created_at=d["created_at"],
                   key_expiry=d["key_expiry"],
                   endpoints=tuple(Endpoint(**e) for e in d["endpoints"]),
                   home_relay=d["home_relay"], online=d["online"], last_seen=d["last_seen"],
                   hostinfo=d["hostinfo"], auth_key_id=d["auth_key_id"])


@attrs.frozen
class AuthKeyRecord:
    id: str
    reusable: bool
    tags: tuple[str, ...]
    created_at: float
    expires_at: float
    uses: int
    revoked: bool
    description: str

    def usable(self, now: float) -> bool:
        return (not self.revoked and (self.expires_at == 0 or now < self.expires_at)
                and (self.reusable or self.uses == 0))

    def to_json(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["tags"] = list(self.tags)
        return d


@attrs.frozen
class ApiKeyRecord:
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


# ----------------------------------------------------------------- migrations

#: (version, statements). Placeholders: {pk} auto-increment key, {real} float.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE nodes (
            id {pk}, name TEXT NOT NULL UNIQUE, node_key TEXT NOT NULL UNIQUE,
            disco_key TEXT NOT NULL, addr_index BIGINT NOT NULL UNIQUE, tags TEXT NOT NULL,
            created_at {real} NOT NULL, key_expiry {real} NOT NULL, endpoints TEXT NOT NULL,
            home_relay INTEGER NOT NULL, online INTEGER NOT NULL, last_seen {real} NOT NULL,
            hostinfo TEXT NOT NULL, auth_key_id TEXT NOT NULL,
            token_id TEXT UNIQUE, token_hash TEXT)""",
        """CREATE TABLE auth_keys (
            id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, reusable INTEGER NOT NULL,
            tags TEXT NOT NULL, created_at {real} NOT NULL, expires_at {real} NOT NULL,
            uses INTEGER NOT NULL, revoked INTEGER NOT NULL, description TEXT NOT NULL)""",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, role TEXT NOT NULL,
            created_at {real} NOT NULL, revoked INTEGER NOT NULL, description TEXT NOT NULL)""",
        """CREATE TABLE challenges (
            id TEXT PRIMARY KEY, node_key TEXT NOT NULL, rotate_from TEXT NOT NULL,
            secret_hash TEXT NOT NULL, expires_at {real} NOT NULL)""",
        """CREATE TABLE policies (
            version INTEGER PRIMARY KEY, text TEXT NOT NULL, created_at {real} NOT NULL,
            actor TEXT NOT NULL)""",
        """CREATE TABLE changes (
            seq {pk}, ts {real} NOT NULL, kind TEXT NOT NULL, entity TEXT NOT NULL,
            data TEXT NOT NULL)""",
        """CREATE TABLE audit (
            seq BIGINT PRIMARY KEY, ts {real} NOT NULL, actor TEXT NOT NULL,
            action TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL,
            prev_hash TEXT NOT NULL, hash TEXT NOT NULL)""",
    ]),
    (2, ["CREATE INDEX challenges_expiry ON challenges (expires_at)"]),
    # The key expiry already announced, so replicas record each expiry once.
    (3, ["ALTER TABLE nodes ADD COLUMN expiry_recorded {real} NOT NULL DEFAULT 0"]),
]

_NODE_COLS = ("id, name, node_key, disco_key, addr_index, tags, created_at, key_expiry, "
              "endpoints, home_relay, online, last_seen, hostinfo, auth_key_id")
_AUTHKEY_COLS = "id, reusable, tags, created_at, expires_at, uses, revoked, description"


class Tx(ABC):
    """One open transaction; ``?`` placeholders in every dialect."""

    @abstractmethod
    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]: ...

    @abstractmethod
    def run(self, sql: str, *params: Any) -> int:
        """Execute; the number of rows affected."""

    def row(self, sql: str, *params: Any) -> tuple[Any, ...] | None:
        r = self.rows(sql, *params)
        return r[0] if r else None


class Store(ABC):
    """Control state. Raises :class:`ControlError` subclasses for requests it refuses."""

    ula_prefix: str

    def __init__(self, key_expiry_s: float = 180 * 86400) -> None:
        self.key_expiry_s = key_expiry_s

    # -- plumbing each dialect provides
    @abstractmethod
    def _tx(self) -> contextlib.AbstractContextManager[Tx]:
        """A serialised read-write transaction."""

    def _read(self) -> contextlib.AbstractContextManager[Tx]:
        """A read-only transaction (needs no writers' lock where the dialect has one)."""
        return self._tx()

    @abstractmethod
    def _ddl_types(self) -> dict[str, str]: ...

    @abstractmethod
    def _notify(self, tx: Tx, seq: int) -> None:
        """Tell other replicas that change ``seq`` committed."""

    @abstractmethod
    def close(self) -> None: ...

    # -- schema
    def migrate(self) -> int:
        """Apply pending migrations; the schema version afterwards."""
        with self._tx() as tx:
            tx.run("CREATE TABLE IF NOT EXISTS schema_migrations "
                   f"(version INTEGER PRIMARY KEY, applied_at {self._ddl_types()['real']})")
            have = {r[0] for r in tx.rows("SELECT version FROM schema_migrations")}
            for version, statements in MIGRATIONS:
                if version in have:
                    continue
                for s in statements:
                    tx.run(s.format(**self._ddl_types()))
                tx.run("INSERT INTO schema_migrations VALUES (?, ?)", version, time.time())
            if tx.row("SELECT value FROM meta WHERE key = 'ula_prefix'") is None:
                tx.run("INSERT INTO meta VALUES ('ula_prefix', ?)", addressing.new_ula_prefix())
            if tx.row("SELECT version FROM policies") is None:
                tx.run("INSERT INTO policies VALUES (1, ?, ?, 'system')",
                       json.dumps(DEFAULT_POLICY, sort_keys=True, indent=2), time.time())
            self.ula_prefix = tx.row("SELECT value FROM meta WHERE key = 'ula_prefix'")[0]  # type: ignore[index]
            return max(v for v, _ in MIGRATIONS)

    # -- helpers inside a transaction
    def _node(self, r: Sequence[Any]) -> NodeRecord:
        v4, v6 = addressing.address_for(r[4], self.ula_prefix)
        return NodeRecord(id=r[0], name=r[1], node_key=Key(r[2]), disco_key=Key(r[3]),
                          addr_index=r[4], ipv4=v4, ipv6=v6, tags=tuple(json.loads(r[5])),
                          created_at=r[6], key_expiry=r[7],
                          endpoints=tuple(Endpoint(**e) for e in json.loads(r[8])),
                          home_relay=r[9], online=bool(r[10]), last_seen=r[11],
                          hostinfo=json.loads(r[12]), auth_key_id=r[13])

    def _node_where(self, tx: Tx, where: str, *params: Any) -> NodeRecord | None:
        r = tx.row(f"SELECT {_NODE_COLS} FROM nodes WHERE {where}", *params)
        return None if r is None else self._node(r)

    def _change(self, tx: Tx, kind: str, entity: str, data: str) -> int:
        r = tx.row("INSERT INTO changes (ts, kind, entity, data) VALUES (?, ?, ?, ?) "
                   "RETURNING seq", time.time(), kind, entity, data)
        assert r is not None
        self._notify(tx, r[0])
        return int(r[0])

    def _node_changed(self, tx: Tx, node_id: int) -> NodeRecord:
        rec = self._node_where(tx, "id = ?", node_id)
        assert rec is not None
        self._change(tx, "node", str(rec.id), json.dumps(rec.to_json()))
        return rec

    def _audit(self, tx: Tx, actor: str, action: str, target: str,
               detail: dict[str, Any] | None = None) -> None:
        last = tx.row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
        ts = time.time()
        text = json.dumps(detail or {}, sort_keys=True, separators=(",", ":"))
        h = entry_hash(prev, seq, ts, actor, action, target, text)
        tx.run("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
               seq, ts, actor, action, target, text, prev, h)

    def _resolve(self, tx: Tx, ref: str) -> NodeRecord:
        numeric = ref.isascii() and ref.isdigit() and len(ref) < 19  # fits an INTEGER
        rec = (self._node_where(tx, "id = ?", int(ref)) if numeric
               else self._node_where(tx, "name = ?", ref))
        if rec is None:
            raise NotFound(f"no node {ref!r}")
        return rec

    # -- registration
    def add_challenge(self, node_key: Key, rotate_from: Key | None, secret_hash: str) -> str:
        cid = secrets.token_hex(16)
        now = time.time()
        with self._tx() as tx:
            tx.run("DELETE FROM challenges WHERE expires_at < ?", now)
            tx.run("INSERT INTO challenges VALUES (?, ?, ?, ?, ?)", cid, node_key.b64(),
                   rotate_from.b64() if rotate_from else "", secret_hash, now + CHALLENGE_TTL_S)
        return cid

    def register(self, req: Registration) -> tuple[NodeRecord, str]:
        """Consume the challenge, check the auth key, create or update the node: one transaction.

        Returns the node and a fresh node token (the node's bearer credential).
        """
        now = time.time()
        with self._tx() as tx:
            # Single use: the row goes whether or not the proof is right, so a
            # challenge can be neither replayed nor guessed at twice.
            ch = tx.row("DELETE FROM challenges WHERE id = ? RETURNING node_key, rotate_from, "
                        "secret_hash, expires_at", req.challenge_id)
        if ch is None:
            raise Unauthorized("challenge unknown, expired or already used")
        rotate = req.rotate_from.b64() if req.rotate_from else ""
        if (ch[0] != req.node_key.b64() or ch[1] != rotate or ch[3] < now
                or not hmac.compare_digest(ch[2], req.proof_hash)):
            raise Unauthorized("challenge proof does not match the node key")
        with self._tx() as tx:
            existing = self._node_where(tx, "node_key = ?", req.node_key.b64())
            target = existing
            if req.rotate_from is not None:
                old = self._node_where(tx, "node_key = ?", rotate)
                if old is None:
                    raise NotFound("rotate_from: no node has that key")
                if existing is not None and existing.id != old.id:
                    raise Conflict("node_key already belongs to another node")
                target = old
            key = self._use_auth_key(tx, req.auth_key, now) if req.auth_key else None
            if key is None and not (req.rotate_from and target and target.live(now)):
                raise Unauthorized("an auth key is required (rotating a live node's key "
                                   "needs only the old key's proof)")
            expiry = now + self.key_expiry_s if self.key_expiry_s else 0.0
            tid, token, thash = credentials.mint(credentials.NODE_TOKEN)
            hostinfo = json.dumps({"hostname": req.hostname})
            actor = f"authkey:{key.id}" if key else f"node:{target.id}"  # type: ignore[union-attr]
            if target is None:
                taken = {r[0] for r in tx.rows(
                    "SELECT name FROM nodes WHERE name = ? OR name LIKE ?",
                    addressing.dns_label(req.hostname),
                    addressing.dns_label(req.hostname) + "-%")}
                name = addressing.unique_name(addressing.dns_label(req.hostname), taken)
                last = tx.row("SELECT MAX(addr_index) FROM nodes")
                index = addressing.next_index((last and last[0]) or 0)
                r = tx.row(
                    "INSERT INTO nodes (name, node_key, disco_key, addr_index, tags, created_at, "
                    "key_expiry, endpoints, home_relay, online, last_seen, hostinfo, "
                    "auth_key_id, token_id, token_hash) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, '[]', 0, 0, 0, ?, ?, ?, ?) RETURNING id",
                    name, req.node_key.b64(), req.disco_key.b64(), index,
                    json.dumps(list(key.tags) if key else []), now, expiry, hostinfo,
                    key.id if key else "", tid, thash)
                node_id, action = r[0], "node.register"  # type: ignore[index]
            else:
                node_id = target.id
                tags = list(key.tags) if key and key.tags else list(target.tags)
                tx.run("UPDATE nodes SET node_key = ?, disco_key = ?, tags = ?, key_expiry = ?, "
                       "hostinfo = ?, token_id = ?, token_hash = ? WHERE id = ?",
                       req.node_key.b64(), req.disco_key.b64(), json.dumps(tags), expiry,
                       hostinfo, tid, thash, node_id)
                action = "node.rotate_key" if req.rotate_from else "node.reregister"
            rec = self._node_changed(tx, node_id)
            self._audit(tx, actor, action, f"node:{node_id}",
                        {"name": rec.name, "node_key": rec.node_key.b64(),
                         "rotated_from": rotate or None, "ipv4": rec.ipv4})
        return rec, token

    def _use_auth_key(self, tx: Tx, token: str, now: float) -> AuthKeyRecord:
        parsed = credentials.parse(token, credentials.AUTH_KEY)
        row = parsed and tx.row(f"SELECT {_AUTHKEY_COLS}, secret_hash FROM auth_keys "
                                "WHERE id = ?", parsed[0])
        if not parsed or not row or not credentials.matches(parsed[1], row[-1]):
            raise Unauthorized("auth key invalid")
        # The guard in the WHERE makes single use atomic: of 50 racing
        # registrations, exactly one updates the row.
        if tx.run("UPDATE auth_keys SET uses = uses + 1 WHERE id = ? AND revoked = 0 "
                  "AND (expires_at = 0 OR expires_at > ?) AND (reusable = 1 OR uses = 0)",
                  row[0], now) != 1:
            raise Unauthorized("auth key revoked, expired or already used")
        key = self._authkey(row)
        self._audit(tx, f"authkey:{key.id}", "authkey.use", f"authkey:{key.id}", {})
        return key

    def _authkey(self, r: Sequence[Any]) -> AuthKeyRecord:
        return AuthKeyRecord(id=r[0], reusable=bool(r[1]), tags=tuple(json.loads(r[2])),
                             created_at=r[3], expires_at=r[4], uses=r[5], revoked=bool(r[6]),
                             description=r[7])

    # -- nodes
    def node_for_token(self, token: str) -> NodeRecord:
        parsed = credentials.parse(token, credentials.NODE_TOKEN)
        with self._read() as tx:
            row = parsed and tx.row(f"SELECT {_NODE_COLS}, token_hash FROM nodes "
                                    "WHERE token_id = ?", parsed[0])
        if not parsed or not row or not credentials.matches(parsed[1], row[-1]):
            raise Unauthorized("node token invalid (node deleted or re-registered?)")
        return self._node(row)

    def update_node(self, node_id: int, *, endpoints: Sequence[Endpoint] | None = None,
                    home_relay: int | None = None,
                    hostinfo: dict[str, Any] | None = None) -> NodeRecord:
        """The node's own reports: no audit entry (they are not security events)."""
        sets, params = [], []
        for col, val in (("endpoints", None if endpoints is None else json.dumps(
                              [{"ip": e.ip, "port": e.port, "kind": e.kind} for e in endpoints])),
                         ("home_relay", home_relay),
                         ("hostinfo", None if hostinfo is None else json.dumps(hostinfo))):
            if val is not None:
                sets.append(f"{col} = ?")
                params.append(val)
        with self._tx() as tx:
            if not sets or tx.run(f"UPDATE nodes SET {', '.join(sets)} WHERE id = ?",
                                  *params, node_id) != 1:
                rec = self._node_where(tx, "id = ?", node_id)
                if rec is None:
                    raise NotFound(f"no node {node_id}")
                return rec
            return self._node_changed(tx, node_id)

    def set_presence(self, online: dict[int, bool], now: float) -> None:
        """Online/offline reports of many nodes in one transaction (deleted ones are skipped)."""
        with self._tx() as tx:
            for nid, on in online.items():
                if tx.run("UPDATE nodes SET online = ?, last_seen = ? WHERE id = ?",
                          int(on), now, nid) == 1:
                    self._node_changed(tx, nid)

    def list_nodes(self) -> list[NodeRecord]:
        with self._read() as tx:
            return [self._node(r) for r in tx.rows(f"SELECT {_NODE_COLS} FROM nodes ORDER BY id")]

    def expire_node(self, ref: str, actor: str) -> NodeRecord:
        now = time.time()
        with self._tx() as tx:
            rec = self._resolve(tx, ref)
            tx.run("UPDATE nodes SET key_expiry = ?, expiry_recorded = ? WHERE id = ?",
                   now, now, rec.id)
            self._audit(tx, actor, "node.expire", f"node:{rec.id}", {"name": rec.name})
            return self._node_changed(tx, rec.id)

    def record_expiries(self, node_ids: Sequence[int]) -> int:
        """Announce keys whose expiry time passed (audit + change); how many were new."""
        now, n = time.time(), 0
        with self._tx() as tx:
            for nid in node_ids:
                if tx.run("UPDATE nodes SET expiry_recorded = key_expiry WHERE id = ? AND "
                          "key_expiry > 0 AND key_expiry <= ? AND expiry_recorded != key_expiry",
                          nid, now) == 1:
                    rec = self._node_changed(tx, nid)
                    self._audit(tx, "system", "node.key_expired", f"node:{nid}",
                                {"name": rec.name, "key_expiry": rec.key_expiry})
                    n += 1
        return n

    def delete_node(self, ref: str, actor: str) -> NodeRecord:
        with self._tx() as tx:
            rec = self._resolve(tx, ref)
            tx.run("DELETE FROM nodes WHERE id = ?", rec.id)
            self._change(tx, "node_removed", str(rec.id), "{}")
            self._audit(tx, actor, "node.delete", f"node:{rec.id}",
                        {"name": rec.name, "node_key": rec.node_key.b64()})
            return rec

    def set_tags(self, ref: str, tags: Sequence[str], actor: str) -> NodeRecord:
        with self._tx() as tx:
            rec = self._resolve(tx, ref)
            tx.run("UPDATE nodes SET tags = ? WHERE id = ?", json.dumps(sorted(set(tags))),
                   rec.id)
            self._audit(tx, actor, "node.tag", f"node:{rec.id}",
                        {"old": list(rec.tags), "new": sorted(set(tags))})
            return self._node_changed(tx, rec.id)

    # -- auth keys and API keys
    def create_auth_key(self, *, reusable: bool, tags: Sequence[str], expires_at: float,
                        description: str, actor: str) -> tuple[AuthKeyRecord, str]:
        kid, token, h = credentials.mint(credentials.AUTH_KEY)
        with self._tx() as tx:
            tx.run("INSERT INTO auth_keys VALUES (?, ?, ?, ?, ?, ?, 0, 0, ?)", kid, h,
                   int(reusable), json.dumps(sorted(set(tags))), time.time(), expires_at,
                   description)
            self._audit(tx, actor, "authkey.create", f"authkey:{kid}",
                        {"reusable": reusable, "tags": sorted(set(tags)),
                         "expires_at": expires_at})
            r = tx.row(f"SELECT {_AUTHKEY_COLS} FROM auth_keys WHERE id = ?", kid)
        return self._authkey(r), token  # type: ignore[arg-type]

    def list_auth_keys(self) -> list[AuthKeyRecord]:
        with self._read() as tx:
            return [self._authkey(r) for r in
                    tx.rows(f"SELECT {_AUTHKEY_COLS} FROM auth_keys ORDER BY created_at")]

    def revoke_auth_key(self, kid: str, actor: str) -> None:
        with self._tx() as tx:
            if tx.run("UPDATE auth_keys SET revoked = 1 WHERE id = ?", kid) != 1:
                raise NotFound(f"no auth key {kid!r}")
            self._audit(tx, actor, "authkey.revoke", f"authkey:{kid}", {})

    def create_api_key(self, role: str, description: str, actor: str,
                       token: str | None = None) -> tuple[ApiKeyRecord, str]:
        """A new API key, or (``token`` given) import an existing one, e.g. a bootstrap file."""
        if role not in ROLES:
            raise BadRequest(f"role must be one of {', '.join(ROLES)}")
        if token is None:
            kid, token, h = credentials.mint(credentials.API_KEY)
        else:
            parsed = credentials.parse(token, credentials.API_KEY)
            if parsed is None:
                raise BadRequest("not an API key (wga_<16 hex>_<43 chars>)")
            kid, h = parsed[0], credentials.hash_secret(parsed[1])
        with self._tx() as tx:
            tx.run("INSERT INTO api_keys VALUES (?, ?, ?, ?, 0, ?)", kid, h, role, time.time(),
                   description)
            self._audit(tx, actor, "apikey.create", f"apikey:{kid}", {"role": role})
        return ApiKeyRecord(kid, role, time.time(), False, description), token

    def api_key_role(self, token: str) -> tuple[str, str]:
        """``(key id, role)`` of a valid, unrevoked API key."""
        parsed = credentials.parse(token, credentials.API_KEY)
        with self._read() as tx:
            row = parsed and tx.row("SELECT id, role, revoked, secret_hash FROM api_keys "
                                    "WHERE id = ?", parsed[0])
        if not parsed or not row or row[2] or not credentials.matches(parsed[1], row[3]):
            raise Unauthorized("API key invalid or revoked")
        return row[0], row[1]

    def has_api_key(self, kid: str | None = None, role: str = "admin") -> bool:
        with self._read() as tx:
            if kid is None:
                return tx.row("SELECT 1 FROM api_keys WHERE role = ? AND revoked = 0",
                              role) is not None
            return tx.row("SELECT 1 FROM api_keys WHERE id = ?", kid) is not None

    def list_api_keys(self) -> list[ApiKeyRecord]:
        with self._read() as tx:
            return [ApiKeyRecord(r[0], r[1], r[2], bool(r[3]), r[4]) for r in tx.rows(
                "SELECT id, role, created_at, revoked, description FROM api_keys "
                "ORDER BY created_at")]

    def revoke_api_key(self, kid: str, actor: str) -> None:
        with self._tx() as tx:
            if tx.run("UPDATE api_keys SET revoked = 1 WHERE id = ?", kid) != 1:
                raise NotFound(f"no API key {kid!r}")
            self._audit(tx, actor, "apikey.revoke", f"apikey:{kid}", {})

    # -- policy and relay map
    def get_policy(self) -> tuple[int, str]:
        with self._read() as tx:
            r = tx.row("SELECT version, text FROM policies ORDER BY version DESC LIMIT 1")
        assert r is not None
        return int(r[0]), r[1]

    def set_policy(self, doc: Any, actor: str, if_version: int | None = None) -> int:
        """Validate and store a new version; ``if_version`` guards against lost updates."""
        parsed = parse_policy(doc)
        with self._tx() as tx:
            cur = tx.row("SELECT MAX(version) FROM policies")[0]  # type: ignore[index]
            if if_version is not None and if_version != cur:
                raise Conflict(f"policy is at version {cur}, not {if_version}")
            version = cur + 1
            tx.run("INSERT INTO policies VALUES (?, ?, ?, ?)", version, parsed.text,
                   time.time(), actor)
            self._change(tx, "policy", str(version), parsed.text)
            self._audit(tx, actor, "policy.set", f"policy:{version}", {"previous": cur})
        return version

    def get_relay_map(self) -> str | None:
        with self._read() as tx:
            r = tx.row("SELECT value FROM meta WHERE key = 'relay_map'")
        return None if r is None else r[0]

    def set_relay_map(self, text: str, actor: str) -> None:
        with self._tx() as tx:
            tx.run("DELETE FROM meta WHERE key = 'relay_map'")
            tx.run("INSERT INTO meta VALUES ('relay_map', ?)", text)
            self._change(tx, "relay_map", "", text)
            self._audit(tx, actor, "relay_map.set", "relay_map", {})

    # -- change feed and audit
    def changes_since(self, seq: int, limit: int = 5000) -> list[Change]:
        with self._read() as tx:
            return [Change(*r) for r in tx.rows(
                "SELECT seq, kind, entity, data FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
                seq, limit)]

    def head_seq(self) -> int:
        with self._read() as tx:
            r = tx.row("SELECT MAX(seq) FROM changes")
        return int((r and r[0]) or 0)

    def oldest_seq(self) -> int:
        with self._read() as tx:
            r = tx.row("SELECT MIN(seq) FROM changes")
        return int((r and r[0]) or 0)

    def prune_changes(self, keep: int) -> None:
        with self._tx() as tx:
            tx.run("DELETE FROM changes WHERE seq <= (SELECT MAX(seq) FROM changes) - ?", keep)

    def audit(self, actor: str, action: str, target: str,
              detail: dict[str, Any] | None = None) -> None:
        with self._tx() as tx:
            self._audit(tx, actor, action, target, detail)

    def audit_entries(self, after: int = 0, limit: int | None = None) -> Iterator[AuditEntry]:
        batch = 1000 if limit is None else min(limit, 1000)
        got = 0
        while limit is None or got < limit:
            with self._read() as tx:
                rows = tx.rows("SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                               after, batch)
            for r in rows:
                yield AuditEntry(*r)
            if len(rows) < batch:
                return
            got += len(rows)
            after = rows[-1][0]

    # -- benchmark / provisioning helper
    def seed_nodes(self, specs: Sequence[tuple[Key, Key, str, Sequence[str]]]) -> list[str]:
        """Insert many nodes at once without registration; their tokens, in order."""
        tokens = []
        now = time.time()
        with self._tx() as tx:
            last = tx.row("SELECT MAX(addr_index) FROM nodes")
            index = (last and last[0]) or 0
            for node_key, disco_key, name, tags in specs:
                index = addressing.next_index(index)
                tid, token, h = credentials.mint(credentials.NODE_TOKEN)
                r = tx.row(
                    "INSERT INTO nodes (name, node_key, disco_key, addr_index, tags, created_at, "
                    "key_expiry, endpoints, home_relay, online, last_seen, hostinfo, "
                    "auth_key_id, token_id, token_hash) "
                    "VALUES (?, ?, ?, ?, ?, ?, 0, '[]', 0, 0, 0, '{}', '', ?, ?) RETURNING id",
                    name, node_key.b64(), disco_key.b64(), index, json.dumps(list(tags)), now,
                    tid, h)
                self._node_changed(tx, r[0])  # type: ignore[index]
                tokens.append(token)
            self._audit(tx, "system", "node.seed", "nodes", {"count": len(specs)})
        return tokens


# -------------------------------------------------------------------- SQLite


class _SQLiteTx(Tx):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    def run(self, sql: str, *params: Any) -> int:
        return self.conn.execute(sql, params).rowcount


class SQLiteStore(Store):
    """The embedded default: one file in WAL mode."""

    def __init__(self, path: str | os.PathLike[str], **kw: Any) -> None:
        super().__init__(**kw)
        Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = str(path)
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                    timeout=10)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)
        self.migrate()

    def _ddl_types(self) -> dict[str, str]:
        return {"pk": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL"}

    def _notify(self, tx: Tx, seq: int) -> None:
        """One process per database file: the server polls, nobody to wake."""

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Tx]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield _SQLiteTx(self.conn)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


# ---------------------------------------------------------------- PostgreSQL

_PG_LOCK = 0x77676D65  # "wgme": the writers' advisory lock
_PG_CHANNEL = "wgmesh_changes"


class _PgTx(Tx):
    def __init__(self, cur: Any) -> None:
        self.cur = cur

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        self.cur.execute(sql.replace("?", "%s"), params)
        return self.cur.fetchall() if self.cur.description else []

    def run(self, sql: str, *params: Any) -> int:
        self.cur.execute(sql.replace("?", "%s"), params)
        return int(self.cur.rowcount)


class PostgresStore(Store):
    """For several control replicas: they share the database and wake each other by NOTIFY."""

    channel = _PG_CHANNEL

    def __init__(self, dsn: str, **kw: Any) -> None:
        super().__init__(**kw)
        import psycopg

        self.dsn = dsn
        try:
            self.conn = psycopg.connect(dsn, autocommit=True)
        except psycopg.Error as e:
            raise ControlError(f"cannot connect to PostgreSQL: {e}") from None
        self.migrate()

    def _ddl_types(self) -> dict[str, str]:
        return {"pk": "BIGSERIAL PRIMARY KEY", "real": "DOUBLE PRECISION"}

    def _connection(self) -> Any:
        """The connection, re-opened if the database restarted or the link broke."""
        if self.conn.closed or self.conn.broken:
            import psycopg

            self.conn = psycopg.connect(self.dsn, autocommit=True)
        return self.conn

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Tx]:
        conn = self._connection()
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK,))
            yield _PgTx(cur)

    @contextlib.contextmanager
    def _read(self) -> Iterator[Tx]:
        conn = self._connection()
        with conn.transaction(), conn.cursor() as cur:
            yield _PgTx(cur)

    def _notify(self, tx: Tx, seq: int) -> None:
        tx.rows("SELECT pg_notify(?, ?)", self.channel, str(seq))

    def listen(self, stop: threading.Event, on_notify: Callable[[], None]) -> None:
        """Call ``on_notify`` after each batch of change notifications until ``stop`` (blocks)."""
        import psycopg

        while not stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {self.channel}")
                    on_notify()  # whatever committed while we were not listening
                    while not stop.is_set():
                        if any(True for _ in conn.notifies(timeout=0.5, stop_after=1)):
                            on_notify()
            except psycopg.Error:
                stop.wait(1.0)  # the server's poll covers the gap; reconnect

    def close(self) -> None:
        self.conn.close()


def open_store(db: str, **kw: Any) -> Store:
    """``postgresql://...`` (or ``postgres://``) selects PostgreSQL; anything else is a SQLite path."""
    if db.startswith(("postgresql://", "postgres://")):
        return PostgresStore(db, **kw)
    return SQLiteStore(db.removeprefix("sqlite://"), **kw)
