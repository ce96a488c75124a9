"""The one :class:`Store` implementation, in portable SQL; the dialects supply transactions.

Every mutation is one transaction that also appends a row to ``changes`` (the
new state of the entity, under a global sequence number) and an entry to the
hash-chained ``audit`` log. Replicas learn what changed by reading ``changes``
after their high-water mark: that one path serves the writing replica, other
replicas (woken by PostgreSQL ``NOTIFY``) and a restarted server alike.

Writers are serialised (SQLite ``BEGIN IMMEDIATE``; a PostgreSQL transaction
advisory lock), so change sequence numbers commit in order and a reader can
never skip a change that commits late. Control writes are rare; this is cheap.

Stores are synchronous and not thread-safe: the server gives each one its own
thread.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

from wgmesh import lock
from wgmesh.control import addressing, credentials
from wgmesh.control.audit import GENESIS, KEYED_ACTION, AuditEntry, entry_hash, key_id
from wgmesh.control.errors import (
    BadRequest,
    Conflict,
    ControlError,
    Forbidden,
    NotFound,
    Unauthorized,
    Unprocessable,
)
from wgmesh.control.policy import DEFAULT_POLICY, NODE_NAME_RE, parse_policy
from wgmesh.control.store.migrations import MIGRATIONS
from wgmesh.control.store.records import (
    AUTHKEY_COLUMNS,
    NODE_COLUMNS,
    ApiKeyRecord,
    AuthKeyRecord,
    Change,
    NodeRecord,
    Registration,
    endpoints_json,
)
from wgmesh.keys import Key
from wgmesh.netmap import Endpoint

__all__ = ["CHALLENGE_TTL_S", "MAX_CHALLENGES", "ROLES", "Store", "Tx"]

CHALLENGE_TTL_S = 60.0
#: Outstanding registration challenges, network-wide: past it, new ones wait.
MAX_CHALLENGES = 10_000
ROLES = ("admin", "relay")


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
    """Control state. Raises :class:`ControlError` subclasses for requests it refuses.

    Audit entries are chained under :attr:`audit_key` once :meth:`use_audit_key`
    set it; a store without the key may not append to a keyed trail.
    """

    ula_prefix: str
    #: A replica renews the ``last_seen`` of its streaming nodes every 5 s; a node
    #: marked online without a renewal for this long has no replica holding its stream.
    presence_lease_s = 15.0

    def __init__(self, key_expiry_s: float = 180 * 86400,
                 max_challenges: int = MAX_CHALLENGES, *, approval_required: bool = False,
                 ephemeral_grace_s: float = 60.0) -> None:
        self.key_expiry_s = key_expiry_s
        self.max_challenges = max_challenges
        self.approval_required = approval_required
        self.ephemeral_grace_s = ephemeral_grace_s
        self.audit_key: bytes | None = None
        self._audit_key_id: str | None = None

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
            kid = tx.row("SELECT value FROM meta WHERE key = 'audit_key_id'")
            self._audit_key_id = None if kid is None else str(kid[0])
            return max(v for v, _ in MIGRATIONS)

    def use_audit_key(self, key: bytes) -> None:
        """Chain audit entries under ``key`` from now on.

        The first key a database sees is recorded (by its fingerprint) and
        starts the keyed chain with an ``audit.keyed`` entry; an unkeyed
        database upgrades so, in place. A different key is refused: replicas
        must share one key file, and a lost key must not silently fork the chain.
        """
        kid = key_id(key)
        with self._tx() as tx:
            row = tx.row("SELECT value FROM meta WHERE key = 'audit_key_id'")
            if row is not None and row[0] != kid:
                raise ControlError(f"the audit key (id {kid}) is not this database's audit "
                                   f"key (id {row[0]}): replicas must share one audit key file")
            self.audit_key, self._audit_key_id = key, kid
            if row is None:
                tx.run("INSERT INTO meta VALUES ('audit_key_id', ?)", kid)
                last = tx.row("SELECT MAX(seq) FROM audit")
                self._audit(tx, "system", KEYED_ACTION, "audit",
                            {"key_id": kid, "unkeyed_before": ((last and last[0]) or 0) + 1})

    def use_control_key(self, fingerprint: str) -> None:
        """Record the control key's fingerprint on first use (an older database upgrades
        so, in place); refuse another key: replicas share one control key file."""
        with self._tx() as tx:
            row = tx.row("SELECT value FROM meta WHERE key = 'control_key'")
            if row is None:
                tx.run("INSERT INTO meta VALUES ('control_key', ?)", fingerprint)
            elif row[0] != fingerprint:
                raise ControlError(f"the control key (fingerprint {fingerprint}) is not this "
                                   f"database's control key ({row[0]}): replicas must share "
                                   f"one control key file (--control-key-file)")

    # -- helpers inside a transaction
    def _node(self, r: Sequence[Any]) -> NodeRecord:
        return NodeRecord.from_row(r, self.ula_prefix)

    def _node_where(self, tx: Tx, where: str, *params: Any) -> NodeRecord | None:
        r = tx.row(f"SELECT {NODE_COLUMNS} FROM nodes WHERE {where}", *params)
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
        if self.audit_key is None and self._audit_key_id is not None:
            raise ControlError("this database's audit trail is keyed: open it with its "
                               "audit key to change anything")
        last = tx.row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
        ts = time.time()
        text = json.dumps(detail or {}, sort_keys=True, separators=(",", ":"))
        h = entry_hash(prev, seq, ts, actor, action, target, text, self.audit_key)
        tx.run("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
               seq, ts, actor, action, target, text, prev, h, int(self.audit_key is not None))

    def _resolve(self, tx: Tx, ref: str) -> NodeRecord:
        """``id:N``, ``name:NAME``, or a bare id or name as long as it cannot mean both."""
        kind, sep, value = ref.partition(":")  # names are DNS labels: never a colon
        if not sep:
            kind, value = ("either" if _is_id(ref) else "name"), ref
        elif kind not in ("id", "name") or not value:
            raise BadRequest(f"node {ref!r}: use an id, a name, id:N or name:NAME")
        if kind == "id" and not _is_id(value):
            raise BadRequest(f"node {ref!r}: id:N takes a number")
        by_id = self._node_where(tx, "id = ?", int(value)) if kind != "name" else None
        by_name = self._node_where(tx, "name = ?", value) if kind != "id" else None
        if by_id is not None and by_name is not None and by_id.id != by_name.id:
            raise BadRequest(f"node {ref!r} is ambiguous: id {ref} is {by_id.name!r}, the node "
                             f"named {ref!r} has id {by_name.id}; say id:{ref} or name:{ref}")
        rec = by_id or by_name
        if rec is None:
            raise NotFound(f"no node {ref!r}")
        return rec

    def _check_tag_owners(self, tx: Tx, tags: Sequence[str], *actors: str) -> None:
        """:class:`Forbidden` unless ``actors`` may give out every tag (policy ``tagOwners``)."""
        if not tags:
            return
        r = tx.row("SELECT text FROM policies ORDER BY version DESC LIMIT 1")
        policy = parse_policy(json.loads(r[0]))  # type: ignore[index]
        for t in sorted(set(tags)):
            if not policy.may_assign(t, *actors):
                raise Forbidden(f"{t} is not owned by {' or '.join(actors)} (policy tagOwners)")

    def _unique_name(self, tx: Tx, base: str) -> str:
        prefix = addressing.name_prefix(base)
        taken = {r[0] for r in tx.rows("SELECT name FROM nodes WHERE name LIKE ?", prefix + "%")}
        return addressing.unique_name(base, taken)

    # -- registration
    def add_challenge(self, node_key: Key, rotate_from: Key | None, secret_hash: str) -> str:
        """Store a challenge; with ``max_challenges`` outstanding the oldest ones go.

        Dropping the oldest, not refusing the newest: a flood from many sources (each
        within its rate limit) would otherwise fill the table and shut every honest node
        out for the challenge lifetime, while a node answers its own challenge within a
        round trip, long before the flood can push it out."""
        cid = secrets.token_hex(16)
        now = time.time()
        with self._tx() as tx:
            tx.run("DELETE FROM challenges WHERE expires_at < ?", now)
            count = tx.row("SELECT COUNT(*) FROM challenges")[0]  # type: ignore[index]
            if count >= self.max_challenges:
                tx.run("DELETE FROM challenges WHERE id IN (SELECT id FROM challenges "
                       "ORDER BY expires_at LIMIT ?)", count - self.max_challenges + 1)
            tx.run("INSERT INTO challenges VALUES (?, ?, ?, ?, ?)", cid, node_key.b64(),
                   rotate_from.b64() if rotate_from else "", secret_hash, now + CHALLENGE_TTL_S)
        return cid

    def prune_challenges(self) -> int:
        """Drop expired challenges (also done on each new one); how many went."""
        with self._tx() as tx:
            return tx.run("DELETE FROM challenges WHERE expires_at < ?", time.time())

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
            if key is not None:
                # The policy may have changed since the key was made: its creator
                # must still own the tags it hands out.
                self._check_tag_owners(tx, key.tags, key.created_by, f"authkey:{key.id}")
            if key is None and not (req.rotate_from and target and target.live(now)):
                raise Unauthorized("an auth key is required (rotating a live node's key "
                                   "needs only the old key's proof)")
            # Only an authenticated registration renews the key's lifetime; a
            # rotation proves the old key, not the right to keep it forever.
            expiry = now + self.key_expiry_s if self.key_expiry_s else 0.0
            if key is None and target is not None:
                expiry = target.key_expiry
            tid, token, thash = credentials.mint(credentials.NODE_TOKEN)
            hostinfo = json.dumps({"hostname": req.hostname})
            actor = f"authkey:{key.id}" if key else f"node:{target.id}"  # type: ignore[union-attr]
            if target is None:
                name = self._unique_name(tx, addressing.dns_label(req.hostname))
                last = tx.row("SELECT MAX(addr_index) FROM nodes")
                index = addressing.next_index((last and last[0]) or 0)
                r = tx.row(
                    "INSERT INTO nodes (name, node_key, disco_key, addr_index, tags, created_at, "
                    "key_expiry, endpoints, home_relay, online, last_seen, hostinfo, "
                    "auth_key_id, token_id, token_hash, ephemeral, approved) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, '[]', 0, 0, 0, ?, ?, ?, ?, ?, ?) RETURNING id",
                    name, req.node_key.b64(), req.disco_key.b64(), index,
                    json.dumps(list(key.tags) if key else []), now, expiry, hostinfo,
                    key.id if key else "", tid, thash, int(bool(key and key.ephemeral)),
                    int(not self.approval_required or bool(key and key.preapproved)))
                node_id, action = r[0], "node.register"  # type: ignore[index]
            else:
                node_id = target.id
                tags = list(key.tags) if key and key.tags else list(target.tags)
                # A pending node that comes back with a pre-approved key is approved:
                # an admin approved whoever holds that key.
                approved = target.approved or bool(key and key.preapproved)
                tx.run("UPDATE nodes SET node_key = ?, disco_key = ?, tags = ?, key_expiry = ?, "
                       "hostinfo = ?, token_id = ?, token_hash = ?, approved = ? WHERE id = ?",
                       req.node_key.b64(), req.disco_key.b64(), json.dumps(tags), expiry,
                       hostinfo, tid, thash, int(approved), node_id)
                action = "node.rotate_key" if req.rotate_from else "node.reregister"
            rec = self._node_changed(tx, node_id)
            self._audit(tx, actor, action, f"node:{node_id}",
                        {"name": rec.name, "node_key": rec.node_key.b64(),
                         "rotated_from": rotate or None, "ipv4": rec.ipv4,
                         "approved": rec.approved, "ephemeral": rec.ephemeral})
        return rec, token

    def _use_auth_key(self, tx: Tx, token: str, now: float) -> AuthKeyRecord:
        parsed = credentials.parse(token, credentials.AUTH_KEY)
        row = parsed and tx.row(f"SELECT {AUTHKEY_COLUMNS}, secret_hash FROM auth_keys "
                                "WHERE id = ?", parsed[0])
        if not parsed or not row or not credentials.matches(parsed[1], row[-1]):
            raise Unauthorized("auth key invalid")
        # The guard in the WHERE makes single use atomic: of 50 racing
        # registrations, exactly one updates the row.
        if tx.run("UPDATE auth_keys SET uses = uses + 1 WHERE id = ? AND revoked = 0 "
                  "AND (expires_at = 0 OR expires_at > ?) AND (reusable = 1 OR uses = 0)",
                  row[0], now) != 1:
            raise Unauthorized("auth key revoked, expired or already used")
        key = AuthKeyRecord.from_row(row)
        self._audit(tx, f"authkey:{key.id}", "authkey.use", f"authkey:{key.id}", {})
        return key

    # -- nodes
    def node_for_token(self, token: str) -> NodeRecord:
        parsed = credentials.parse(token, credentials.NODE_TOKEN)
        with self._read() as tx:
            row = parsed and tx.row(f"SELECT {NODE_COLUMNS}, token_hash FROM nodes "
                                    "WHERE token_id = ?", parsed[0])
        if not parsed or not row or not credentials.matches(parsed[1], row[-1]):
            raise Unauthorized("node token invalid (node deleted or re-registered?)")
        return self._node(row)

    def update_node(self, node_id: int, *, endpoints: Sequence[Endpoint] | None = None,
                    home_relay: int | None = None,
                    hostinfo: dict[str, Any] | None = None,
                    routes: Sequence[str] | None = None) -> NodeRecord:
        """The node's own reports: no audit entry (they are not security events; advertised
        ``routes`` carry no traffic until approved)."""
        sets, params = [], []
        for col, val in (("endpoints",
                          None if endpoints is None else json.dumps(endpoints_json(endpoints))),
                         ("home_relay", home_relay),
                         ("hostinfo", None if hostinfo is None else json.dumps(hostinfo)),
                         ("advertised_routes",
                          None if routes is None else json.dumps(sorted(set(routes))))):
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

    def refresh_presence(self, node_ids: Sequence[int], now: float) -> None:
        """Renew the presence lease of nodes streaming to this replica (``last_seen``).

        No change is logged: only the ephemeral sweep reads it, straight from the database.
        """
        with self._tx() as tx:
            for i in range(0, len(node_ids), 500):
                chunk = node_ids[i:i + 500]
                tx.run(f"UPDATE nodes SET last_seen = ? WHERE id IN ({', '.join('?' * len(chunk))})",
                       now, *chunk)

    def restart_presence(self, now: float) -> None:
        """On a replica's start: a node marked online whose lease no replica renews lost its
        stream while no control ran; it counts as offline from now, not from before."""
        with self._tx() as tx:
            tx.run("UPDATE nodes SET last_seen = ? WHERE online = 1 AND last_seen < ?",
                   now, now - self.presence_lease_s)

    def list_nodes(self) -> list[NodeRecord]:
        with self._read() as tx:
            return [self._node(r) for r in tx.rows(f"SELECT {NODE_COLUMNS} FROM nodes ORDER BY id")]

    def expire_node(self, ref: str, actor: str) -> NodeRecord:
        now = time.time()
        with self._tx() as tx:
            rec = self._resolve(tx, ref)
            tx.run("UPDATE nodes SET key_expiry = ?, expiry_recorded = ? WHERE id = ?",
                   now, now, rec.id)
            self._audit(tx, actor, "node.expire", f"node:{rec.id}", {"name": rec.name})
            return self._node_changed(tx, rec.id)

    def extend_node(self, ref: str, expiry_s: float | None, actor: str) -> NodeRecord:
        """Renew a node's key lifetime from now (``None``: the server's; 0: never expires).

        With a registration under an auth key, the only way a key lifetime grows.
        """
        expiry_s = self.key_expiry_s if expiry_s is None else expiry_s
        return self.set_node_expiry(ref, time.time() + expiry_s if expiry_s else 0.0, actor,
                                    "node.extend")

    def set_node_expiry(self, ref: str, expiry: float, actor: str,
                        action: str = "node.set_expiry") -> NodeRecord:
        """Set a node's key expiry to the time ``expiry`` (0: never expires)."""
        with self._tx() as tx:
            rec = self._resolve(tx, ref)
            tx.run("UPDATE nodes SET key_expiry = ? WHERE id = ?", expiry, rec.id)
            self._audit(tx, actor, action, f"node:{rec.id}",
                        {"name": rec.name, "old": rec.key_expiry, "new": expiry})
            return self._node_changed(tx, rec.id)

    def approve_node(self, ref: str, actor: str) -> NodeRecord:
        """Let a pending node into the mesh (``approval=required``)."""
        with self._tx() as tx:
            rec = self._resolve(tx, ref)
            if rec.approved:
                return rec
            tx.run("UPDATE nodes SET approved = 1 WHERE id = ?", rec.id)
            self._audit(tx, actor, "node.approve", f"node:{rec.id}", {"name": rec.name})
            return self._node_changed(tx, rec.id)

    def remove_ephemeral(self) -> list[int]:
        """Delete ephemeral nodes offline for longer than the grace period; their ids.

        Offline means no stream on any replica: the presence writer keeps
        ``online`` and ``last_seen``, and each replica renews ``last_seen`` of its
        streams (:meth:`refresh_presence`), so a node marked online whose lease
        lapsed lost its replica. One that never connected counts from its
        registration. Deleting the row frees its address and name.
        """
        now = time.time()
        cutoff = now - self.ephemeral_grace_s
        stale = now - max(self.ephemeral_grace_s, self.presence_lease_s)
        with self._tx() as tx:
            gone = [self._node(r) for r in tx.rows(
                f"SELECT {NODE_COLUMNS} FROM nodes WHERE ephemeral = 1 AND created_at < ? "
                "AND (online = 0 AND last_seen < ? OR last_seen < ?)", cutoff, cutoff, stale)]
            for rec in gone:
                tx.run("DELETE FROM nodes WHERE id = ?", rec.id)
                self._change(tx, "node_removed", str(rec.id), "{}")
                self._audit(tx, "system", "node.ephemeral_removed", f"node:{rec.id}",
                            {"name": rec.name, "node_key": rec.node_key.b64(),
                             "ipv4": rec.ipv4, "last_seen": rec.last_seen})
        return [r.id for r in gone]

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

    def rename_node(self, ref: str, name: str, actor: str) -> NodeRecord:
        """Assign ``name``: policy selectors naming it now match this node.

        A node holding the name by its own hostname gives it up (it moves to
        ``name-2``...); a name another node was assigned is a :class:`Conflict`.
        """
        if not NODE_NAME_RE.match(name):
            raise BadRequest(f"name: {name!r} is not a DNS label (a-z, 0-9, -)")
        with self._tx() as tx:
            rec = self._resolve(tx, ref)
            holder = self._node_where(tx, "name = ?", name)
            if holder is not None and holder.id != rec.id:
                if holder.name_assigned:
                    raise Conflict(f"name {name!r} is assigned to node {holder.id}")
                moved = self._unique_name(tx, name)
                tx.run("UPDATE nodes SET name = ? WHERE id = ?", moved, holder.id)
                self._audit(tx, actor, "node.rename", f"node:{holder.id}",
                            {"old": name, "new": moved, "assigned": False})
                self._node_changed(tx, holder.id)
            tx.run("UPDATE nodes SET name = ?, name_assigned = 1 WHERE id = ?", name, rec.id)
            self._audit(tx, actor, "node.rename", f"node:{rec.id}",
                        {"old": rec.name, "new": name, "assigned": True})
            return self._node_changed(tx, rec.id)

    def set_tags(self, ref: str, tags: Sequence[str], actor: str) -> NodeRecord:
        with self._tx() as tx:
            rec = self._resolve(tx, ref)
            self._check_tag_owners(tx, sorted(set(tags) - set(rec.tags)), actor)
            tx.run("UPDATE nodes SET tags = ? WHERE id = ?", json.dumps(sorted(set(tags))),
                   rec.id)
            self._audit(tx, actor, "node.tag", f"node:{rec.id}",
                        {"old": list(rec.tags), "new": sorted(set(tags))})
            return self._node_changed(tx, rec.id)

    def approve_routes(self, ref: str, routes: Sequence[str], approve: bool,
                       actor: str) -> NodeRecord:
        """Approve (or reject: withdraw the approval of) ``routes`` of a node, audited."""
        with self._tx() as tx:
            rec = self._resolve(tx, ref)
            old = set(rec.approved_routes)
            new = sorted(old | set(routes) if approve else old - set(routes))
            tx.run("UPDATE nodes SET approved_routes = ? WHERE id = ?", json.dumps(new), rec.id)
            self._audit(tx, actor, "routes.approve" if approve else "routes.reject",
                        f"node:{rec.id}", {"name": rec.name, "routes": sorted(set(routes)),
                                           "approved": new})
            return self._node_changed(tx, rec.id)

    # -- auth keys and API keys
    def create_auth_key(self, *, reusable: bool, tags: Sequence[str], expires_at: float,
                        description: str, actor: str, ephemeral: bool = False,
                        preapproved: bool = False) -> tuple[AuthKeyRecord, str]:
        """A new auth key; :class:`Forbidden` if ``actor`` does not own one of ``tags``."""
        kid, token, h = credentials.mint(credentials.AUTH_KEY)
        with self._tx() as tx:
            self._check_tag_owners(tx, tags, actor)
            tx.run("INSERT INTO auth_keys (id, secret_hash, reusable, tags, created_at, "
                   "expires_at, uses, revoked, description, ephemeral, preapproved, created_by) "
                   "VALUES (?, ?, ?, ?, ?, ?, 0, 0, ?, ?, ?, ?)", kid, h,
                   int(reusable), json.dumps(sorted(set(tags))), time.time(), expires_at,
                   description, int(ephemeral), int(preapproved), actor)
            self._audit(tx, actor, "authkey.create", f"authkey:{kid}",
                        {"reusable": reusable, "tags": sorted(set(tags)),
                         "expires_at": expires_at, "ephemeral": ephemeral,
                         "preapproved": preapproved})
            r = tx.row(f"SELECT {AUTHKEY_COLUMNS} FROM auth_keys WHERE id = ?", kid)
        return AuthKeyRecord.from_row(r), token  # type: ignore[arg-type]

    def list_auth_keys(self) -> list[AuthKeyRecord]:
        with self._read() as tx:
            return [AuthKeyRecord.from_row(r) for r in
                    tx.rows(f"SELECT {AUTHKEY_COLUMNS} FROM auth_keys ORDER BY created_at")]

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

    # -- mesh lock: stored and ordered here, trusted only by nodes (wgmesh.lock)
    def lock_chain(self, since: bytes | None = None) -> tuple[str, str, list[bytes]]:
        """``(lock id, head, updates)``: the ids in hex ("" while unlocked) and the encoded
        updates after ``since`` (a head hash), or all of them if it is unknown."""
        with self._read() as tx:
            rows = tx.rows("SELECT hash, data FROM lock_updates ORDER BY seq")
        if not rows:
            return "", "", []
        hashes = [r[0] for r in rows]
        start = hashes.index(since.hex()) + 1 if since and since.hex() in hashes else 0
        return hashes[0], hashes[-1], [bytes.fromhex(r[1]) for r in rows[start:]]

    def lock_append(self, raw: bytes, actor: str) -> lock.LockState:
        """Append an update that extends the head and verifies with the stored chain.

        :class:`Conflict` if it names another parent (the admin rebuilds it on the new
        head); :class:`Unprocessable` if the chain with it does not verify. The signature
        is the authority here; control checks it only to refuse junk early.
        """
        try:
            update = lock.decode_update(raw)
        except lock.LockError as e:
            raise Unprocessable(str(e)) from None
        with self._tx() as tx:
            rows = tx.rows("SELECT hash, data FROM lock_updates ORDER BY seq")
            if rows and update.parent.hex() != rows[-1][0]:
                raise Conflict(f"the update's parent is not the lock head {rows[-1][0]}")
            try:
                state = lock.verify([*(lock.decode_update(bytes.fromhex(r[1])) for r in rows),
                                     update])
            except lock.LockError as e:
                raise Unprocessable(str(e)) from None
            tx.run("INSERT INTO lock_updates VALUES (?, ?, ?, ?, ?)", len(rows) + 1,
                   update.hash.hex(), update.parent.hex(), raw.hex(), time.time())
            self._change(tx, "lock", update.hash.hex(), "{}")
            self._audit(tx, actor, f"lock.{update.kind.label}", f"lock:{len(rows)}",
                        {"update": update.describe(), "signer": str(update.signer),
                         "head": update.hash.hex()})
        return state

    def lock_head(self) -> str:
        """The last stored update's hash (hex), or "" while the mesh is not locked."""
        with self._read() as tx:
            r = tx.row("SELECT hash FROM lock_updates ORDER BY seq DESC LIMIT 1")
        return "" if r is None else str(r[0])

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

    def audit_count(self) -> int:
        """Entries in the audit chain (sequence numbers run 1..N without gaps)."""
        with self._read() as tx:
            r = tx.row("SELECT COALESCE(MAX(seq), 0) FROM audit")
        return int(r[0]) if r else 0

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


def _is_id(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) < 19  # fits an INTEGER
