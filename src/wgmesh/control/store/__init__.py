"""Durable control state behind one :class:`Store` interface: SQLite (default) or PostgreSQL.

- :mod:`~wgmesh.control.store.records`: what control stores, with its codecs (pure);
- :mod:`~wgmesh.control.store.migrations`: the schema, as versioned migrations;
- :mod:`~wgmesh.control.store.sql`: the one :class:`Store`, in portable SQL;
- :mod:`~wgmesh.control.store.sqlite`, :mod:`~wgmesh.control.store.postgres`: the dialects.

The records load eagerly and the SQL layer on first use (PEP 562), so the
sans-I/O :class:`~wgmesh.control.world.World` reads records without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wgmesh.control.store.migrations import MIGRATIONS
from wgmesh.control.store.records import (
    ApiKeyRecord,
    AuthKeyRecord,
    Change,
    NodeRecord,
    Registration,
)

if TYPE_CHECKING:
    from wgmesh.control.store.postgres import PostgresStore
    from wgmesh.control.store.sql import Store
    from wgmesh.control.store.sqlite import SQLiteStore

__all__ = ["MIGRATIONS", "ApiKeyRecord", "AuthKeyRecord", "Change", "NodeRecord",
           "PostgresStore", "Registration", "SQLiteStore", "Store", "open_store"]


def open_store(db: str, **kw: Any) -> Store:
    """``postgresql://...`` (or ``postgres://``) selects PostgreSQL; anything else is a SQLite path."""
    if db.startswith(("postgresql://", "postgres://")):
        from wgmesh.control.store.postgres import PostgresStore

        return PostgresStore(db, **kw)
    from wgmesh.control.store.sqlite import SQLiteStore

    return SQLiteStore(db.removeprefix("sqlite://"), **kw)


def __getattr__(name: str) -> Any:
    if name in ("Store", "SQLiteStore", "PostgresStore"):
        from wgmesh.control.store import postgres, sql, sqlite

        return getattr({"Store": sql, "SQLiteStore": sqlite, "PostgresStore": postgres}[name],
                       name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
