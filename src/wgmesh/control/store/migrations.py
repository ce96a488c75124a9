"""The schema, as versioned migrations that every dialect applies in order.

A migration is never edited once released; a change to the schema is a new
version. Placeholders in the statements: ``{pk}`` an auto-increment primary
key, ``{real}`` a float column (each dialect fills in its own types).
"""

from __future__ import annotations

__all__ = ["MIGRATIONS"]

#: (version, statements), in order.
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
    # Names an admin assigned (the only ones policy selectors match), and audit
    # entries chained by HMAC under the key kept outside the database.
    (4, ["ALTER TABLE nodes ADD COLUMN name_assigned INTEGER NOT NULL DEFAULT 0",
         "ALTER TABLE audit ADD COLUMN keyed INTEGER NOT NULL DEFAULT 0"]),
    # The mesh lock chain (wgmesh.lock), hex-encoded. UNIQUE(parent): no two updates
    # extend the same one, so the database itself cannot hold a fork.
    (5, ["""CREATE TABLE lock_updates (
            seq INTEGER PRIMARY KEY, hash TEXT NOT NULL UNIQUE, parent TEXT NOT NULL UNIQUE,
            data TEXT NOT NULL, created_at {real} NOT NULL)"""]),
    # Node life cycle: ephemeral nodes (removed a grace period after they go
    # offline), approval (a pending node sees no one and no one sees it), and
    # who created an auth key (the policy's tag owners are checked against it).
    (6, ["ALTER TABLE nodes ADD COLUMN ephemeral INTEGER NOT NULL DEFAULT 0",
         "ALTER TABLE nodes ADD COLUMN approved INTEGER NOT NULL DEFAULT 1",
         "ALTER TABLE auth_keys ADD COLUMN ephemeral INTEGER NOT NULL DEFAULT 0",
         "ALTER TABLE auth_keys ADD COLUMN preapproved INTEGER NOT NULL DEFAULT 0",
         "ALTER TABLE auth_keys ADD COLUMN created_by TEXT NOT NULL DEFAULT ''"]),
    # Subnet routes: what a node advertises (its own report) and what an admin approved
    # (JSON lists of CIDRs; see wgmesh.control.routes).
    (7, ["ALTER TABLE nodes ADD COLUMN advertised_routes TEXT NOT NULL DEFAULT '[]'",
         "ALTER TABLE nodes ADD COLUMN approved_routes TEXT NOT NULL DEFAULT '[]'"]),
]
